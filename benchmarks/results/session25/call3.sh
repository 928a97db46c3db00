#!/usr/bin/env bash
# Session 25, call 3 (~5 minutes), most needed first:
# 1. (#6) the campaign registered in campaign-host-probe.json / predicted-host-probe.txt: four eager plans no line has
#    run, each to be priced on its own host's probe.
# 2. the GPU tests of calibrate and check: `vramplan calibrate` now probes its host and stores the reading.
# 3. where the one wait inside an eager step's forward is (call 2 ran out of time before it).
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s25; source benchmarks/device_staging.sh
python3 -c "import json; c=json.load(open('benchmarks/results/session25/campaign-host-probe.json'))
for m, g in c['plans'].items(): json.dump(g, open(f'/tmp/probe-{m}.json', 'w'))"
for model in llama-3.2-1b qwen3-1.7b llama-3.2-3b gemma-4-e2b-text; do
  STEPS=8 timeout 75 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/probe-$model.json" | grep step_s | cut -c1-100
  pack
done
mv "$W/trainer.jsonl" "$W/host-probe.jsonl"; pack
timeout 90 benchmarks/run_on_gpu.sh "tests:calibrat or check" | tail -3; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1
timeout 45 python3 -m benchmarks.profile_trainer --config llama-3.2-1b --seq 1024 --syncs --rows 5 > "$W/profile-syncs.txt" 2>&1
grep "^sync\|^wall" "$W/profile-syncs.txt" | cut -c1-400; pack
