#!/usr/bin/env bash
# session 12, call 2: the trainer as it ships but eager (VRAMPLAN_DISABLE=cuda_graphs). Llama-3.2-1B's rank sweep
# and shapes fit the eager fixed allowances (outside torch's pool, fragmentation) and the eager host cost; Qwen3-4B,
# Gemma-4-E2B and offloaded checkpoints at 8,192 tokens are held out. Each configuration in its own process.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
R='"batch": 1, "gc": true, "seq": 2048'
G='"batch": 1, "rank": 16, "gc": true'
O='"batch": 1, "rank": 16, "gc": true, "checkpointing": "offload"'
echo "[{$R, \"rank\": 8}, {$R, \"rank\": 64}, {$R, \"rank\": 256}, {\"seq\": 1024, $G}, {\"seq\": 4096, $G}]" > /tmp/llama.json
echo "[{\"seq\": 8192, $O}]" > /tmp/offload.json
echo "[{\"seq\": 2048, $G}]" > /tmp/one.json
timeout 560 benchmarks/run_on_gpu.sh disable:cuda_graphs trainer:llama-3.2-1b:/tmp/llama.json \
  trainer:llama-3.2-1b:/tmp/offload.json trainer:qwen3-4b:/tmp/one.json trainer:gemma-4-e2b-text:/tmp/one.json | cut -c1-120
mv "$OUT/trainer.jsonl" "$OUT/trainer-eager.jsonl" 2>/dev/null
