#!/usr/bin/env bash
# session 9, call 4: where the 128 MiB outside torch's pool that Qwen3-0.6B's and 1.7B's runs lacked (and every
# other model's carried) comes from: memory_stages on Qwen3-0.6B and Qwen3-4B, one process each; RoPE's
# reversed token order graph-timed as the default, and its GPU tests.
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
G='{"seq": 2048, "batch": 1, "rank": 16, "gc": true}'
benchmarks/run_on_gpu.sh tests:rope kernels:rope
for m in qwen3-0.6b qwen3-4b; do
  timeout 120 python3 -m benchmarks.memory_stages --config $m --grid "$G" --steps 3 > "$OUT/stages-$m.jsonl" 2> "$OUT/stages-$m.err"
  tail -1 "$OUT/stages-$m.err"
done
