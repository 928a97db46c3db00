#!/usr/bin/env bash
# Session 22, call 1 (what fits in the device time six refused starts left; the run's limit cuts the rest):
# 1. (#5) What a paging process leaves on the device, whether NVML's per-process figure sees it, and whether a small
#    managed allocation made before the baseline takes it over (benchmarks.outside_allocator --sequence).
# 3. (#3) The gated-MLP kernel table, timed eager and replayed from a CUDA graph (E2B's GeGLU read 0.97x Liger eager
#    in session 13).
# 2. Every GPU-marked test: the whole suite has not run in one go since session 5, and compact captures landed in
#    session 21 after only the captured-step tests ran.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6 TRAINER_ARGS=--pool-summary
W=/tmp/s22a; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
benchmarks/run_on_gpu.sh >/dev/null 2>&1  # installs the wheels, writes gpu.txt
PYTHONPATH="$PWD:/tmp/shim:/tmp/site" timeout 60 python3 -m benchmarks.outside_allocator --sequence paged:96:131072 \
  prepaged:96:131072 nothing prepaged:96:131072 paged:96:131072 paged:96:131072 > "$W/leftover.jsonl" 2>"$W/leftover-err.log"
cut -c1-150 "$W/leftover.jsonl"; pack
timeout 250 benchmarks/run_on_gpu.sh tests | tail -30; pack
timeout 100 benchmarks/run_on_gpu.sh kernels:glu | tail -12; pack
# 4. (#5, as time allows) the eager trainer's slack: reserved - allocated at the peak, 0.01-0.35 GB over 17 runs, priced
#    at one 0.17 GB floor; Qwen3-4B at 2,048 tokens (0.205 GB, the same to the byte in sessions 12 and 21) and Qwen3-0.6B
#    at 1,024 (0.067), eager, fresh processes, pool summaries and the allocator's history (benchmarks.memory_history).
export STEPS=3
for job in 75:qwen3-4b:2048 50:qwen3-0.6b:1024; do
  IFS=: read -r t model seq <<<"$job"
  echo "[{\"seq\": $seq, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
          \"memory_history\": \"$W/history-eager-$model-$seq.pickle.gz\"}]" > "/tmp/eager-$model.json"
  timeout "$t" benchmarks/run_on_gpu.sh "trainer:$model:/tmp/eager-$model.json" | cut -c1-110
  mv "$W/trainer.jsonl" "$W/eager-slack-$model.jsonl" 2>/dev/null; pack
done
