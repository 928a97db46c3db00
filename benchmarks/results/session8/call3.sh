#!/usr/bin/env bash
# session 8, call 3: the spread of Llama-3.2-1B's process memory with tiled MLPs (each configuration twice,
# each in its own process, the untiled run beside them); causal-capture graph profiles for the speed
# model; RoPE's launch settings beyond 4 tokens a program.
export STEPS=6
B='"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 64'
T2="{$B, \"mlp_tiles\": 2}"; T4="{$B, \"mlp_tiles\": 4}"; T2B="{$B, \"lora_dtype\": \"bf16\", \"mlp_tiles\": 2}"
echo "[{$B}, $T2, $T4, $T2B, $T2, $T4, $T2B]" > /tmp/spread.json
benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/spread.json
cp "$OUT/trainer.jsonl" "$OUT/trainer-spread.jsonl"
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 150 python3 -m benchmarks.kernel_sweep --only rope --rope-tokens default,4,8,16 --rope-warps default,1,2,4 \
  > "$OUT/sweep-rope.jsonl" 2> "$OUT/sweep-rope.err"; tail -2 "$OUT/sweep-rope.err"
benchmarks/run_on_gpu.sh profile_graphs:llama-3.2-1b:2048 profile_graphs:gemma-4-e2b-text:2048
