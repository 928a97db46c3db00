#!/usr/bin/env bash
# Session 14, call 3 (~4 minutes): sliding-window layers through the chunked attention over their band (switch
# sliding_band_attention, off by default until this A/B): its GPU tests at Gemma-4-E2B's sliding-layer shape, the
# sliding-attention kernel table (band fused / PyTorch rows against SDPA under transformers' band mask), and the
# trainer on Gemma-4-E2B at 8,192 tokens off then on (cut to the device time left after failed starts).
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/call3; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call3.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": 16, \"gc\": true}]" > "/tmp/g-$1.json"; }
g 2048; g 4096; g 8192
timeout 60 benchmarks/run_on_gpu.sh "tests:sliding" | tail -3; pack
OUT="$W/kernels-sliding" timeout 60 benchmarks/run_on_gpu.sh kernels:sliding_attention | tail -5; pack
E2B=gemma-4-e2b-text
timeout 150 benchmarks/run_on_gpu.sh trainer:$E2B:/tmp/g-8192.json enable:sliding_band_attention \
  trainer:$E2B:/tmp/g-8192.json | cut -c1-120; pack
