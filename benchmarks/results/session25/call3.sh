#!/usr/bin/env bash
# Session 25, call 3 (~7 minutes; not run in session 25: no machine started), most needed first:
# 1. (#6) the campaign registered in campaign-host-probe.json / predicted-host-probe.txt: four eager plans no line has
#    run, each to be priced on its own host's probe.
# 2. the eager Gemma-4-E2B step's allocator history again (two trainer fixes since call 1: about 107 MB expected).
# 3. the GPU tests of calibrate and check: `vramplan calibrate` now probes its host and stores the reading.
# 4. where the one wait inside an eager step's forward is (call 2 ran out of time before it).
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s25; source benchmarks/device_staging.sh
python3 -c "import json; c=json.load(open('benchmarks/results/session25/campaign-host-probe.json'))
for m, g in c['plans'].items(): json.dump(g, open(f'/tmp/probe-{m}.json', 'w'))"
for model in llama-3.2-1b qwen3-1.7b llama-3.2-3b gemma-4-e2b-text; do
  STEPS=8 timeout 75 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/probe-$model.json" | grep step_s | cut -c1-100
  pack
done
mv "$W/trainer.jsonl" "$W/host-probe.jsonl"; pack
# (added after registration, outside the campaign) the eager E2B step's history again: the chunked attention now drops
# each chunk's buffers before the next chunk's (33.5 MB), and with transformers' input-grad hook dropped neither keeps
# the per-layer projection's norm input nor accumulates a gradient for the per-layer inputs (36.7 MB each): its
# allocated peak should fall about 107 MB from call 1's 2,833
echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
        \"memory_history\": \"$W/history-eager-e2b-2048.pickle.gz\"}]" > /tmp/eager-e2b.json
STEPS=3 timeout 120 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/eager-e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-history-e2b.jsonl" 2>/dev/null; pack
timeout 90 benchmarks/run_on_gpu.sh "tests:calibrat or check" | tail -3; pack
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site" PYTHONUNBUFFERED=1
timeout 45 python3 -m benchmarks.profile_trainer --config llama-3.2-1b --seq 1024 --syncs --rows 5 > "$W/profile-syncs.txt" 2>&1
grep "^sync\|^wall" "$W/profile-syncs.txt" | cut -c1-400; pack
