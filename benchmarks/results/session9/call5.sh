#!/usr/bin/env bash
# session 9, call 5: memory_stages on Qwen3-4B and Llama-3.2-1B (call 4's Qwen3-4B lines did not come back),
# all lines in one file, with the Triton kernels' local memory listed (call 4's listing missed every kernel).
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/vramplan_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
G='{"seq": 2048, "batch": 1, "rank": 16, "gc": true}'
for m in qwen3-4b llama-3.2-1b; do
  echo "{\"model\": \"$m\"}" >> "$OUT/stages.jsonl"
  timeout 120 python3 -m benchmarks.memory_stages --config $m --grid "$G" --steps 3 2>/dev/null >> "$OUT/stages.jsonl"
done
