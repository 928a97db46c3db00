"""Where the chunked linear cross-entropy's time goes, kernel by kernel, beside torch.compile's chunked algorithm (GPU).

    python -m benchmarks.lce_profile            # Llama-3.1-8B's head at 8,192 tokens, one JSON line per variant

benchmarks/kernels.py times the whole forward+backward; this splits it into the GEMMs and the rest (torch.profiler,
CUDA time summed per kernel name over a few calls), to tell a slow row pass from a badly shaped matmul.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from benchmarks.kernel_cases.linear_cross_entropy import SHAPES, _case

CALLS = 5


def kernel_breakdown(fn, calls: int = CALLS) -> dict[str, float]:
    """CUDA milliseconds per call of each kernel name (top 8, the rest summed) and the total."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.device_time_total / 1000 / calls
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    out = {name: round(ms, 3) for name, ms in ranked[:8]}
    out["other"] = round(sum(ms for _, ms in ranked[8:]), 3)
    out["total"] = round(sum(totals.values()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    args = parser.parse_args()
    case = _case(args.shape, *SHAPES[args.shape], "cuda", trainable=False, with_compiled=True)
    for name, fn in case.variants.items():
        if name in ("unfused", "liger"):
            continue
        print(json.dumps({"shape": case.shape, "variant": name, "kernels_ms": kernel_breakdown(fn)}), flush=True)


if __name__ == "__main__":
    main()
