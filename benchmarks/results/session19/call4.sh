#!/usr/bin/env bash
# Session 19, call 4: after the fp32 adapter gradients, where Gemma-4-E2B's fp16 steps still overflow (call 3): the
# highest finite scale at 2,048 tokens (checkpointing full, as the trainer ran, and none), and without checkpointing
# the first modules whose backward turned finite gradients non-finite at 2^16, and which adapters' gradients did.
W=/tmp/call19d; mkdir -p "$W"; ROOT=$OUT
bash -c 'OUT=/tmp/call19d benchmarks/run_on_gpu.sh >/dev/null 2>&1'
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1
timeout 170 python3 -m benchmarks.fp16_overflow --model gemma-4-e2b-text --seq 2048 --variants 1,0 2>"$W/e2b-err.log" | tee "$W/fp16-overflow-e2b.jsonl" | cut -c1-200
cp "$W"/* "$ROOT"/ 2>/dev/null
