#!/usr/bin/env bash
# Session 25, call 2 (~6 minutes): the campaign registered in campaign-eager-steady.json / predicted-eager-steady.txt.
# Seven eager plans of sessions 21, 23 and 24 again with twelve steps, each step's time recorded (step_times): how
# long an eager step keeps warming up after the first, and the steady speed a long run sees.
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s25; source benchmarks/device_staging.sh
python3 -c "import json; c=json.load(open('benchmarks/results/session25/campaign-eager-steady.json'))
for m, g in c['plans'].items(): json.dump(g, open(f'/tmp/steady-{m}.json', 'w'))"
for model in llama-3.2-1b qwen3-0.6b qwen3-1.7b llama-3.2-3b qwen3-4b gemma-4-e2b-text gemma-4-e4b-text; do
  STEPS=12 timeout 100 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/steady-$model.json" | grep step_s | cut -c1-100
  pack
done
mv "$W/trainer.jsonl" "$W/eager-steady.jsonl"; pack
# call 1's --syncs flagged one wait inside the decoder's forward, its frames hidden by a filter that dropped every path
# holding "/torch/" (the device's site-packages live under /opt/torch/): where it is
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1
timeout 60 python3 -m benchmarks.profile_trainer --config llama-3.2-1b --seq 1024 --syncs --rows 5 > "$W/profile-syncs.txt" 2>&1
grep "^sync" "$W/profile-syncs.txt" | cut -c1-400; pack
