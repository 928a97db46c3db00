#!/usr/bin/env bash
# Session 17: a held-out campaign of the trainer as it ships (aligned chunks, the band from six windows), priced by
# the commit that runs it and fitted by nothing. It re-measures the configurations whose older lines the speed
# model misses by more than 15% (Gemma-4-E2B at ranks 32 and 128, measured in session 12 before paged states were
# prefetched once; Qwen3-4B without checkpointing; Llama-3.2-1B at 8,192 tokens and rank 128; eager Qwen3-4B and
# Gemma-4-E2B), plus Gemma-4-E4B at 4,096 tokens. Each in a fresh process, 8 steps; packed after every model.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/campaign17; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/campaign17.tgz" -C "$W" .; }
G='"batch": 1'
echo "[{\"seq\": 2048, \"rank\": 32, \"gc\": true, $G}, {\"seq\": 2048, \"rank\": 128, \"gc\": true, $G}, {\"seq\": 2048, \"rank\": 16, \"gc\": true, \"cuda_graphs\": false, $G}]" > /tmp/e2b.json
echo "[{\"seq\": 1024, \"rank\": 16, \"gc\": false, $G}, {\"seq\": 2048, \"rank\": 16, \"gc\": true, \"cuda_graphs\": false, $G}]" > /tmp/qwen4b.json
echo "[{\"seq\": 8192, \"rank\": 16, \"gc\": true, $G}, {\"seq\": 2048, \"rank\": 128, \"gc\": true, $G}]" > /tmp/llama.json
echo "[{\"seq\": 4096, \"rank\": 16, \"gc\": true, $G}]" > /tmp/e4b.json
for job in 220:gemma-4-e2b-text:/tmp/e2b.json 150:qwen3-4b:/tmp/qwen4b.json 110:llama-3.2-1b:/tmp/llama.json \
    75:gemma-4-e4b-text:/tmp/e4b.json; do
  timeout "${job%%:*}" benchmarks/run_on_gpu.sh "trainer:${job#*:}" | cut -c1-120; pack
done
