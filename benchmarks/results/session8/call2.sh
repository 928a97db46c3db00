#!/usr/bin/env bash
# session 8, call 2: Llama-3.2-1B under 1.6 GB with tiled MLPs (Plan.mlp_tiles), an SDPA-backend A/B of
# the memory outside the pool, the RoPE/RMSNorm defaults graph-timed, and the GPU tests of what changed.
export STEPS=6
B='"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 64'
echo "[{$B, \"lora_dtype\": \"bf16\"}, {$B, \"lora_dtype\": \"bf16\", \"mlp_tiles\": 2}, {$B, \"lora_dtype\": \"bf16\", \"mlp_tiles\": 4}, {$B, \"mlp_tiles\": 4}]" > /tmp/tiles.json
echo "[{$B, \"lora_dtype\": \"bf16\", \"mlp_tiles\": 4}]" > /tmp/tiles4.json
benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/tiles.json 'tests:tiled or glu or rope or rmsnorm' kernels:rope,rmsnorm
cp "$OUT/trainer.jsonl" "$OUT/trainer-tiles.jsonl" 2>/dev/null
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
# the same tiled run with cuDNN's attention off (SDPA falls back to flash): what its kernels hold outside the pool.
# A sitecustomize turns it off in the --fresh children too.
mkdir -p /tmp/nocudnn && printf 'import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\n' > /tmp/nocudnn/sitecustomize.py
PYTHONPATH="/tmp/nocudnn:$PYTHONPATH" timeout 150 python3 -m benchmarks.trainer --fresh --config llama-3.2-1b --grid /tmp/tiles4.json --steps 6 \
  2>>"$OUT/trainer-err.log" | sed 's/^{"seq"/{"sdpa_cudnn": false, "seq"/' | tee "$OUT/trainer-nocudnn.jsonl"
