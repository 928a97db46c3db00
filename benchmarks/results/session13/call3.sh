#!/usr/bin/env bash
# session 13, call 3: call 2's modules whose files did not come back (the device returns a few files a call), again,
# packed into one archive: the chunked loss's kernel split, the QLoRA linear, RMSNorm and RoPE, NF4 tables.
export TRITON_CACHE_AUTOTUNING=1
ROOT=$OUT
W=/tmp/call3; mkdir -p "$W/profile"
OUT="$W/profile" timeout 60 benchmarks/run_on_gpu.sh py:benchmarks.lce_profile | cut -c1-200
run() { OUT="$W/kernels-${2/,/-}" timeout "$1" benchmarks/run_on_gpu.sh "kernels:$2" | tail -2; }
run 150 qlora_linear
run 100 rmsnorm,rope
run 60 nf4
tar czf "$ROOT/call3.tgz" -C "$W" .
