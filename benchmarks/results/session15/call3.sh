#!/usr/bin/env bash
# Session 15, call 3 (~1 minute): the band's trainer-level GPU test, now in fp32, and the wide-head chunk heights.
W=/tmp/call3; mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { tar czf "$ROOT/call3.tgz" -C "$W" .; }
timeout 90 benchmarks/run_on_gpu.sh "tests:steps_through_the_band or sliding_layer_shape" | tail -3; pack
PYTHONPATH="$PWD:/tmp/shim:/tmp/site" timeout 60 python3 benchmarks/results/session15/chunk_rows.py > "$W/chunk_rows.jsonl" 2>"$W/chunk_rows-err.log"; pack
