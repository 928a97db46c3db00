#!/usr/bin/env bash
# Session 18, one call (~9 minutes). 1. The GPU test of fp16 steps with the trainer's new dynamic loss scaling
# (tiny Llama and Gemma 4, against bf16). 2. fp16 compute (what fit plans for GPUs without bf16: T4, V100) with the
# loss scaling, without it (the trainer before session 18), and bf16, on the same seeded weights and batch:
# Llama-3.2-1B and Gemma-4-E2B at 2,048 tokens, fresh processes. 3. The band's shipped threshold (six windows: 3,072
# tokens on Gemma 4) against SDPA's mask (disable:sliding_band_attention) on E2B, rank 16, fresh processes.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/call18; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call1.tgz" -C "$W" .; }
timeout 100 benchmarks/run_on_gpu.sh tests:fp16_steps | tail -6; pack
cat > /tmp/dtype.json <<'JSON'
[{"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "fp16"},
 {"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "fp16", "loss_scaling": false},
 {"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "bf16"}]
JSON
for m in llama-3.2-1b:110 gemma-4-e2b-text:170; do
  timeout "${m#*:}" benchmarks/run_on_gpu.sh "trainer:${m%%:*}:/tmp/dtype.json" | cut -c1-160; pack
done
mv "$W/trainer.jsonl" "$W/fp16.jsonl" 2>/dev/null; pack
echo '[{"seq": 3072, "rank": 16, "gc": true, "batch": 1}]' > /tmp/g3072.json
timeout 95 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/g3072.json | cut -c1-100; pack
timeout 95 benchmarks/run_on_gpu.sh disable:sliding_band_attention trainer:gemma-4-e2b-text:/tmp/g3072.json | cut -c1-100
mv "$W/trainer.jsonl" "$W/band-threshold.jsonl" 2>/dev/null; pack
