#!/usr/bin/env bash
# Ready for session 15 (one call, ~7 minutes): sliding-window layers through the chunked attention over their band
# (switch sliding_band_attention, off: written in session 14, whose device time ran out on failed starts). Its GPU
# tests (Gemma-4-E2B's sliding-layer shape; a tiny Gemma 4's eager and captured steps through the band against
# steps under the mask), the sliding-attention kernel table (band with fused / PyTorch rows against SDPA under
# transformers' band mask), and the trainer's A/B on Gemma-4-E2B at 8,192 tokens (off, on, off,
# on; fresh processes), then on at E2B 2,048 and 4,096 and E4B 4,096, to price the band (its efficiency is the
# wide-head path's until then) and to choose the shortest row it pays at. Everything packed into one archive.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/next15; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next15.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": 16, \"gc\": true}]" > "/tmp/g-$1.json"; }
g 2048; g 4096; g 8192
timeout 70 benchmarks/run_on_gpu.sh "tests:sliding" | tail -3; pack
OUT="$W/kernels-sliding" timeout 80 benchmarks/run_on_gpu.sh kernels:sliding_attention | tail -5; pack
E2B=gemma-4-e2b-text
timeout 330 benchmarks/run_on_gpu.sh trainer:$E2B:/tmp/g-8192.json enable:sliding_band_attention \
  trainer:$E2B:/tmp/g-8192.json enable: trainer:$E2B:/tmp/g-8192.json enable:sliding_band_attention \
  trainer:$E2B:/tmp/g-8192.json trainer:$E2B:/tmp/g-4096.json trainer:$E2B:/tmp/g-2048.json \
  trainer:gemma-4-e4b-text:/tmp/g-4096.json | cut -c1-120; pack
