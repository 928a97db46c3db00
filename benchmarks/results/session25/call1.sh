#!/usr/bin/env bash
# Session 25, call 1 (~6 minutes), most needed first:
# 1. (#5) Gemma 4's eager allocated peak: every eager checkpointed line outside Gemma 4 is priced within 20 MB of
#    torch's allocated peak since session 24, Gemma-4-E2B and E4B 0.15-0.20 GB under. The allocator's history of one
#    eager E2B step (python -m benchmarks.memory_history FILE --pools) says which tensors the planner misses.
# 2. (#6) session 24's eager campaign read 29% mean speed error, steps taking about host + GPU time as if they did not
#    overlap. Profiles of its two worst plans with --syncs: where a step waits on the GPU before its end.
# 3. (#6) two of its plans again with eight steps: whether the short runs did it.
export TRITON_CACHE_AUTOTUNING=1 TRAINER_ARGS=--pool-summary
W=/tmp/s25; source benchmarks/device_staging.sh
echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
        \"memory_history\": \"$W/history-eager-e2b-2048.pickle.gz\"}]" > /tmp/eager-e2b.json
STEPS=3 timeout 120 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/eager-e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-history-e2b.jsonl" 2>/dev/null; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1  # run_on_gpu.sh installed the wheels and the shim
for plan in "llama-3.2-1b --seq 4096 --rank 128" "llama-3.2-3b --seq 2048 --rank 32" "llama-3.2-1b --seq 1024 --rank 64 --batch 2"; do
  echo "== $plan" >> "$W/profiles-eager.txt"
  timeout 90 python3 -m benchmarks.profile_trainer --config $plan --syncs --rows 25 >> "$W/profiles-eager.txt" 2>&1
done
grep -E "^==|^eager|^wall|^sync" "$W/profiles-eager.txt" | cut -c1-160; pack
echo '[{"seq": 4096, "rank": 128, "gc": true, "batch": 1, "cuda_graphs": false},
       {"seq": 1024, "rank": 64, "gc": true, "batch": 2, "cuda_graphs": false}]' > /tmp/steps-1b.json
echo '[{"seq": 2048, "rank": 32, "gc": true, "batch": 1, "cuda_graphs": false}]' > /tmp/steps-3b.json
STEPS=8 timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/steps-1b.json | cut -c1-110; pack
STEPS=8 timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-3b:/tmp/steps-3b.json | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-eight-steps.jsonl" 2>/dev/null; pack
