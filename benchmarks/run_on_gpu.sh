#!/usr/bin/env bash
# Runs the GPU side of the project in one go on a CUDA machine, from the repository root:
#   benchmarks/run_on_gpu.sh [tests[:K_EXPR]] [kernels[:MODULES]] [trainer ...] [profile:CONFIG:SEQ] [unsloth:CONFIG:GRID]
#                            [multimodal:N,...] [accuracy[:MODEL,...]] [capcheck] [multigpu] [enable:SWITCH,...]
#                            [disable:SWITCH,...] [profile_graphs:CONFIG:SEQ]
# enable:SWITCHES sets VRAMPLAN_ENABLE for the jobs after it (enable: clears it): an A/B in one call, e.g.
#   trainer:llama-3.2-1b:G.json enable:fused_optimizer trainer:llama-3.2-1b:G.json (each line records "enabled");
# disable:SWITCHES the same with VRAMPLAN_DISABLE (e.g. disable:int8_vocab_major for the token-major int8 head).
# Wheels in .whl/ (bitsandbytes, liger-kernel) are installed to /tmp/site first when present.
# Results go to $OUT (default benchmarks/results/gpu-run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT" /tmp/shim
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
ln -sfn "$PWD/kernels" /tmp/shim/vramplan_kernels
export PYTHONPATH="$PWD:/tmp/shim:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for job in "$@"; do
  case "$job" in
    tests)   python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    tests:*) python3 -m pytest -q -m gpu -p no:cacheprovider tests -k "${job#tests:}" 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -25 ;;
    kernels) python3 benchmarks/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    kernels:*) python3 benchmarks/kernels.py --only "${job#kernels:}" --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    trainer:*)  # trainer:CONFIG.json:GRID.json  (the config's file name labels the lines)
      IFS=: read -r _ cfg grid <<<"$job"
      python3 -m benchmarks.trainer --fresh --config "$cfg" --grid "$grid" --steps "${STEPS:-5}" ${TRAINER_ARGS:-} 2>>"$OUT/trainer-err.log" | tee -a "$OUT/trainer.jsonl" ;;
    profile:*)  # profile:CONFIG:SEQ  wall vs GPU-busy time per step and the top host ops (benchmarks/profile_trainer.py)
      IFS=: read -r _ cfg seq <<<"$job"
      python3 -m benchmarks.profile_trainer --config "$cfg" --seq "$seq" 2>&1 > "$OUT/profile-$(basename "$cfg" .json)-$seq.txt"; head -3 "$OUT/profile-$(basename "$cfg" .json)-$seq.txt" ;;
    accuracy)   python3 -m benchmarks.accuracy --measure --out "$OUT/accuracy_rows.jsonl" 2>&1 | tail -5 ;;
    accuracy:*) python3 -m benchmarks.accuracy --measure --models "${job#accuracy:}" --out "$OUT/accuracy_rows.jsonl" 2>&1 | tail -5 ;;
    unsloth:*)  # unsloth:CONFIG.json:GRID.json — the reference Unsloth harness, side by side (wheels in .whl/unsloth,
                # script at .dev/unsloth_bench.py: ../shared/reference-stacks/unsloth_bench.py, carried, not committed)
      IFS=: read -r _ cfg grid <<<"$job"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth .whl/unsloth/*.whl >/dev/null 2>&1
      HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site-unsloth:$PYTHONPATH" timeout 420 python3 .dev/unsloth_bench.py --config "$cfg" --grid "$grid" --steps 5 \
        2>"$OUT/unsloth-err.log" | tee -a "$OUT/unsloth.jsonl" ;;
    multimodal:*)  # multimodal:N[,N...] — benchmarks/multimodal.py CONFIGS[N], each in its own process
      IFS=, read -ra picks <<<"${job#multimodal:}"
      for n in "${picks[@]}"; do
        python3 benchmarks/multimodal.py --config "$n" --out "$OUT/multimodal.jsonl" 2>>"$OUT/multimodal-err.log" | tail -1
      done ;;
    capcheck)   python3 -m benchmarks.accuracy --cap-check 2>&1 | tee "$OUT/cap_check.json" | tail -40 ;;
    multigpu)   # 1, 2, 4, 8 GPUs as present: Llama-3.1-8B under DDP; Llama-3.3-70B under FSDP2, each rank capped at 24 GB
                # with CPU offload (what fit chooses for 2x24 GB) and, to check the per-rank model, without it under a 40 GB cap
      n=$(nvidia-smi -L | wc -l)
      run_mg() { timeout 400 python3 -m torch.distributed.run --standalone --nproc-per-node "$@" --out "$OUT/multigpu.jsonl" 2>>"$OUT/multigpu-err.log" | tail -1; }
      for g in 1 2 4 8; do
        [ "$g" -le "$n" ] || continue
        run_mg "$g" -m benchmarks.multigpu --model llama-3.1-8b --parallel ddp --seq 2048 --steps 6
      done
      for g in 2 4 8; do
        [ "$g" -le "$n" ] || continue
        run_mg "$g" -m benchmarks.multigpu --model llama-3.3-70b --parallel fsdp --seq 2048 --steps 4 --cap-gb 24 --cpu-offload
        run_mg "$g" -m benchmarks.multigpu --model llama-3.3-70b --parallel fsdp --seq 2048 --steps 4 --cap-gb 40
      done ;;
    enable:*)  export VRAMPLAN_ENABLE="${job#enable:}"; echo "VRAMPLAN_ENABLE=$VRAMPLAN_ENABLE for the jobs after this" ;;  # A/B in one call
    disable:*) export VRAMPLAN_DISABLE="${job#disable:}"; echo "VRAMPLAN_DISABLE=$VRAMPLAN_DISABLE for the jobs after this" ;;
    profile_graphs:*)  # profile_graphs:CONFIG:SEQ  the same, each step replayed as a CUDA graph
      IFS=: read -r _ cfg seq <<<"$job"
      python3 -m benchmarks.profile_trainer --config "$cfg" --seq "$seq" --graphs 2>&1 > "$OUT/profile-graphs-$(basename "$cfg" .json)-$seq.txt"
      head -3 "$OUT/profile-graphs-$(basename "$cfg" .json)-$seq.txt" ;;
    py:*)    python3 -m "${job#py:}" 2>&1 | tee -a "$OUT/$(echo "${job#py:}" | tr . _).log" | tail -80 ;;  # any benchmarks module, no arguments
    *)       echo "unknown job $job" ;;
  esac
done
