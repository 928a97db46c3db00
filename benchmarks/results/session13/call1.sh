#!/usr/bin/env bash
# session 13, call 1 (session 12's next.sh): a held-out campaign of the trainer as it ships after session 12 (paged states prefetched once,
# Gemma 4's Triton RoPE on captured steps), priced by the planner and the speed model at the commit that runs it:
# ranks 16-64, 1,024-4,096 tokens, five models, each in a fresh process; then Gemma-4-E2B's graph profile at 2,048
# tokens with today's defaults, to see what its step still spends beyond the priced device work.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
G='"batch": 1, "gc": true'
echo "[{\"seq\": 1024, \"rank\": 64, $G}, {\"seq\": 4096, \"rank\": 16, $G}]" > /tmp/llama.json
echo "[{\"seq\": 4096, \"rank\": 32, $G}]" > /tmp/qwen4b.json
echo "[{\"seq\": 1024, \"rank\": 32, $G}, {\"seq\": 4096, \"rank\": 16, $G}]" > /tmp/e2b.json
echo "[{\"seq\": 2048, \"rank\": 16, $G}]" > /tmp/one.json
timeout 560 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/llama.json trainer:qwen3-4b:/tmp/qwen4b.json \
  trainer:gemma-4-e2b-text:/tmp/e2b.json trainer:gemma-4-e4b-text:/tmp/one.json trainer:qwen3-0.6b:/tmp/one.json \
  profile_graphs:gemma-4-e2b-text:2048 | cut -c1-160
mv "$OUT/trainer.jsonl" "$OUT/trainer-campaign13.jsonl" 2>/dev/null
