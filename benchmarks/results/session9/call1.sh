#!/usr/bin/env bash
# session 9, call 1: NF4's word kernel for small weights and RoPE's order/eviction settings, graph-timed beside
# their rivals (RMSNorm's one-launch dW sum timed for the first time); then a held-out campaign of the
# trainer as it ships (CUDA graphs, causal captures, default settings) on models and shapes the speed
# model was never fitted on, each configuration in its own process, with the driver's state per phase.
export STEPS=6
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 1024, $G}, {\"seq\": 4096, $G}, {\"seq\": 8192, $G}, {\"seq\": 2048, \"batch\": 1, \"rank\": 64, \"gc\": true}, {\"seq\": 1024, \"batch\": 4, \"rank\": 16, \"gc\": true}, {\"seq\": 2048, \"batch\": 1, \"rank\": 16, \"gc\": false}]" > /tmp/llama1b.json
echo "[{\"seq\": 2048, $G}, {\"seq\": 4096, $G}]" > /tmp/two.json
echo "[{\"seq\": 2048, $G}]" > /tmp/one.json
timeout 240 benchmarks/run_on_gpu.sh 'tests:nf4 or rope' kernels:nf4,rmsnorm,rope
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 60 python3 -m benchmarks.kernel_sweep --only rope --rope-tokens default --rope-warps default --rope-reverse 0,1 \
  --rope-evict 0,1 > "$OUT/sweep-rope-order.jsonl" 2> "$OUT/sweep-rope-order.err"; tail -2 "$OUT/sweep-rope-order.err"
timeout 300 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/llama1b.json trainer:qwen3-0.6b:/tmp/two.json \
  trainer:qwen3-1.7b:/tmp/one.json trainer:llama-3.2-3b:/tmp/one.json
cp "$OUT/trainer.jsonl" "$OUT/trainer-campaign1.jsonl" 2>/dev/null
