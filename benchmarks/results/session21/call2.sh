#!/usr/bin/env bash
# Session 21, call 2 (~6 minutes, same machine as call 1): the eager campaign registered in campaign.json and
# predicted.txt before it ran: six host-bound plans over four models, each line with its host's probe
# (host_dispatch_us), priced as shipped and with the host term scaled by the probe (predict.py).
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/s21b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session21/campaign.json")):
    json.dump(grid, open(f"/tmp/eager-{model}.json", "w"))
PY
for job in 150:llama-3.2-1b 50:qwen3-0.6b 80:qwen3-4b 90:gemma-4-e2b-text; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}:/tmp/eager-${job#*:}.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/eager.jsonl" 2>/dev/null; pack
