#!/usr/bin/env bash
# Session 26, the H200 call (~8 minutes; registered when no H100 started), most needed first:
# 1. (#6) the campaign registered in campaign-h200.json / predicted-h200.txt: six plans on a GPU no speed factor was
#    fitted on, each priced at its own host's probe.
# 2. (#5) the eager Gemma-4-E2B step's allocator history again (session 25's two trainer fixes: about 107 MB expected
#    below session 25 call 1's 2,833 MB allocated peak; the allocator is the same on an H200).
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/s26; source benchmarks/device_staging.sh
python3 -c "import json; c=json.load(open('benchmarks/results/session26/campaign-h200.json'))
for m, g in c['plans'].items(): json.dump(g, open(f'/tmp/h200-{m}.json', 'w'))"
for model in llama-3.2-1b qwen3-1.7b llama-3.2-3b gemma-4-e2b-text; do
  STEPS=8 timeout 100 benchmarks/run_on_gpu.sh "trainer:$model:/tmp/h200-$model.json" | grep step_s | cut -c1-100
  pack
done
mv "$W/trainer.jsonl" "$W/h200.jsonl"; pack
echo "[{\"seq\": 2048, \"rank\": 16, \"gc\": true, \"batch\": 1, \"cuda_graphs\": false,
        \"memory_history\": \"$W/history-eager-e2b-2048.pickle.gz\"}]" > /tmp/eager-e2b.json
STEPS=3 timeout 110 benchmarks/run_on_gpu.sh "trainer:gemma-4-e2b-text:/tmp/eager-e2b.json" | cut -c1-110
mv "$W/trainer.jsonl" "$W/eager-history-e2b.jsonl" 2>/dev/null; pack
