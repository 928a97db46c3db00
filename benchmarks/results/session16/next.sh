#!/usr/bin/env bash
# Ready for session 17 (one call, ~6 minutes; session 16 found no machine for it): the band's threshold, lowered to
# six windows once its keys were aligned (session 16 call 1's
# kernel table put the aligned band ahead of SDPA's masked square from 2,048 tokens on E2B's sliding layer; the speed
# model puts the step even at four windows). The band's GPU trainer test with its bound measured in the run (SDPA's
# math kernel as a second masked step); then the trainer's A/B, band (the shipped threshold) against SDPA's mask
# (disable:sliding_band_attention), at Gemma-4-E2B and E4B 3,072 tokens (six windows) and E2B 4,096. Fresh
# processes, 8 steps each. Everything packed into one archive.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/next17; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next17.tgz" -C "$W" .; }
g() { echo "[{\"seq\": $1, \"batch\": 1, \"rank\": 16, \"gc\": true}]" > "/tmp/g-$1.json"; }
g 3072; g 4096
timeout 80 benchmarks/run_on_gpu.sh "tests:train_like_steps_under_the_mask" | tail -3; pack
for cfg in "gemma-4-e2b-text:/tmp/g-3072.json" "gemma-4-e4b-text:/tmp/g-3072.json" "gemma-4-e2b-text:/tmp/g-4096.json"; do
  timeout 80 benchmarks/run_on_gpu.sh "trainer:$cfg" | cut -c1-100
  timeout 80 benchmarks/run_on_gpu.sh disable:sliding_band_attention "trainer:$cfg" | cut -c1-100; pack
done
