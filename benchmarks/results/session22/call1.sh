#!/usr/bin/env bash
# Session 22, call 1 (~9 minutes): the compact campaign's Gemma-4-E2B plan (session21/campaign-compact.json,
# predicted-compact.txt) that session 21's call 5 was to run; the gated-MLP kernel table, timed eager and replayed
# from a CUDA graph (#3: E2B's GeGLU read 0.97x Liger eager in session 13); then every GPU-marked test (the whole
# suite has not run in one go since session 5; compact captures landed in session 21 after only the captured-step
# tests ran).
export TRITON_CACHE_AUTOTUNING=1 STEPS=6 TRAINER_ARGS=--pool-summary
W=/tmp/s22a; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
echo '[{"seq": 2048, "rank": 128, "gc": true, "batch": 1}]' > /tmp/e2b.json
timeout 120 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/compact-held-out-e2b.jsonl" 2>/dev/null; pack
timeout 110 benchmarks/run_on_gpu.sh kernels:glu | tail -12; pack
timeout 340 benchmarks/run_on_gpu.sh tests | tail -30; pack
