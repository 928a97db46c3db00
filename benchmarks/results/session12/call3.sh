#!/usr/bin/env bash
# session 12, call 3, two A/Bs on the trainer as it ships (CUDA graphs), each run in a fresh process, alternating:
# 1. Gemma 4's RoPE through the Triton kernel (switch rope_gemma4) against transformers' unfused RoPE. Session 5
#    kept Gemma 4 unfused on an eager A/B, where host work decided; session 8's graph profile of Gemma-4-E2B shows
#    transformers' RoPE as ~15 ms of small kernels a step. A B A B on E2B at 2,048 tokens, A B on E4B at 1,024.
# 2. Paged states prefetched on their first step only (switch prefetch_paged off): session 12's rank sweep grew
#    ~21 us of host time per cudaMemPrefetchAsync. Llama-3.2-1B at rank 64 (192 paged tensors), 2,048 tokens, A B A B.
# Losses are compared too.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
echo '[{"seq": 2048, "batch": 1, "rank": 16, "gc": true}]' > /tmp/e2b.json
echo '[{"seq": 1024, "batch": 1, "rank": 16, "gc": true}]' > /tmp/e4b.json
echo '[{"seq": 2048, "batch": 1, "rank": 64, "gc": true}]' > /tmp/r64.json
timeout 540 benchmarks/run_on_gpu.sh tests:rope \
  trainer:llama-3.2-1b:/tmp/r64.json disable:prefetch_paged trainer:llama-3.2-1b:/tmp/r64.json \
  disable: trainer:llama-3.2-1b:/tmp/r64.json disable:prefetch_paged trainer:llama-3.2-1b:/tmp/r64.json disable: \
  trainer:gemma-4-e2b-text:/tmp/e2b.json enable:rope_gemma4 trainer:gemma-4-e2b-text:/tmp/e2b.json \
  enable: trainer:gemma-4-e2b-text:/tmp/e2b.json enable:rope_gemma4 trainer:gemma-4-e2b-text:/tmp/e2b.json \
  enable: trainer:gemma-4-e4b-text:/tmp/e4b.json enable:rope_gemma4 trainer:gemma-4-e4b-text:/tmp/e4b.json | cut -c1-160
mv "$OUT/trainer.jsonl" "$OUT/ab-rope-prefetch.jsonl" 2>/dev/null
