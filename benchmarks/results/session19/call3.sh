#!/usr/bin/env bash
# Session 19, call 3: fp16 steps with the adapters' weight gradients written in fp32 (kernels/qlora_linear.py).
# 1. The GPU fp16 test and the QLoRA linear's GPU tests. 2. fp16 (loss-scaled) against bf16 on Llama-3.2-1B and
# Gemma-4-E2B at 2,048 tokens, same seeded weights and batch, fresh processes (call 1 ran the same before the fix).
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/call19c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 150 benchmarks/run_on_gpu.sh "tests:fp16_steps or fp16_adapter or gpu_matches_reference_at_real_shapes" | tail -4; pack
cat > /tmp/dtype.json <<'JSON'
[{"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "fp16"},
 {"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "bf16"}]
JSON
for m in llama-3.2-1b:90 gemma-4-e2b-text:130; do
  timeout "${m#*:}" benchmarks/run_on_gpu.sh "trainer:${m%%:*}:/tmp/dtype.json" | cut -c1-120; pack
done
mv "$W/trainer.jsonl" "$W/fp16-fixed.jsonl" 2>/dev/null; pack
