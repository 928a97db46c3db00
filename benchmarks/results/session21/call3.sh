#!/usr/bin/env bash
# Session 21, call 3 (~8 minutes): captures made compact (switch compact_captures: the gradients one buffer made before
# a shape's eager first pass, that pass's adapter copies dropped before the capture), after call 1's history showed
# the slack: 0.94 GB of gradients and bf16 adapter copies left among the eager pass's activations kept 1.2 GB of the
# pool's pages mapped through the capture.
# 1. the GPU tests of captured steps (graph against eager, no host sync in the body);
# 2. Qwen3-1.7B at 1,024 tokens without checkpointing, ranks 128 (with the allocator's history), 64 and 16, and rank 128
#    with the switch off, fresh processes, pool summaries;
# 3. for the planner's captured slack per trainable parameter (fitted on session 12's sweep as the trainer was): Llama-3.2-1B
#    at 2,048 tokens, checkpointed, ranks 8, 64 and 256, and at 1,024 without checkpointing at rank 128; Qwen3-4B at
#    2,048, checkpointed, ranks 32 and 256.
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s21c; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
timeout 120 benchmarks/run_on_gpu.sh "tests:cuda_graph_steps or graph_body" | tail -3; pack
export STEPS=4 TRAINER_ARGS=--pool-summary
echo "[{\"seq\": 1024, \"rank\": 128, \"gc\": false, \"batch\": 1, \"memory_history\": \"$W/history-qwen3-1.7b-r128-compact.pickle.gz\"},
       {\"seq\": 1024, \"rank\": 64, \"gc\": false, \"batch\": 1}, {\"seq\": 1024, \"rank\": 16, \"gc\": false, \"batch\": 1}]" > /tmp/qwen.json
echo '[{"seq": 1024, "rank": 128, "gc": false, "batch": 1}]' > /tmp/qwen-off.json
echo '[{"seq": 2048, "rank": 8, "gc": true, "batch": 1}, {"seq": 2048, "rank": 64, "gc": true, "batch": 1},
       {"seq": 2048, "rank": 256, "gc": true, "batch": 1}, {"seq": 1024, "rank": 128, "gc": false, "batch": 1}]' > /tmp/llama.json
echo '[{"seq": 2048, "rank": 32, "gc": true, "batch": 1}, {"seq": 2048, "rank": 256, "gc": true, "batch": 1}]' > /tmp/qwen4b.json
timeout 190 benchmarks/run_on_gpu.sh "trainer:qwen3-1.7b:/tmp/qwen.json" disable:compact_captures "trainer:qwen3-1.7b:/tmp/qwen-off.json" | cut -c1-110; pack
timeout 170 benchmarks/run_on_gpu.sh "trainer:llama-3.2-1b:/tmp/llama.json" | cut -c1-110; pack
timeout 110 benchmarks/run_on_gpu.sh "trainer:qwen3-4b:/tmp/qwen4b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/compact.jsonl" 2>/dev/null; pack
