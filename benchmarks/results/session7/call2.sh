#!/usr/bin/env bash
# session 7, call 2 (trimmed to the device time left)
export STEPS=6
echo '[{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "checkpointing": "offload", "head_quant": "int8", "lora_dtype": "bf16"}]' > /tmp/g31.json
G='{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 64}'
echo "[$G]" > /tmp/lean.json
benchmarks/run_on_gpu.sh 'tests:adamw8bit or fused_optim' enable:fused_optimizer trainer:llama-3.2-1b:/tmp/lean.json enable:
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
VRAMPLAN_ENABLE=fused_optimizer timeout 60 python3 -m benchmarks.memory_stages --config llama-3.2-1b --grid "$G" --steps 8 --grown-after 4 > "$OUT/stages-fixed.jsonl" 2>"$OUT/stages-fixed.err"; grep -v live "$OUT/stages-fixed.jsonl" | cut -c1-300
TRAINER_ARGS=--random-init benchmarks/run_on_gpu.sh trainer:gemma-4-31b:/tmp/g31.json
