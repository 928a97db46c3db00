#!/usr/bin/env bash
# Session 26's band A/B (~4 minutes, 6,144 tokens left out for the device time left; campaign-band-eager.json, predicted-band-eager.txt): Gemma 4 eager with and
# without the sliding layers' band, fresh processes alternating on one machine.
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s26b; source benchmarks/device_staging.sh
python3 -c "import json
c = json.load(open('benchmarks/results/session26/campaign-band-eager.json'))
for m, grid in c['plans'].items():
    for g in grid: json.dump([g], open(f'/tmp/band-{m}-{g[\"seq\"]}.json', 'w'))"
for plan in ${BAND_PLANS:-gemma-4-e2b-text:4096 gemma-4-e4b-text:4096}; do
  model=${plan%%:*}; seq=${plan##*:}
  for off in sliding_band_attention ""; do
    VRAMPLAN_DISABLE=$off STEPS=8 timeout 85 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/band-$model-$seq.json" | grep step_s | cut -c1-90
    pack
  done
done
mv "$W/trainer.jsonl" "$W/band-eager.jsonl"; pack
