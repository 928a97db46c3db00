#!/usr/bin/env bash
# Session 14, call 2 (~8 minutes): the trainer with the fused attention rows on (its new default) held out at Gemma-4-E2B
# 1,024 / 4,096 / 8,192 tokens and E4B 2,048 / 4,096; the graph profile of E2B at 2,048 tokens (where the step's time
# goes now); the wide-head attention table with chunks 2x and 4x the budget.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/call2; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call2.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": $2, \"gc\": true$3}]" > "/tmp/g-$1-$2$4.json"; }
g 1024 32 "" ""; g 4096 16 "" ""; g 8192 16 "" ""; g 2048 16 "" ""
OUT="$W/kernels-wide" timeout 100 benchmarks/run_on_gpu.sh kernels:wide_attention | tail -6; pack
timeout 100 benchmarks/run_on_gpu.sh profile_graphs:gemma-4-e2b-text:2048 | tail -3; pack
timeout 330 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/g-1024-32.json trainer:gemma-4-e2b-text:/tmp/g-4096-16.json \
  trainer:gemma-4-e2b-text:/tmp/g-8192-16.json trainer:gemma-4-e4b-text:/tmp/g-2048-16.json \
  trainer:gemma-4-e4b-text:/tmp/g-4096-16.json | cut -c1-120; pack
