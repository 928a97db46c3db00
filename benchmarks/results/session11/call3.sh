#!/usr/bin/env bash
# session 11, call 3: where the fused small-M NF4 matmul (branch fused-small-m, merged into the tree) wins:
# four layer shapes x 32/64/128 tokens, fused against the dequantize path and dequantize + cuBLAS, graph-timed.
export TRITON_CACHE_AUTOTUNING=1
timeout 120 benchmarks/run_on_gpu.sh 'tests:fused_matches_dequant or matches_reference_at_real_shapes' | tail -2
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 400 python3 -m benchmarks.fused_small_m --tokens 32,64,128 --shapes all 2>&1 | tee "$OUT/fused-sweep.jsonl" | tail -20
