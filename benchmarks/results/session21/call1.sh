#!/usr/bin/env bash
# Session 21, call 1 (~5 minutes):
# 1. RMSNorm with dW summed in one launch: the GPU tests, then the launch-setting sweep, CUDA-graph timed, with torch's
#    sum beside it at the default setting (benchmarks.kernel_sweep --only rmsnorm), against torch.compile and Liger;
# 2. where captured steps without checkpointing hold reserved bytes they never allocate (session 20: Qwen3-1.7B at
#    rank 128, 1.96 GB): ranks 16, 64 and 128 on Qwen3-1.7B at 1,024 tokens and rank 128 on Llama-3.2-1B, fresh
#    processes, torch's segments per pool after the steps, and the allocator's history of the rank-128 run
#    (benchmarks.memory_history), read off the machine.
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s21; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 100 benchmarks/run_on_gpu.sh "tests:rmsnorm" | tail -3; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 150 python3 -m benchmarks.kernel_sweep --only rmsnorm > "$W/rmsnorm-sweep.jsonl" 2>"$W/sweep-err.log"; pack
export STEPS=4 TRAINER_ARGS=--pool-summary
echo "[{\"seq\": 1024, \"rank\": 128, \"gc\": false, \"batch\": 1, \"memory_history\": \"$W/history-qwen3-1.7b-r128.pickle.gz\"},
       {\"seq\": 1024, \"rank\": 64, \"gc\": false, \"batch\": 1}, {\"seq\": 1024, \"rank\": 16, \"gc\": false, \"batch\": 1}]" > /tmp/qwen.json
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}]' > /tmp/llama.json
timeout 150 benchmarks/run_on_gpu.sh "trainer:qwen3-1.7b:/tmp/qwen.json" | cut -c1-110; pack
timeout 70 benchmarks/run_on_gpu.sh "trainer:llama-3.2-1b:/tmp/llama.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/pools.jsonl" 2>/dev/null; pack
