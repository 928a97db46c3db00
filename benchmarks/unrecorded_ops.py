"""What an op inside the chunked attention's autograd Function costs the host, against a dispatched op and a recorded
one (``vramplan.throughput.UNRECORDED_OP_SHARE``).

    python -m benchmarks.unrecorded_ops [--out FILE.json]

Times the chunked attention's forward and backward (vramplan.train.attention.ChunkedAttention) on tensors too small for
their arithmetic to count, in 16 chunks and in one: the difference over the ops the extra chunks run
(``throughput.HOST_OPS_CHUNKED_ATTENTION``, its PyTorch row passes) is the host's cost of one unrecorded op. Beside it,
the two host probes of the speed benchmark's lines: a dispatched in-place add (``benchmarks.harness.host_dispatch_us``)
and an op autograd records (``vramplan.host.autograd_op_us``). On the CPU, so any machine can run it; on a GPU host each
op adds a launch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.harness import host_dispatch_us
from vramplan.host import autograd_op_us
from vramplan.throughput import HOST_OPS_CHUNKED_ATTENTION
from vramplan.train.attention import chunked_attention

TOKENS, MANY_CHUNKS = 64, 16


def chunk_op_us(rounds: int = 5, passes: int = 200) -> float:
    """Host µs of one op the chunked attention runs per chunk (best of ``rounds``)."""
    q, k, v = (torch.randn(1, 1, TOKENS, 4, requires_grad=True) for _ in range(3))

    def timed(chunk: int) -> float:
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(passes):
                chunked_attention(q, k, v, causal=True, chunk=chunk).sum().backward()
            best = min(best, (time.perf_counter() - started) / passes)
        return best

    extra_ops = (MANY_CHUNKS - 1) * (HOST_OPS_CHUNKED_ATTENTION["forward_chunk"] + HOST_OPS_CHUNKED_ATTENTION["backward_chunk"])
    return round((timed(TOKENS // MANY_CHUNKS) - timed(TOKENS)) / extra_ops * 1e6, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the readings here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reading = {"chunk_op_us": chunk_op_us(), "dispatch_us": host_dispatch_us("cpu"), "autograd_op_us": autograd_op_us("cpu")}
    reading["chunk_op_over_dispatch"] = round(reading["chunk_op_us"] / reading["dispatch_us"], 3)
    reading["chunk_op_over_autograd_op"] = round(reading["chunk_op_us"] / reading["autograd_op_us"], 3)
    print(json.dumps(reading, indent=1))
    if args.out:
        from vramplan.atomic import write_json_atomic

        write_json_atomic(args.out, reading)


if __name__ == "__main__":
    main()
