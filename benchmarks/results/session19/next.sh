#!/usr/bin/env bash
# For the next session, one call (~9 minutes): the retrying fp16 trainer on the GPU.
# 1. The fp16 GPU test (rewritten for retries: every step updates, at most 16 overflows) and the QLoRA linear's.
# 2. fp16 (loss-scaled, retrying) against bf16 on Gemma-4-E2B and Llama-3.2-1B at 2,048 tokens, 8 steps: where E2B's
#    scale settles, and whether its losses track bf16's. 3. The module where E2B's second overflow starts.
export TRITON_CACHE_AUTOTUNING=1 STEPS=8
W=/tmp/next19; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 150 benchmarks/run_on_gpu.sh "tests:fp16_steps or fp16_adapter" | tail -4; pack
cat > /tmp/dtype.json <<'JSON'
[{"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "fp16"},
 {"seq": 2048, "rank": 16, "gc": true, "batch": 1, "compute_dtype": "bf16"}]
JSON
for m in gemma-4-e2b-text:150 llama-3.2-1b:90; do
  timeout "${m#*:}" benchmarks/run_on_gpu.sh "trainer:${m%%:*}:/tmp/dtype.json" | cut -c1-120; pack
done
mv "$W/trainer.jsonl" "$W/fp16-retrying.jsonl" 2>/dev/null; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
timeout 200 python3 -m benchmarks.fp16_overflow --model gemma-4-e2b-text --seq 2048 --variants 1 --scales 16,10,4 2>"$W/e2b-err.log" \
  | tee "$W/fp16-overflow-e2b.jsonl" | cut -c1-300; pack
