#!/usr/bin/env bash
# session 11, call 1: (1) session 10's call 3: the whole-step queue (switch queued_optimizer) beside the
# overlapped and waiting steps in one process; the fused small-M NF4 matmul (branch fused-small-m merged into
# the tree): its GPU test, then fused against dequantize + cuBLAS graph-timed; (2) the eager matrix's
# Llama-3.2-1B rows that no later campaign repeated, re-measured on today's trainer (each in its own process).
export TRITON_CACHE_AUTOTUNING=1
G='"batch": 1, "rank": 16, "gc": true'
echo "[{\"seq\": 1024, $G}]" > /tmp/s1024.json
echo "[{\"seq\": 2048, $G}]" > /tmp/s2048.json
STEPS=6 TRAINER_ARGS="--overlap-ab 3" timeout 100 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/s1024.json \
  trainer:qwen3-0.6b:/tmp/s2048.json | cut -c1-300
mv "$OUT/trainer.jsonl" "$OUT/queued-ab.jsonl" 2>/dev/null
timeout 80 benchmarks/run_on_gpu.sh 'tests:fused_matches_dequant_at_llama_8b_up and 64' | tail -3
timeout 110 benchmarks/run_on_gpu.sh py:benchmarks.fused_small_m | tail -12
F='"checkpointing": "full", "quant": "nf4", "optim": "paged_adamw_8bit"'
cat > /tmp/llama-rest.json <<J
[{"seq": 2048, "batch": 1, "rank": 16, "gc": true, $F},
 {"seq": 512, "batch": 1, "rank": 8, "gc": true, $F},
 {"seq": 2048, "batch": 1, "rank": 128, "gc": true, $F},
 {"seq": 2048, "batch": 2, "rank": 16, "gc": true, $F},
 {"seq": 2048, "batch": 1, "rank": 16, "gc": true, "checkpointing": "full", "quant": "bf16", "optim": "adamw"},
 {"seq": 2048, "batch": 1, "rank": 16, "gc": true, "checkpointing": "full", "quant": "nf4", "optim": "adamw_8bit"},
 {"seq": 4096, "batch": 1, "rank": 16, "gc": true, "checkpointing": "offload", "quant": "nf4", "optim": "paged_adamw_8bit"}]
J
STEPS=6 timeout 230 benchmarks/run_on_gpu.sh trainer:llama-3.2-1b:/tmp/llama-rest.json | cut -c1-200
mv "$OUT/trainer.jsonl" "$OUT/matrix-llama.jsonl" 2>/dev/null
