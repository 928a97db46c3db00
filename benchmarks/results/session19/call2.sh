#!/usr/bin/env bash
# Session 19, call 2: where Gemma 4's fp16 steps overflow (call 1: E2B's overflowed at every scale 2^16..2^10).
# Tiny Gemma 4 (the GPU test's) and Gemma-4-E2B (random weights, 512 tokens): the highest finite loss scale per
# variant of the trainer's patches, and the first modules whose backward turned finite gradients non-finite.
W=/tmp/call19; mkdir -p "$W"; ROOT=$OUT
bash -c 'OUT=/tmp/call19 benchmarks/run_on_gpu.sh >/dev/null 2>&1'  # installs the wheels, writes gpu.txt
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1
timeout 200 python3 -m benchmarks.fp16_overflow 2>"$W/tiny-err.log" | tee "$W/fp16-overflow.jsonl" | cut -c1-300
cp "$W"/* "$ROOT"/ 2>/dev/null
timeout 300 python3 -m benchmarks.fp16_overflow --model gemma-4-e2b-text --seq 512 2>"$W/e2b-err.log" | tee -a "$W/fp16-overflow.jsonl" | cut -c1-300
cp "$W"/* "$ROOT"/ 2>/dev/null
