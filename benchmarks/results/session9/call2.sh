#!/usr/bin/env bash
# session 9, call 2: the held-out campaign's larger models (the trainer as it ships: CUDA graphs, causal
# captures, default settings), each configuration in its own process, with the driver's state per phase.
export STEPS=6
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 2048, $G}, {\"seq\": 4096, \"batch\": 1, \"rank\": 32, \"gc\": true}]" > /tmp/qwen4b.json
echo "[{\"seq\": 1024, $G}, {\"seq\": 4096, $G}]" > /tmp/e2b.json
echo "[{\"seq\": 2048, $G}]" > /tmp/one.json
timeout 560 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/e2b.json trainer:qwen3-4b:/tmp/qwen4b.json \
  trainer:llama-3.2-3b:/tmp/one.json trainer:gemma-4-e4b-text:/tmp/one.json trainer:llama-3.1-8b:/tmp/one.json
cp "$OUT/trainer.jsonl" "$OUT/trainer-campaign2.jsonl" 2>/dev/null
