#!/usr/bin/env bash
# For the next session (~5 minutes), #3: every `gpu`-marked test on the code as it ships (the whole set last ran in
# session 5; sessions since ran the ones their changes touched), then the NF4 and QLoRA-linear kernel tables at real
# shapes. After it, call3.sh (#5: the registered eager slack sweep, and the calibrate runs).
W=/tmp/s24; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 330 benchmarks/run_on_gpu.sh tests | tail -6; pack
timeout 200 benchmarks/run_on_gpu.sh kernels:nf4,qlora_linear | tail -30; pack
