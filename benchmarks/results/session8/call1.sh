#!/usr/bin/env bash
# session 8, call 1: Llama-3.2-1B lean variants toward < 1.6 GB, the int8 head's vocabulary-major
# pass A/B, RoPE/RMSNorm launch sweeps, and the GPU tests of what changed.
export STEPS=6
A='{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 64}'
B='{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 64, "lora_dtype": "bf16"}'
C='{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 32, "lora_dtype": "bf16"}'
echo "[$A, $B]" > /tmp/lean-ab.json
echo "[$A, $B, $C]" > /tmp/lean-abc.json
echo "[$A]" > /tmp/lean-a.json
benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/lean-ab.json enable:fused_optimizer trainer:llama-3.2-1b:/tmp/lean-abc.json \
  enable: disable:int8_vocab_major trainer:llama-3.2-1b:/tmp/lean-a.json disable:
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 200 python3 -m benchmarks.kernel_sweep > "$OUT/sweep.jsonl" 2> "$OUT/sweep.err"; tail -3 "$OUT/sweep.err"
benchmarks/run_on_gpu.sh 'tests:rope or rmsnorm or vocab or int8' kernels:linear_cross_entropy
