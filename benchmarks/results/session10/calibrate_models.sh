#!/usr/bin/env bash
# session 10: `vramplan calibrate` as a user runs it (the CLI, eager dry run of the plan and its half-length
# twin) on a random-weight folder of each model named, at 3,072 tokens (a shape no campaign row has),
# appending each --json result to $OUT/calibrate.jsonl. Run after benchmarks/run_on_gpu.sh set up the paths.
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" VRAMPLAN_CACHE=/tmp/vramplan-cache
for model in "$@"; do
  folder=$(mktemp -d /tmp/cal-XXXX)
  python3 -c "import sys; from benchmarks.trainer import build_random_model; build_random_model(sys.argv[1], sys.argv[2])" \
    "$model" "$folder" 2>>"$OUT/calibrate-err.log"
  python3 -m vramplan estimate "$model" --seq 3072 --json > "$folder/plan.json"
  started=$(date +%s)
  python3 -m vramplan calibrate "$folder/plan.json" --model "$folder" --json 2>>"$OUT/calibrate-err.log" \
    | python3 -c "import json, sys; d = json.load(sys.stdin); d['profile'] = sys.argv[1]; print(json.dumps(d))" "$model" \
    >> "$OUT/calibrate.jsonl"
  echo "calibrated $model in $(( $(date +%s) - started )) s"
  rm -rf "$folder"
done
