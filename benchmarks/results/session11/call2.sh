#!/usr/bin/env bash
# session 11, call 2: the eager matrix's Qwen3-4B and Gemma-4-E2B rows that no later campaign repeated,
# re-measured on today's trainer, each configuration in its own process.
export TRITON_CACHE_AUTOTUNING=1 STEPS=6
F='"checkpointing": "full", "quant": "nf4", "optim": "paged_adamw_8bit"'
cat > /tmp/qwen4b-rest.json <<J
[{"seq": 4096, "batch": 1, "rank": 16, "gc": true, $F},
 {"seq": 8192, "batch": 1, "rank": 32, "gc": true, $F},
 {"seq": 1024, "batch": 2, "rank": 64, "gc": true, $F},
 {"seq": 1024, "batch": 1, "rank": 16, "gc": false, "checkpointing": "none", "quant": "nf4", "optim": "paged_adamw_8bit"},
 {"seq": 2048, "batch": 1, "rank": 8, "gc": true, "checkpointing": "full", "quant": "bf16", "optim": "paged_adamw_8bit"}]
J
echo "[{\"seq\": 2048, \"batch\": 1, \"rank\": 16, \"gc\": true, $F}]" > /tmp/e2b.json
timeout 520 benchmarks/run_on_gpu.sh trainer:qwen3-4b:/tmp/qwen4b-rest.json trainer:gemma-4-e2b-text:/tmp/e2b.json | cut -c1-200
mv "$OUT/trainer.jsonl" "$OUT/matrix-qwen4b-e2b.jsonl" 2>/dev/null
