#!/usr/bin/env bash
# Session 26's H100 call (~9 minutes), most needed first:
# 1. (#6) session 25's registered campaign (session25/campaign-host-probe.json, predicted-host-probe.txt): four eager
#    plans no line has run, each priced at its own host's probe.
# 2. (#5) campaign-shipped-captures.json: the two captured Qwen3-1.7B plans without checkpointing whose pre-compact
#    runs are #5's only held-out runs outside 6%, on today's trainer.
# 3. (#5) the eager Gemma-4-E2B step's allocator history again (about 107 MB expected below 2,833 MB allocated).
# 4. the GPU tests of calibrate and check.
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s26; source benchmarks/device_staging.sh
python3 -c "import json
for f, tag in (('session25/campaign-host-probe.json', 'probe'), ('session26/campaign-shipped-captures.json', 'shipped')):
    c = json.load(open('benchmarks/results/' + f))
    for m, g in c['plans'].items(): json.dump(g, open(f'/tmp/{tag}-{m}.json', 'w'))"
for model in llama-3.2-1b qwen3-1.7b llama-3.2-3b gemma-4-e2b-text; do
  STEPS=8 timeout 75 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/probe-$model.json" | grep step_s | cut -c1-100
  pack
done
mv "$W/trainer.jsonl" "$W/host-probe.jsonl"; pack
STEPS=4 timeout 100 benchmarks/run_on_gpu.sh "trainer:qwen3-1.7b:/tmp/shipped-qwen3-1.7b.json" | grep step_s | cut -c1-100
mv "$W/trainer.jsonl" "$W/shipped-captures.jsonl"; pack
echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
        \"memory_history\": \"$W/history-eager-e2b-2048.pickle.gz\"}]" > /tmp/eager-e2b.json
STEPS=3 timeout 100 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/eager-e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-history-e2b.jsonl" 2>/dev/null; pack
timeout 80 benchmarks/run_on_gpu.sh "tests:calibrat or check" | tail -3; pack
