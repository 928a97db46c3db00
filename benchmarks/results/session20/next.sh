#!/usr/bin/env bash
# For the next session, one call (~5 minutes): where captured steps without checkpointing hold reserved bytes they never
# allocate (session 20: Qwen3-1.7B at rank 128, 1.96 GB; rank 8-16 runs 0.15-0.19 GB). torch's segments per pool after
# the steps (--pool-summary) across ranks 16, 64 and 128 on Qwen3-1.7B at 1,024 tokens and rank 128 on Llama-3.2-1B,
# fresh processes; the reserved peak by phase comes with every line. Each model's first child reads the lowest
# baseline (records.previous_process_bytes), so the paging children after it are corrected as the accuracy table does.
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/next20; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}, {"seq": 1024, "rank": 64, "gc": false, "batch": 1},
       {"seq": 1024, "rank": 16, "gc": false, "batch": 1}]' > /tmp/qwen.json
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}]' > /tmp/llama.json
timeout 140 benchmarks/run_on_gpu.sh "trainer:qwen3-1.7b:/tmp/qwen.json" | cut -c1-110; pack
timeout 70 benchmarks/run_on_gpu.sh "trainer:llama-3.2-1b:/tmp/llama.json" | cut -c1-110; pack
mv "$W/trainer.jsonl" "$W/pools.jsonl" 2>/dev/null; pack
