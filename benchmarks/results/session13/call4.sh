#!/usr/bin/env bash
# session 13, call 4: Gemma 4's 512-wide heads through chunked cuBLAS attention (switch wide_head_attention,
# vramplan.train.attention) instead of SDPA's memory-efficient kernels: the GPU tests at E2B's full-layer shape and
# the Gemma 4 GPU tests, an A/B of Gemma-4-E2B at 2,048 tokens in fresh processes (off, on, off, on), the switch on at
# E2B 4,096 and E4B 2,048 (call 1 ran both off), and E2B's graph profile with it on.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/call4; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
G='"batch": 1, "gc": true'
echo "[{\"seq\": 2048, \"rank\": 16, $G}]" > /tmp/e2b2048.json
echo "[{\"seq\": 4096, \"rank\": 16, $G}]" > /tmp/e2b4096.json
timeout 80 benchmarks/run_on_gpu.sh "tests:wide_head or gemma4" | tail -4
pack() { tar czf "$ROOT/call4.tgz" -C "$W" .; }
pack
timeout 300 benchmarks/run_on_gpu.sh disable:wide_head_attention trainer:gemma-4-e2b-text:/tmp/e2b2048.json \
  disable: trainer:gemma-4-e2b-text:/tmp/e2b2048.json disable:wide_head_attention trainer:gemma-4-e2b-text:/tmp/e2b2048.json \
  disable: trainer:gemma-4-e2b-text:/tmp/e2b2048.json trainer:gemma-4-e2b-text:/tmp/e2b4096.json \
  trainer:gemma-4-e4b-text:/tmp/e2b2048.json | cut -c1-150
pack
timeout 60 benchmarks/run_on_gpu.sh profile_graphs:gemma-4-e2b-text:2048 | tail -2
pack
