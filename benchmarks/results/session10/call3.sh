#!/usr/bin/env bash
# session 10, call 3: (1) the optimizer step queued whole (switch queued_optimizer: bitsandbytes without its last
# sync, one foreach zeroing) beside the overlapped and the waiting step, alternating in one process; (2) the
# rewritten fused NF4 matmul for small token counts (branch fused-small-m): its GPU test at Llama-3.1-8B's
# up projection, then fused against dequantize + cuBLAS, graph-timed fwd+bwd.
export STEPS=6 TRAINER_ARGS="--overlap-ab 3" TRITON_CACHE_AUTOTUNING=1
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 1024, $G}]" > /tmp/s1024.json
echo "[{\"seq\": 2048, $G}]" > /tmp/s2048.json
timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/s1024.json trainer:qwen3-0.6b:/tmp/s2048.json | cut -c1-400
timeout 80 benchmarks/run_on_gpu.sh 'tests:fused_matches_dequant_at_llama_8b_up and 64'
timeout 110 benchmarks/run_on_gpu.sh py:benchmarks.fused_small_m
