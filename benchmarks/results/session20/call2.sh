#!/usr/bin/env bash
# Session 20, call 2 (~9 minutes): the campaign's second half (campaign.json), fresh processes, 8 steps each;
# Gemma-4-E2B's fp16 line is the retrying loss-scaled trainer on the real architecture (random weights).
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/s20b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
grid() { python3 -c "import json,sys; print(json.dumps(dict(json.load(open('benchmarks/results/session20/campaign.json')))[sys.argv[1]]))" "$1" > "/tmp/$1.json"; }
for job in 170:gemma-4-e2b-text 80:gemma-4-e4b-text 130:qwen3-4b 110:llama-3.1-8b; do
  m=${job#*:}; grid "$m"
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:$m:/tmp/$m.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/campaign-2.jsonl" 2>/dev/null; pack
