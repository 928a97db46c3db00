#!/usr/bin/env bash
# session 11, call 5: the trainer as it ships but eager (VRAMPLAN_DISABLE=cuda_graphs), and offloaded checkpoints
# (never captured): the speed model's eager host cost was fitted on sessions 1-3's trainer, and session 11's one
# eager run (offloaded checkpoints) came out 1.8x faster than it priced. Each configuration in its own process.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
G='"batch": 1, "rank": 16, "gc": true'
O='"batch": 1, "rank": 16, "gc": true, "checkpointing": "offload"'
echo "[{\"seq\": 1024, $G}, {\"seq\": 2048, $G}, {\"seq\": 4096, $G}, {\"seq\": 2048, $O}, {\"seq\": 8192, $O}]" > /tmp/llama.json
echo "[{\"seq\": 2048, $G}]" > /tmp/one.json
timeout 420 benchmarks/run_on_gpu.sh disable:cuda_graphs trainer:llama-3.2-1b:/tmp/llama.json trainer:qwen3-0.6b:/tmp/one.json \
  trainer:qwen3-4b:/tmp/one.json trainer:gemma-4-e2b-text:/tmp/one.json | cut -c1-120
mv "$OUT/trainer.jsonl" "$OUT/trainer-eager.jsonl" 2>/dev/null
