#!/usr/bin/env bash
# Session 23, call 3 (~8 minutes), #5. The host probes now run after the steps (benchmarks/trainer.py), so these
# lines' allocator starts as a user's run does. 1. An eager slack sweep, registered before it ran
# (campaign-slack-sweep.json, predicted-slack-sweep.txt): Qwen3-4B at ranks 8-128 (1,024 tokens) and Qwen3-0.6B at
# 16-128 (2,048), fresh processes, pool summaries. 2. `vramplan calibrate` as a user runs it on the three models whose
# calibrate runs session 10 made without expandable segments (session10/calibrate_models.sh).
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s23c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session23/campaign-slack-sweep.json")):
    json.dump(grid, open(f"/tmp/sweep-{model}.json", "w"))
PY
for job in 230:qwen3-4b 110:qwen3-0.6b; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}:/tmp/sweep-${job#*:}.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/slack-sweep.jsonl" 2>/dev/null; pack
# the calibrations are the H100's: on another GPU the sweep alone
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || exit 0
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 200 bash benchmarks/results/session10/calibrate_models.sh gemma-4-e2b-text qwen3-4b gemma-4-e4b-text; pack
