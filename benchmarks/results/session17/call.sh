#!/usr/bin/env bash
# Session 17, one call (the device came rarely; session 16's next.sh and campaign.sh cut to what matters most):
# 1. the band's GPU trainer test with its bound measured in the run;
# 2. the band's shipped threshold (six windows, 3,072 tokens on Gemma 4) against SDPA's mask
#    (disable:sliding_band_attention) on E2B and E4B, fresh processes;
# 3. held out, the trainer as it ships: Gemma-4-E2B at ranks 32 and 128 and eager, Qwen3-4B without checkpointing,
#    Llama-3.2-1B at 8,192 tokens. Packed after every job.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/s17; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/s17.tgz" -C "$W" .; }
G='"batch": 1'
echo "[{\"seq\": 3072, \"rank\": 16, \"gc\": true, $G}]" > /tmp/g3072.json
echo "[{\"seq\": 2048, \"rank\": 32, \"gc\": true, $G}, {\"seq\": 2048, \"rank\": 128, \"gc\": true, $G}, {\"seq\": 2048, \"rank\": 16, \"gc\": true, \"cuda_graphs\": false, $G}]" > /tmp/e2b.json
echo "[{\"seq\": 1024, \"rank\": 16, \"gc\": false, $G}]" > /tmp/qwen4b.json
echo "[{\"seq\": 8192, \"rank\": 16, \"gc\": true, $G}]" > /tmp/llama.json
timeout 75 benchmarks/run_on_gpu.sh "tests:train_like_steps_under_the_mask" | tail -3; pack
for m in gemma-4-e2b-text gemma-4-e4b-text; do
  timeout 60 benchmarks/run_on_gpu.sh "trainer:$m:/tmp/g3072.json" | cut -c1-100
  timeout 60 benchmarks/run_on_gpu.sh disable:sliding_band_attention "trainer:$m:/tmp/g3072.json" | cut -c1-100; pack
done
mv "$W/trainer.jsonl" "$W/band-threshold.jsonl" 2>/dev/null
for job in 160:gemma-4-e2b-text:/tmp/e2b.json 55:qwen3-4b:/tmp/qwen4b.json 45:llama-3.2-1b:/tmp/llama.json; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}" | cut -c1-100; pack
done
mv "$W/trainer.jsonl" "$W/held-out.jsonl" 2>/dev/null; pack
