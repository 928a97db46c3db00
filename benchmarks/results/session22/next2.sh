#!/usr/bin/env bash
# For the next session (~5 minutes), after next.sh; session 22 could start no machine. Most needed first:
# 1. (#5) what a paging process leaves on the device and whether a small managed allocation made before the baseline
#    takes it over (benchmarks.outside_allocator --sequence, as call 1);
# 2. the trainer's GPU tests (captured steps, fp16 steps), which compact captures (session 21) changed;
# 3. (#3) the gated-MLP kernel table, eager and CUDA-graph timed (E2B's GeGLU read 0.97x Liger eager in session 13);
# 4. (#5) the allocator's history of two eager runs (benchmarks.memory_history), to see the small pool's share.
W=/tmp/s22b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
benchmarks/run_on_gpu.sh >/dev/null 2>&1  # installs the wheels, writes gpu.txt
PYTHONPATH="$PWD:/tmp/shim:/tmp/site" timeout 60 python3 -m benchmarks.outside_allocator --sequence paged:96:131072 \
  prepaged:96:131072 nothing prepaged:96:131072 paged:96:131072 paged:96:131072 > "$W/leftover.jsonl" 2>"$W/leftover-err.log"
cut -c1-150 "$W/leftover.jsonl"; pack
timeout 100 benchmarks/run_on_gpu.sh tests:test_train_gpu | tail -4; pack
timeout 100 benchmarks/run_on_gpu.sh kernels:glu | tail -12; pack
export TRITON_CACHE_AUTOTUNING=1 STEPS=3 TRAINER_ARGS=--pool-summary
for job in 75:qwen3-4b:2048 50:qwen3-0.6b:1024; do
  IFS=: read -r t model seq <<<"$job"
  echo "[{\"seq\": $seq, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
          \"memory_history\": \"$W/history-eager-$model-$seq.pickle.gz\"}]" > "/tmp/eager-$model.json"
  timeout "$t" benchmarks/run_on_gpu.sh "trainer:$model:/tmp/eager-$model.json" | cut -c1-110
  mv "$W/trainer.jsonl" "$W/eager-slack-$model.jsonl" 2>/dev/null; pack
done
