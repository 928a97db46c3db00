#!/usr/bin/env bash
# Session 20, call 1 (~9 minutes). 1. The fp16 GPU tests (the retrying trainer; its test rewritten in session 19).
# 2. The first half of a held-out campaign of the trainer as it ships, its grid committed before it ran
#    (campaign.json: 16 configurations over 8 models, spanning lengths 1,024-8,192, ranks 8-128, batches 1-4,
#    checkpointing full / none / offload, graphs and eager, bf16 and fp16), fresh processes, 8 steps each.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/s20; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 100 benchmarks/run_on_gpu.sh "tests:fp16_steps or fp16_adapter" | tail -4; pack
grid() { python3 -c "import json,sys; print(json.dumps(dict(json.load(open('benchmarks/results/session20/campaign.json')))[sys.argv[1]]))" "$1" > "/tmp/$1.json"; }
for job in 120:llama-3.2-1b 80:qwen3-0.6b 90:qwen3-1.7b 100:llama-3.2-3b; do
  m=${job#*:}; grid "$m"
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:$m:/tmp/$m.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/campaign-1.jsonl" 2>/dev/null; pack
