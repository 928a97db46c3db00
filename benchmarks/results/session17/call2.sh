#!/usr/bin/env bash
# Session 17, call 2: the band's shipped threshold (six windows: 3,072 tokens on Gemma 4) against SDPA's mask
# (disable:sliding_band_attention), Gemma-4-E2B and E4B, rank 16, fresh processes, 6 steps. Call 1 gave these runs
# 60 s each, under the ~20 s a model takes to save plus the steps: none finished.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/s17b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/s17b.tgz" -C "$W" .; }
echo '[{"seq": 3072, "rank": 16, "gc": true, "batch": 1}]' > /tmp/g3072.json
for m in gemma-4-e2b-text gemma-4-e4b-text; do
  timeout 90 benchmarks/run_on_gpu.sh "trainer:$m:/tmp/g3072.json" | cut -c1-100; pack
  timeout 90 benchmarks/run_on_gpu.sh disable:sliding_band_attention "trainer:$m:/tmp/g3072.json" | cut -c1-100; pack
done
