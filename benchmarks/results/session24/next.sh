#!/usr/bin/env bash
# For the next session (~5 minutes; session 24's device time ran out). Most needed first:
# 1. (#5) Gemma 4's eager allocated peak: every eager checkpointed line outside Gemma 4 is priced within 20 MB of
#    torch's allocated peak since session 24, Gemma-4-E2B and E4B 0.15-0.20 GB under. The allocator's history of one
#    eager E2B step (python -m benchmarks.memory_history FILE --pools) says which tensors the planner misses.
# 2. (#6) session 24's eager campaign ran four steps a line and read 29% mean speed error (steps 0.26-0.39 s whatever
#    their work); two of its plans again with eight steps say whether the short runs or the host did it.
export TRITON_CACHE_AUTOTUNING=1 TRAINER_ARGS=--pool-summary
W=/tmp/s25; source benchmarks/device_staging.sh
echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
        \"memory_history\": \"$W/history-eager-e2b-2048.pickle.gz\"}]" > /tmp/eager-e2b.json
STEPS=3 timeout 120 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/eager-e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-history-e2b.jsonl" 2>/dev/null; pack
echo '[{"seq": 4096, "rank": 128, "gc": true, "batch": 1, "cuda_graphs": false},
       {"seq": 1024, "rank": 64, "gc": true, "batch": 2, "cuda_graphs": false}]' > /tmp/steps-1b.json
echo '[{"seq": 2048, "rank": 32, "gc": true, "batch": 1, "cuda_graphs": false}]' > /tmp/steps-3b.json
STEPS=8 timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/steps-1b.json | cut -c1-110; pack
STEPS=8 timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-3b:/tmp/steps-3b.json | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-eight-steps.jsonl" 2>/dev/null; pack
