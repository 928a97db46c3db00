#!/usr/bin/env bash
# session 10, call 2: (1) the trainer as it now ships (the optimizer's step queued before the loss is read:
# train_step, switch overlap_optimizer) on six configurations, each in its own process, measured after the
# speed model priced the overlap (held out), each followed by rounds of overlapped and waiting steps in one
# process (benchmarks/trainer.py --overlap-ab); (2) `vramplan calibrate` of two larger models.
export STEPS=8 TRAINER_ARGS="--overlap-ab 4"
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 1024, $G}]" > /tmp/s1024.json
echo "[{\"seq\": 2048, $G}]" > /tmp/s2048.json
echo "[{\"seq\": 1024, $G}, {\"seq\": 1024, \"batch\": 4, \"rank\": 16, \"gc\": true}, {\"seq\": 2048, \"batch\": 1, \"rank\": 16, \"gc\": false}]" > /tmp/llama.json
timeout 330 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/s1024.json trainer:llama-3.2-1b:/tmp/llama.json \
  trainer:qwen3-0.6b:/tmp/s2048.json trainer:qwen3-4b:/tmp/s2048.json
timeout 200 benchmarks/results/session10/calibrate_models.sh gemma-4-e4b-text qwen3-4b
