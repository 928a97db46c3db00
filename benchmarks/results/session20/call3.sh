#!/usr/bin/env bash
# Session 20, call 3 (~7 minutes), after the campaign's two misses (both eager) and its one memory outlier:
# 1. eager steps against the host's speed, now probed in every line (host_dispatch_us): Gemma-4-E2B at 2,048 tokens
#    eager (session 17 ran it: 4,293 tok/s), Qwen3-4B eager at 2,048 (the campaign's, 6,924; session 12's 5,672),
#    Llama-3.2-1B at 2,048 eager and offloaded (session 11: 9,739 and 10,730; the campaign's offload 18,207);
# 2. where Qwen3-1.7B at rank 128 without checkpointing reserves 1.96 GB it never allocates (reserved peak by phase),
#    under CUDA graphs and eager;
# 3. the module where Gemma-4-E2B's fp16 gradients first overflow at 2,048 tokens (benchmarks/fp16_overflow.py).
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/s20c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
G='"rank": 16, "gc": true, "batch": 1'
echo "[{\"seq\": 2048, $G, \"cuda_graphs\": false}]" > /tmp/eager.json
echo "[{\"seq\": 2048, $G, \"cuda_graphs\": false}, {\"seq\": 2048, $G, \"checkpointing\": \"offload\"}]" > /tmp/llama.json
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}, {"seq": 1024, "rank": 128, "gc": false, "batch": 1, "cuda_graphs": false}]' > /tmp/r128.json
for job in 75:gemma-4-e2b-text:/tmp/eager.json 65:qwen3-4b:/tmp/eager.json 65:llama-3.2-1b:/tmp/llama.json 80:qwen3-1.7b:/tmp/r128.json; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}" | cut -c1-110; pack
done
mv "$W/trainer.jsonl" "$W/host-and-slack.jsonl" 2>/dev/null; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 170 python3 -m benchmarks.fp16_overflow --model gemma-4-e2b-text --seq 2048 --variants 1 --scales 16,10,4 2>"$W/e2b-err.log" \
  | tee "$W/fp16-overflow-e2b.jsonl" | cut -c1-300; pack
