#!/usr/bin/env bash
# Session 21, call 5 (~3 minutes): the GPU tests of loss-scaled fp16 steps and captured steps with compact captures,
# then the compact-captures campaign's Gemma-4-E2B plan (campaign-compact.json, predicted-compact.txt), which ran past
# its timeout in call 4.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6 TRAINER_ARGS=--pool-summary
W=/tmp/s21e; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 90 benchmarks/run_on_gpu.sh "tests:fp16_steps or fp16_adapter or cuda_graph_steps" | tail -3; pack
echo '[{"seq": 2048, "rank": 128, "gc": true, "batch": 1}]' > /tmp/e2b.json
timeout 130 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/compact-held-out-e2b.jsonl" 2>/dev/null; pack
