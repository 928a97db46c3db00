#!/usr/bin/env bash
# Session 22, call 1 (~7 minutes; four refused starts had spent half the session's device time):
# 1. (#5) What a paging process leaves on the device, whether NVML's per-process figure sees it, and whether a small
#    managed allocation made before the baseline takes it over (benchmarks.outside_allocator --sequence).
# 2. (#3) The gated-MLP kernel table, timed eager and replayed from a CUDA graph (E2B's GeGLU read 0.97x Liger eager
#    in session 13).
# 3. Every GPU-marked test: the whole suite has not run in one go since session 5, and compact captures landed in
#    session 21 after only the captured-step tests ran.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6 TRAINER_ARGS=--pool-summary
W=/tmp/s22a; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
benchmarks/run_on_gpu.sh >/dev/null 2>&1  # installs the wheels, writes gpu.txt
PYTHONPATH="$PWD:/tmp/shim:/tmp/site" timeout 60 python3 -m benchmarks.outside_allocator --sequence paged:96:131072 \
  prepaged:96:131072 nothing prepaged:96:131072 paged:96:131072 paged:96:131072 > "$W/leftover.jsonl" 2>"$W/leftover-err.log"
cut -c1-150 "$W/leftover.jsonl"; pack
timeout 100 benchmarks/run_on_gpu.sh kernels:glu | tail -12; pack
timeout 290 benchmarks/run_on_gpu.sh tests | tail -30; pack
