#!/usr/bin/env bash
# Session 18's call 1 cut to the device time left (~6 minutes): the fp16 GPU test, then fp16 with loss scaling, without
# it, and bf16 on Llama-3.2-1B at 2,048 tokens, then E2B fp16 (scaled) against bf16. The band A/B waits.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/call18; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call2.tgz" -C "$W" .; }
timeout 90 benchmarks/run_on_gpu.sh tests:fp16_steps | tail -6; pack
row='"seq": 2048, "rank": 16, "gc": true, "batch": 1'
echo "[{$row, \"compute_dtype\": \"fp16\"}, {$row, \"compute_dtype\": \"fp16\", \"loss_scaling\": false}, {$row, \"compute_dtype\": \"bf16\"}]" > /tmp/llama.json
echo "[{$row, \"compute_dtype\": \"fp16\"}, {$row, \"compute_dtype\": \"bf16\"}]" > /tmp/e2b.json
timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/llama.json | cut -c1-160; pack
timeout 130 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/e2b.json | cut -c1-160; pack
mv "$W/trainer.jsonl" "$W/fp16.jsonl" 2>/dev/null; pack
