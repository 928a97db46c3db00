#!/usr/bin/env bash
# Session 15, call 2 (~8 minutes): the sliding-window band, on by default from rows of twelve windows
# (vramplan.memory.activations.SLIDING_BAND_MIN_WINDOWS). Its GPU tests; the sliding-attention kernel table at 2,048 to
# 8,192 tokens (E2B) and E4B's 8,192; the trainer's A/B at E2B 4,096 tokens (the default keeps SDPA's mask there;
# --band-min-windows 8 runs the band), and at E2B 6,144 and E4B 8,192 tokens (band by default;
# disable:sliding_band_attention runs SDPA). Fresh processes, 8 steps each. Everything packed into one archive.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/call2; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call2.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": 16, \"gc\": true}]" > "/tmp/g-$1.json"; }
g 4096; g 6144; g 8192
timeout 80 benchmarks/run_on_gpu.sh "tests:sliding" | tail -3; pack
OUT="$W/kernels-sliding" timeout 150 benchmarks/run_on_gpu.sh kernels:sliding_attention | tail -8; pack
E2B=gemma-4-e2b-text
timeout 70 benchmarks/run_on_gpu.sh trainer:$E2B:/tmp/g-4096.json | cut -c1-100
TRAINER_ARGS="--band-min-windows 8" timeout 70 benchmarks/run_on_gpu.sh trainer:$E2B:/tmp/g-4096.json | cut -c1-100; pack
timeout 240 benchmarks/run_on_gpu.sh disable:sliding_band_attention trainer:$E2B:/tmp/g-6144.json \
  trainer:gemma-4-e4b-text:/tmp/g-8192.json disable: trainer:$E2B:/tmp/g-6144.json \
  trainer:gemma-4-e4b-text:/tmp/g-8192.json | cut -c1-100; pack
