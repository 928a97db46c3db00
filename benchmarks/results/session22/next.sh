#!/usr/bin/env bash
# For the next session (~8 minutes), #5: session 22's eager campaign, registered before it ran (campaign-eager.json,
# predicted-eager.txt: six plans no eager line has measured, priced by the small-pool gradient line), fresh processes,
# pool summaries; then `vramplan calibrate` as a user runs it on Llama-3.2-1B and Qwen3-0.6B (session 10's
# calibrate_models.sh: 3,072 tokens and its half), now under expandable segments, to replace session 10's points,
# measured without them.
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s23; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session22/campaign-eager.json")):
    json.dump(grid, open(f"/tmp/eager-{model}.json", "w"))
PY
for job in 70:llama-3.2-3b 60:qwen3-1.7b 90:gemma-4-e4b-text 100:llama-3.1-8b 70:qwen3-4b 50:qwen3-0.6b; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}:/tmp/eager-${job#*:}.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/eager-campaign.jsonl" 2>/dev/null; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 150 bash benchmarks/results/session10/calibrate_models.sh llama-3.2-1b qwen3-0.6b; pack
