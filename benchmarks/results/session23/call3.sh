#!/usr/bin/env bash
# Session 23, call 3 (~5 minutes). The host probes now run after the steps (benchmarks/trainer.py), so these lines'
# allocator starts as a user's run does. 1. (#5) An A/B of the switch held_eager_gradients (the adapters' gradients
# made as one buffer before an eager step's first backward): Qwen3-4B at rank 16 (2,048 tokens) and 64 (1,024),
# Qwen3-0.6B at rank 128 (2,048), eager, off then on, fresh processes, pool summaries (ab-held-gradients.json).
# 2. On an H100, `vramplan calibrate` on the three models whose calibrate runs session 10 made without expandable
# segments (session10/calibrate_models.sh).
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s23c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session23/ab-held-gradients.json")):
    json.dump(grid, open(f"/tmp/ab-{model}.json", "w"))
PY
timeout 200 benchmarks/run_on_gpu.sh trainer:qwen3-4b:/tmp/ab-qwen3-4b.json enable:held_eager_gradients \
  trainer:qwen3-4b:/tmp/ab-qwen3-4b.json | cut -c1-110; pack
timeout 90 benchmarks/run_on_gpu.sh trainer:qwen3-0.6b:/tmp/ab-qwen3-0.6b.json enable:held_eager_gradients \
  trainer:qwen3-0.6b:/tmp/ab-qwen3-0.6b.json | cut -c1-110; pack
mv "$W/trainer.jsonl" "$W/ab-held-gradients.jsonl" 2>/dev/null; pack
# the calibrations are the H100's: on another GPU the A/B alone
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || exit 0
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 150 bash benchmarks/results/session10/calibrate_models.sh gemma-4-e2b-text qwen3-4b gemma-4-e4b-text; pack
