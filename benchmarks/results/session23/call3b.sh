#!/usr/bin/env bash
# Session 23, call 3b (~3 minutes): call 3's A/B of held_eager_gradients cut to what the device time left allows:
# Qwen3-0.6B at rank 128 (2,048 tokens), then Qwen3-4B at rank 16, eager, off then on, fresh processes.
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s23c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
echo '[{"seq": 2048, "rank": 128, "gc": true, "batch": 1, "cuda_graphs": false}]' > /tmp/ab-qwen3-0.6b.json
echo '[{"seq": 2048, "rank": 16, "gc": true, "batch": 1, "cuda_graphs": false}]' > /tmp/ab-qwen3-4b.json
for model in qwen3-0.6b qwen3-4b; do
  timeout 100 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/ab-$model.json" enable:held_eager_gradients \
    "trainer:$model:/tmp/ab-$model.json" | cut -c1-110
  mv "$W/trainer.jsonl" "$W/ab-held-gradients-$model.jsonl" 2>/dev/null; pack
done
