#!/usr/bin/env bash
# Session 18's last ~4 minutes of device time: the fp16 GPU test, then Llama-3.2-1B at 2,048 tokens in fp16 with the
# loss scaling, without it, and in bf16 (same seeded weights and batch, fresh processes).
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
W=/tmp/call18; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call3.tgz" -C "$W" .; }
timeout 90 benchmarks/run_on_gpu.sh tests:fp16_steps | tail -6; pack
row='"seq": 2048, "rank": 16, "gc": true, "batch": 1'
echo "[{$row, \"compute_dtype\": \"fp16\"}, {$row, \"compute_dtype\": \"fp16\", \"loss_scaling\": false}, {$row, \"compute_dtype\": \"bf16\"}]" > /tmp/llama.json
timeout 110 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/llama.json | cut -c1-160
mv "$W/trainer.jsonl" "$W/fp16.jsonl" 2>/dev/null; pack
