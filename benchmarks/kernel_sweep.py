"""Launch-setting sweeps of the small memory-bound kernels, timed in CUDA graphs on a GPU.

RMSNorm and RoPE do 0.01-0.2 ms of work per call, so which tile a program takes and how many
warps run it decide whether they beat Liger or torch.compile. This script times each setting
against those in one process (``triton.testing.do_bench_cudagraph``, the GPU's work only) and
prints one JSON line per setting; the winners become the kernels' defaults.

    python -m benchmarks.kernel_sweep [--only rope|rmsnorm] > sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.harness import graph_median_ms
from benchmarks.kernel_cases import rmsnorm as rmsnorm_cases
from benchmarks.kernel_cases import rope as rope_cases
import vramplan_kernels.rmsnorm as rmsnorm_module
import vramplan_kernels.rope as rope_module


def _others(case) -> dict[str, float]:
    return {name: graph_median_ms(fn) for name, fn in case.variants.items() if name not in ("vramplan", "torch")}


def _line(case, setting: dict, ms: float, others: dict[str, float]) -> str:
    best = min(others.values()) if others else None
    return json.dumps({"op": case.op, "shape": case.shape, **setting, "ms": round(ms, 5),
                       "others_ms": {k: round(v, 5) for k, v in others.items()},
                       "vs_best_other": round(best / ms, 3) if best else None})


def sweep_rope(tokens_choices=(None, 1, 2, 4), warps_choices=(None, 2, 4, 8), reverse_choices=(True,)) -> None:
    default = rope_module.REVERSE_ORDER
    for case in rope_cases.cases("cuda"):
        others = _others(case)
        for tokens, warps, reverse in itertools.product(tokens_choices, warps_choices, reverse_choices):
            rope_module.TOKENS_PER_PROGRAM, rope_module.NUM_WARPS, rope_module.REVERSE_ORDER = tokens, warps, reverse
            print(_line(case, {"tokens_per_program": tokens, "num_warps": warps, "reverse": reverse},
                        graph_median_ms(case.variants["vramplan"]), others), flush=True)
    rope_module.TOKENS_PER_PROGRAM, rope_module.NUM_WARPS, rope_module.REVERSE_ORDER = None, None, default


def sweep_rmsnorm() -> None:
    defaults = rmsnorm_module._DW_PROGRAMS_PER_SM, rmsnorm_module._DW_TILE_ELEMENTS, rmsnorm_module._FUSED_DW_SUM
    for case in rmsnorm_cases.cases("cuda"):
        others = _others(case)
        settings = [defaults]
        if case.extra.get("dw"):  # dW summed in one launch at every setting, and torch's sum at the default
            settings = [(p, t, True) for p, t in itertools.product((2, 4, 8, 16), (2048, 4096, 8192))]
            settings.append((*defaults[:2], False))
        for programs, tile, fused_sum in settings:
            (rmsnorm_module._DW_PROGRAMS_PER_SM, rmsnorm_module._DW_TILE_ELEMENTS,
             rmsnorm_module._FUSED_DW_SUM) = programs, tile, fused_sum
            print(_line(case, {"dw_programs_per_sm": programs, "dw_tile_elements": tile, "fused_dw_sum": fused_sum},
                        graph_median_ms(case.variants["vramplan"]), others), flush=True)
    rmsnorm_module._DW_PROGRAMS_PER_SM, rmsnorm_module._DW_TILE_ELEMENTS, rmsnorm_module._FUSED_DW_SUM = defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("rope", "rmsnorm"))
    parser.add_argument("--rope-tokens", default="default,1,2,4", help="RoPE tokens per program to try (default: the heuristic)")
    parser.add_argument("--rope-warps", default="default,2,4,8", help="RoPE warps to try (default: the heuristic)")
    parser.add_argument("--rope-reverse", default="1", help="RoPE token orders to try: 0 first to last, 1 last to first")
    args = parser.parse_args()
    choices = lambda text: tuple(None if part == "default" else int(part) for part in text.split(","))  # noqa: E731
    if not torch.cuda.is_available():
        raise SystemExit("kernel_sweep: needs a CUDA GPU (it times launch settings)")
    if args.only in (None, "rope"):
        orders = tuple(bool(int(part)) for part in args.rope_reverse.split(","))
        sweep_rope(choices(args.rope_tokens), choices(args.rope_warps), orders)
    if args.only in (None, "rmsnorm"):
        sweep_rmsnorm()


if __name__ == "__main__":
    main()
