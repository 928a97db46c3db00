#!/usr/bin/env bash
# session 11, call 4: the emulated-cap check on the trainer and planner as they now ship (CUDA graphs, the step
# queued whole, the adapters' graph copies priced): for 8, 12 and 16 GB, fit a plan, run it with torch capped
# to the budget less the context, and see whether the process stayed inside. One model per process.
export TRITON_CACHE_AUTOTUNING=1
benchmarks/run_on_gpu.sh tests:nothing_matches_this >/dev/null 2>&1  # installs the wheels only
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site"
for m in llama-3.2-1b gemma-4-e2b-text qwen3-4b; do
  timeout 170 python3 -m benchmarks.accuracy --cap-check --models "$m" > "$OUT/cap-check-$m.json" 2> "$OUT/cap-check-$m.err"
  python3 -c "import json,sys; [print(r['model'], r['cap_gb'], r['plan']['quant'], r['plan']['lora_rank'], r['plan']['seq_len'], r['plan']['checkpointing'], 'pred %.2f meas %.2f' % (r['predicted_bytes']/1e9, r['measured_process_bytes']/1e9), 'inside', r['stayed_inside']) for r in json.load(open(sys.argv[1]))]" "$OUT/cap-check-$m.json" || tail -3 "$OUT/cap-check-$m.err"
done
