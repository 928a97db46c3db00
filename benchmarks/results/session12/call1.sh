#!/usr/bin/env bash
# session 12, call 1 (session 11's call7.sh, graph half): under CUDA graphs torch's reserved - allocated grew with
# the trainable parameters in session 11 (0.39 GB at rank 128 on Llama-3.2-1B, 0.58 GB at rank 64 x batch 2 on
# Qwen3-4B), which the planner's 170 MB floor does not model. A rank sweep on two models to fit that slope;
# Gemma-4-E2B held out to test it. Each configuration in its own process. Priced by the planner at b5c09cf.
export TRITON_CACHE_AUTOTUNING=1 STEPS=4
R='"batch": 1, "gc": true, "seq": 2048'
echo "[{$R, \"rank\": 8}, {$R, \"rank\": 32}, {$R, \"rank\": 64}, {$R, \"rank\": 256}]" > /tmp/ranks.json
echo "[{$R, \"rank\": 32}, {$R, \"rank\": 128}]" > /tmp/heldout.json
timeout 560 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/ranks.json trainer:qwen3-4b:/tmp/ranks.json \
  trainer:gemma-4-e2b-text:/tmp/heldout.json | cut -c1-120
mv "$OUT/trainer.jsonl" "$OUT/trainer-rank-sweep-graphs.jsonl" 2>/dev/null
