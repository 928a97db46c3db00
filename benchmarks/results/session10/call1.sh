#!/usr/bin/env bash
# session 10, call 1: (1) the campaign's three speed misses again, each followed by rounds of steps with the
# NVML sampling thread and without, alternating in one process (benchmarks/trainer.py --sampler-ab); (2) the
# QLoRA linear and RMSNorm kernel tables re-timed; (3) `vramplan calibrate` (eager, as shipped) of one small
# model per family at a shape no campaign row has, to correct the campaign's held-out rows with.
export STEPS=6 TRAINER_ARGS="--sampler-ab 4"
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 1024, $G}]" > /tmp/e2b.json
echo "[{\"seq\": 1024, \"batch\": 4, \"rank\": 16, \"gc\": true}, {\"seq\": 2048, \"batch\": 1, \"rank\": 16, \"gc\": false}]" > /tmp/llama.json
timeout 200 benchmarks/run_on_gpu.sh trainer:gemma-4-e2b-text:/tmp/e2b.json trainer:llama-3.2-1b:/tmp/llama.json
timeout 150 benchmarks/run_on_gpu.sh kernels:qlora_linear,rmsnorm | tail -5
timeout 200 benchmarks/results/session10/calibrate_models.sh llama-3.2-1b qwen3-0.6b gemma-4-e2b-text
