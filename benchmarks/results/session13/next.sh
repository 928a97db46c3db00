#!/usr/bin/env bash
# Ready for session 14 (one call, ~9 minutes): the chunked attention's row passes fused in Triton (switch
# wide_head_fused_rows, off: written in session 13 with no device time left) — its GPU tests, the wide-head attention
# kernel table (benchmarks/kernel_cases/wide_attention.py: fused, PyTorch rows, SDPA, SDPA math), an A/B of
# Gemma-4-E2B at 2,048 tokens (PyTorch rows, fused, PyTorch, fused; fresh processes), the chunked path held out at
# E2B 8,192 and E4B 4,096 tokens, and the NF4 table's Llama-3.1-8B rows. The device returns few files a call:
# everything is packed into one archive after each stage.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/next14; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next14.tgz" -C "$W" .; }
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 2048, $G}]" > /tmp/e2b2048.json
echo "[{\"seq\": 8192, $G}]" > /tmp/e2b8192.json
echo "[{\"seq\": 4096, $G}]" > /tmp/e4b4096.json
timeout 70 benchmarks/run_on_gpu.sh "tests:wide_head or attention_rows" | tail -3; pack
OUT="$W/kernels-wide" timeout 90 benchmarks/run_on_gpu.sh kernels:wide_attention | tail -8; pack
timeout 260 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/e2b2048.json enable:wide_head_fused_rows \
  trainer:gemma-4-e2b-text:/tmp/e2b2048.json enable: trainer:gemma-4-e2b-text:/tmp/e2b2048.json \
  enable:wide_head_fused_rows trainer:gemma-4-e2b-text:/tmp/e2b2048.json enable: \
  trainer:gemma-4-e2b-text:/tmp/e2b8192.json trainer:gemma-4-e4b-text:/tmp/e4b4096.json | cut -c1-150; pack
OUT="$W/kernels-nf4" timeout 80 benchmarks/run_on_gpu.sh kernels:nf4 | tail -3; pack
