#!/usr/bin/env bash
# Session 20, call 4 (~1.5 minutes): where Qwen3-1.7B at rank 128 without checkpointing under CUDA graphs holds 1.96 GB
# reserved that it never allocates (calls 1 and 3 read the same bytes): torch's segments per pool after the steps
# (--pool-summary), fresh process.
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s20d; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}]' > /tmp/pools.json
timeout 90 benchmarks/run_on_gpu.sh "trainer:qwen3-1.7b:/tmp/pools.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/pools.jsonl" 2>/dev/null; cp "$W"/* "$ROOT"/
