#!/usr/bin/env bash
# Session 22, call 2 (~4 minutes), #5: the eager trainer's slack (reserved - allocated at the peak: 0.01-0.35 GB over 17 runs, priced at one 0.17 GB
#    floor): Qwen3-4B at 2,048 tokens (0.205 GB in session 12), Qwen3-0.6B at 1,024 (0.067) and Llama-3.2-1B at 2,048
#    (0.06-0.10), eager, fresh processes, pool summaries and the allocator's history of each (benchmarks.memory_history).
export TRITON_CACHE_AUTOTUNING=1 STEPS=4 TRAINER_ARGS=--pool-summary
W=/tmp/s22b; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
benchmarks/run_on_gpu.sh >/dev/null 2>&1  # installs the wheels, writes gpu.txt
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
for job in 110:qwen3-4b:2048 70:qwen3-0.6b:1024 70:llama-3.2-1b:2048; do
  IFS=: read -r t model seq <<<"$job"
  echo "[{\"seq\": $seq, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
          \"memory_history\": \"$W/history-eager-$model-$seq.pickle.gz\"}]" > "/tmp/eager-$model.json"
  timeout "$t" benchmarks/run_on_gpu.sh "trainer:$model:/tmp/eager-$model.json" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/eager-slack.jsonl" 2>/dev/null; pack
