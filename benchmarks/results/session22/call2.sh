#!/usr/bin/env bash
# Session 22, call 2: call 1 never started (seven refused starts spent three quarters of the session's device time);
# what the rest allows, most needed first:
# 1. (#5) what a paging process leaves on the device and whether a small managed allocation made before the baseline
#    takes it over (benchmarks.outside_allocator --sequence, as call 1);
# 2. the trainer's GPU tests (captured steps, fp16 steps), which compact captures (session 21) changed;
# 3. (#3) the gated-MLP kernel table, eager and CUDA-graph timed.
W=/tmp/s22b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
benchmarks/run_on_gpu.sh >/dev/null 2>&1  # installs the wheels, writes gpu.txt
PYTHONPATH="$PWD:/tmp/shim:/tmp/site" timeout 60 python3 -m benchmarks.outside_allocator --sequence paged:96:131072 \
  prepaged:96:131072 nothing prepaged:96:131072 paged:96:131072 paged:96:131072 > "$W/leftover.jsonl" 2>"$W/leftover-err.log"
cut -c1-150 "$W/leftover.jsonl"; pack
timeout 100 benchmarks/run_on_gpu.sh tests:test_train_gpu | tail -4; pack
timeout 100 benchmarks/run_on_gpu.sh kernels:glu | tail -12; pack
