#!/usr/bin/env bash
# session 9, call 6: (1) Qwen3-0.6B and Llama-3.2-1B with the caching allocator's expandable segments off: does
# the 128 MiB outside torch's pool that Qwen3-0.6B lacked follow the allocator? (2) three campaign
# configurations again on another machine of the same kind (one that missed by 26%, two that did not), kept
# apart from the campaign's own numbers: how far a host moves a step.
export STEPS=6
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 2048, $G}]" > /tmp/s2048.json
echo "[{\"seq\": 1024, $G}]" > /tmp/s1024.json
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False timeout 150 benchmarks/run_on_gpu.sh trainer:qwen3-0.6b:/tmp/s2048.json \
  trainer:llama-3.2-1b:/tmp/s2048.json
mv "$OUT/trainer.jsonl" "$OUT/trainer-no-expandable.jsonl"
timeout 170 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/s1024.json trainer:llama-3.2-1b:/tmp/s1024.json \
  trainer:qwen3-0.6b:/tmp/s2048.json
mv "$OUT/trainer.jsonl" "$OUT/trainer-repeats.jsonl"
