#!/usr/bin/env bash
# Session 21, call 4 (~7 minutes): compact captures held out. Six plans no run of the switch had measured, over five
# models (campaign-compact.json), predicted before they ran by the planner that no longer prices a captured slack per
# adapter parameter (predicted-compact.txt); fresh processes, CUDA graphs, pool summaries. Then, apart from the campaign,
# Llama-3.2-1B at 2,048 tokens eager beside both host probes (host_dispatch_us, host_autograd_us): a third host for it.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6 TRAINER_ARGS=--pool-summary
W=/tmp/s21d; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
python3 - <<'PY'
import json
for model, grid in json.load(open("benchmarks/results/session21/campaign-compact.json")):
    json.dump(grid, open(f"/tmp/compact-{model}.json", "w"))
PY
for job in 80:gemma-4-e2b-text 95:gemma-4-e4b-text 120:llama-3.2-3b 60:qwen3-0.6b 120:llama-3.1-8b; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}:/tmp/compact-${job#*:}.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/compact-held-out.jsonl" 2>/dev/null; pack
echo '[{"seq": 2048, "rank": 16, "gc": true, "batch": 1, "cuda_graphs": false}]' > /tmp/eager.json
STEPS=8 TRAINER_ARGS= timeout 70 benchmarks/run_on_gpu.sh "trainer:llama-3.2-1b:/tmp/eager.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-probes.jsonl" 2>/dev/null; pack
