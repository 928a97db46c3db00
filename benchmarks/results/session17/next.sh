#!/usr/bin/env bash
# Ready for session 18 (one call, ~8 minutes). 1. The band's shipped threshold (six windows: 3,072 tokens on Gemma 4)
# against SDPA's mask (disable:sliding_band_attention) on E2B, rank 16, fresh processes (session 17's runs of it had
# 60 s each and none finished: a model takes ~20 s to save before its steps). 2. fp16 compute, which fit now plans for
# GPUs without bf16 (T4, V100), against bf16 on the same seeded weights and batch: Gemma-4-E2B and Llama-3.2-1B at
# 2,048 tokens; the losses should track and stay finite (the trainer has no loss scaling). E4B's band A/B next.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/next18; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next18.tgz" -C "$W" .; }
echo '[{"seq": 3072, "rank": 16, "gc": true, "batch": 1}]' > /tmp/g3072.json
timeout 95 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/g3072.json | cut -c1-100; pack
timeout 95 benchmarks/run_on_gpu.sh disable:sliding_band_attention trainer:gemma-4-e2b-text:/tmp/g3072.json | cut -c1-100
mv "$W/trainer.jsonl" "$W/band-threshold.jsonl" 2>/dev/null; pack
for m in gemma-4-e2b-text:80 llama-3.2-1b:55; do
  for dtype in fp16 bf16; do
    echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"compute_dtype\": \"$dtype\"}]" > /tmp/dtype.json
    timeout "${m#*:}" benchmarks/run_on_gpu.sh "trainer:${m%%:*}:/tmp/dtype.json" | cut -c1-120; pack
  done
done
mv "$W/trainer.jsonl" "$W/fp16.jsonl" 2>/dev/null; pack
