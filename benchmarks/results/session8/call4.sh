#!/usr/bin/env bash
# session 8, call 4: chunked cross-entropy with each row split across programs (row_splits), its GPU
# tests, the kernel benchmark, and the same benchmark with one program a row (ROW_SPLITS=1) for the A/B.
benchmarks/run_on_gpu.sh 'tests:cross_entropy or int8 or vocab' kernels:linear_cross_entropy
cp "$OUT/kernels.md" "$OUT/lce-split.md"; cp "$OUT/kernels.json" "$OUT/lce-split.json"
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 100 python3 -c "
import runpy, sys
import vramplan_kernels.linear_cross_entropy as lce
lce.ROW_SPLITS = 1
sys.argv = ['kernels.py', '--only', 'linear_cross_entropy', '--out', '$OUT/one-program']
runpy.run_path('benchmarks/kernels.py', run_name='__main__')" 2>&1 | grep '^| linear' | cut -c1-200
