"""The fused NF4 matmul against dequantize + cuBLAS at small token counts, graph-timed fwd+bwd (GPU).

    python -m benchmarks.fused_small_m   # one JSON line per shape and token count
    python -m benchmarks.fused_small_m --tokens 32,64,128 --shapes all

A focused slice of benchmarks/kernels.py's QLoRA linear cases: where ``FUSED_MAX_TOKENS`` should sit.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.harness import graph_median_ms
from benchmarks.kernel_cases.qlora_linear import LINEAR_SHAPES, cases

SHAPES = ("gemma4-e2b up 1536->6144", "llama3.1-8b up 4096->14336")
TOKENS = (64, 256)
TIMED = ("vramplan dequant", "vramplan fused", "dequant + cublas (autograd)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated names or 'all': {', '.join(LINEAR_SHAPES)}")
    args = parser.parse_args()
    names = tuple(LINEAR_SHAPES) if args.shapes == "all" else tuple(args.shapes.split(","))
    tokens = tuple(int(t) for t in args.tokens.split(","))
    shapes = {name: LINEAR_SHAPES[name] for name in names}
    for case in cases(torch.device("cuda"), shapes, tokens=(), fused_tokens=tokens, small_shapes=names):
        row = {"shape": case.shape}
        for name in TIMED:
            run = case.variants[name]
            try:
                run()  # autotunes and compiles outside the capture
                torch.cuda.synchronize()
                row[f"{name} graph ms"] = round(graph_median_ms(run), 4)
            except Exception as err:  # a variant that cannot be captured: said, not timed
                row[f"{name} error"] = f"{type(err).__name__}: {str(err)[:120]}"
        others = [row[f"{n} graph ms"] for n in TIMED if n != "vramplan fused" and f"{n} graph ms" in row]
        if others and "vramplan fused graph ms" in row:
            row["fused vs best other"] = round(min(others) / row["vramplan fused graph ms"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
