#!/usr/bin/env bash
# Session 24, call 3 (~5 minutes). 1 (#5): an eager campaign registered before it ran (campaign-eager-timing.json,
# predicted-eager-timing.txt, committed first): the planner prices an eager step's gradients by when they come (its
# backward peaks at its start or end; the slack is the small pool's gradients made after that peak). Llama-3.2-3B,
# Qwen3-1.7B and Llama-3.2-1B, ranks 32-128, fresh processes, host probed after the steps. 2 (#3): the dry-run test
# in its own process (it read 0 bytes inside pytest's after the other GPU tests, call 1).
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s24c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session24/campaign-eager-timing.json")):
    json.dump(grid, open(f"/tmp/timing-{model}.json", "w"))
PY
for job in 130:llama-3.2-3b 110:qwen3-1.7b 100:llama-3.2-1b; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}:/tmp/timing-${job#*:}.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/eager-timing.jsonl" 2>/dev/null; pack
timeout 90 benchmarks/run_on_gpu.sh tests:dry_run | tail -3; pack
