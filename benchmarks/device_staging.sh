# Sourced by a device call's script (benchmarks/results/sessionN/*.sh): its jobs write to a scratch folder $W and
# `pack` copies what they wrote back to the call's $OUT, so a job that times out still returns what the ones before it
# wrote. Usage: W=/tmp/sN; source benchmarks/device_staging.sh
mkdir -p "$W"; ROOT=$OUT; export OUT=$W
pack() { cp "$W"/* "$ROOT"/ 2>/dev/null; }
