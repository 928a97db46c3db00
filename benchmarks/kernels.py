"""Times every kernel against its alternatives on the GPU: `python benchmarks/kernels.py`.

Each module in benchmarks/kernel_cases/ contributes cases; this script measures the two
ceilings once, times every variant (median, triton.testing.do_bench; cases marked ``cuda_graph``
also replayed from a CUDA graph, ``ms_cudagraph``, which their ceiling fractions use), and writes
benchmarks/results/kernels.{json,md} (or to --out). ``--only nf4,qlora_linear,linear_cross_entropy``
runs those modules alone (``benchmarks/run_on_gpu.sh kernels:nf4,qlora_linear,linear_cross_entropy``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks import kernel_cases  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    YARDSTICK, ceiling_fractions, environment, graph_median_ms, measure_ceilings, median_ms, peak_bytes, time_variants, write_results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated kernel_cases modules to run")
    parser.add_argument("--out", default="", help="folder for kernels.json / kernels.md (default benchmarks/results)")
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    ceilings = measure_ceilings()
    print(json.dumps({"ceilings": ceilings, **environment()}), flush=True)
    rows, records = [], []
    for module_info in pkgutil.iter_modules(kernel_cases.__path__):
        if only and module_info.name not in only:
            continue
        module = importlib.import_module(f"benchmarks.kernel_cases.{module_info.name}")
        try:
            cases = module.cases("cuda")
        except Exception:
            traceback.print_exc()
            continue
        for case in cases:
            timings, graph_timings = time_variants(case, median_ms, graph_median_ms if torch.cuda.is_available() else None)
            peaks = {}
            if case.measure_peak_memory:
                for variant, fn in case.variants.items():
                    if timings.get(variant) is not None:
                        try:
                            peaks[variant] = peak_bytes(fn)
                        except Exception as err:  # noqa: BLE001
                            print(f"{case.op} {case.shape} {variant} peak: {type(err).__name__}: {err}", flush=True)
            ours = next(iter(case.variants))
            ms, graph_ms = timings.get(ours), graph_timings.get(ours)
            record = {"op": case.op, "shape": case.shape, "ms": timings, "peak_bytes": peaks or None,
                      "bytes_moved": case.bytes_moved, "flops": case.flops, "notes": case.notes, **case.extra}
            # ceiling fractions from the CUDA-graph time where there is one (the kernel's own), eager kept beside it
            record.update(ceiling_fractions(case, graph_ms or ms, ceilings))
            if graph_timings:
                record["ms_cudagraph"] = graph_timings
                record.update({f"{k}_eager": v for k, v in ceiling_fractions(case, ms, ceilings).items()})
            # vramplan's own alternative paths (qlora_linear's forced "fused"/"dequant", other launch
            # configs) and the yardsticks (a copy of the same bytes) are not rivals.
            others = [t for v, t in timings.items() if v != ours and not v.startswith(("vramplan", YARDSTICK)) and t]
            record["speedup_vs_best_other"] = (min(others) / ms) if ms and others else None
            if graph_timings:
                graph_others = [t for v, t in graph_timings.items()
                                if v != ours and not v.startswith(("vramplan", YARDSTICK)) and t]
                record["graph_speedup_vs_best_other"] = (min(graph_others) / graph_ms) if graph_ms and graph_others else None
            # the same bytes copied, timed alike: how far the op is from what its size allows
            copy_ms = next((t for v, t in (graph_timings or timings).items() if v.startswith(YARDSTICK) and t), None)
            if copy_ms and (graph_ms or ms):
                record["same_size_copy_fraction"] = copy_ms / (graph_ms or ms)
            records.append(record)
            print(json.dumps(record), flush=True)
            rows.append([
                case.op, case.shape,
                *(f"{v}: {t:.3f}" if t else f"{v}: failed" for v, t in timings.items()),
            ])
    table = [[r["op"], r["shape"], f"{r['ms'].get(next(iter(r['ms'])), 0) or 0:.3f}",
              f"{(r.get('ms_cudagraph') or {}).get(next(iter(r['ms']))) or 0:.3f}" if r.get("ms_cudagraph") else "-",
              ", ".join(f"{v} {t:.3f}" for v, t in list(r["ms"].items())[1:] if t),
              f"{r['speedup_vs_best_other']:.2f}x" if r.get("speedup_vs_best_other") else "-",
              f"{r['graph_speedup_vs_best_other']:.2f}x" if r.get("graph_speedup_vs_best_other") else "-",
              f"{r['bandwidth_fraction']:.0%}" if r.get("bandwidth_fraction") else "-",
              f"{r['same_size_copy_fraction']:.0%}" if r.get("same_size_copy_fraction") else "-",
              f"{r['tflops_fraction']:.0%}" if r.get("tflops_fraction") else "-"] for r in records]
    graph_rows = [r for r in records if r.get("ms_cudagraph")]
    md = tabulate(table, headers=["op", "shape", "vramplan ms", "vramplan graph ms", "others ms (eager)", "vs best other",
                                  "graph: vs best other", "of bandwidth (graph-timed where a graph ms is given)",
                                  "of same-size copy", "of bf16 TFLOP/s (graph-timed where given)"],
                  tablefmt="github")
    if graph_rows:
        md += ("\n\nThe ceiling fractions of rows with a graph ms are the kernel's own: from the CUDA-graph time "
               "(no launch gaps; ops repeated over distinct tensors so the L2 cache serves none). The eager "
               "fractions are in the JSON as *_eager.\n\n")
        md += tabulate([[r["op"], r["shape"], ", ".join(f"{v} {t:.4f}" for v, t in r["ms_cudagraph"].items() if t)]
                        for r in graph_rows], headers=["op", "shape", "every variant, CUDA-graph ms per op"],
                       tablefmt="github")
    print(md)
    payload = {"ceilings": ceilings, "environment": environment(), "records": records}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps(payload, indent=2))
        (out / "kernels.md").write_text(md + "\n")
    else:
        write_results("kernels", payload, md)


if __name__ == "__main__":
    main()
