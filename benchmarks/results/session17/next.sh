#!/usr/bin/env bash
# Ready for session 18 (one call, ~9 minutes): the band's shipped threshold (six windows: 3,072 tokens on Gemma 4)
# against SDPA's mask (disable:sliding_band_attention), E2B and E4B, rank 16, fresh processes (session 17's runs of it
# had 60 s each and none finished: a model takes ~20 s to save before its steps); then two more held-out runs of the
# trainer as it ships: Gemma-4-E4B at 4,096 tokens under graphs, Qwen3-4B at 2,048 eager. Packed after every job.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/next18; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/next18.tgz" -C "$W" .; }
echo '[{"seq": 3072, "rank": 16, "gc": true, "batch": 1}]' > /tmp/g3072.json
echo '[{"seq": 4096, "rank": 16, "gc": true, "batch": 1}]' > /tmp/e4b.json
echo '[{"seq": 2048, "rank": 16, "gc": true, "cuda_graphs": false, "batch": 1}]' > /tmp/qwen.json
for m in gemma-4-e2b-text gemma-4-e4b-text; do
  timeout 95 benchmarks/run_on_gpu.sh "trainer:$m:/tmp/g3072.json" | cut -c1-100; pack
  timeout 95 benchmarks/run_on_gpu.sh disable:sliding_band_attention "trainer:$m:/tmp/g3072.json" | cut -c1-100; pack
done
mv "$W/trainer.jsonl" "$W/band-threshold.jsonl" 2>/dev/null
timeout 95 benchmarks/run_on_gpu.sh trainer:gemma-4-e4b-text:/tmp/e4b.json | cut -c1-100; pack
timeout 80 benchmarks/run_on_gpu.sh trainer:qwen3-4b:/tmp/qwen.json | cut -c1-100
mv "$W/trainer.jsonl" "$W/held-out.jsonl" 2>/dev/null; pack
