#!/usr/bin/env bash
# session 13, call 2: the kernel library's table re-timed whole on today's kernels (issue #3), one kernel_cases module
# per process and folder so a timeout loses one module, not the table; first the chunked cross-entropy's kernels split
# by torch.profiler beside torch.compile's chunked algorithm at Llama-3.1-8B's head (the one row it lost in session 10).
export TRITON_CACHE_AUTOTUNING=1
ROOT=$OUT
mkdir -p "$ROOT/profile"
OUT="$ROOT/profile" timeout 60 benchmarks/run_on_gpu.sh py:benchmarks.lce_profile | cut -c1-300
run() { OUT="$ROOT/kernels-${2/,/-}" timeout "$1" benchmarks/run_on_gpu.sh "kernels:$2" | tail -2; }
run 150 linear_cross_entropy
run 150 qlora_linear
run 100 rmsnorm,rope
run 60 nf4
run 40 glu
