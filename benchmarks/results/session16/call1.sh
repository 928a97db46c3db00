#!/usr/bin/env bash
# Ready for session 16 (one call, ~8 minutes): what session 15 changed and could not time for lack of device time.
# The band's trainer-level GPU test in its bf16 form and the wide-head tests; the sliding-attention kernel table with
# the band's keys aligned to multiples of 8 against unaligned (activations.BAND_KEY_MULTIPLE); the wide-head table;
# and the trainer's A/B of the aligned chunks (heights in multiples of 64, band keys of 8) against
# --unaligned-chunks at Gemma-4-E2B 6,144 tokens (341-row chunks before: priced +22%) and 8,192 tokens, and E4B at
# 8,192; fresh processes, 8 steps each. If the aligned band is faster, re-read
# throughput.CHUNKED_FUSED_BAND_ATTENTION_EFFICIENCY off the 8,192 pair and check the band's threshold (E2B crossed
# near eight windows, E4B near eleven, before alignment). Everything packed into one archive.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/next16; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next16.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": 16, \"gc\": true}]" > "/tmp/g-$1.json"; }
g 6144; g 8192
timeout 90 benchmarks/run_on_gpu.sh "tests:sliding or wide" | tail -3; pack
OUT="$W/kernels" timeout 150 benchmarks/run_on_gpu.sh kernels:sliding_attention,wide_attention | tail -12; pack
E2B=gemma-4-e2b-text
for cfg in "$E2B:/tmp/g-6144.json" "$E2B:/tmp/g-8192.json" "gemma-4-e4b-text:/tmp/g-8192.json"; do
  timeout 80 benchmarks/run_on_gpu.sh "trainer:$cfg" | cut -c1-100
  TRAINER_ARGS="--unaligned-chunks" timeout 80 benchmarks/run_on_gpu.sh "trainer:$cfg" | cut -c1-100; pack
done
