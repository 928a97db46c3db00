"""The optimizer step alone on Llama-3.2-1B's LoRA adapters (rank 16, all linears: 224 tensors,
11.3M values): bitsandbytes' 8-bit AdamW per tensor and flat, against the fused one eager and
replayed in a CUDA graph. Prints one JSON line per variant (ms per step, median of 50), and the
process's memory outside torch's allocator after the first step (bitsandbytes' kernels take a block
there: benchmarks/results/session5/outside.jsonl).

    python -m benchmarks.optimizer_step            (or: benchmarks/run_on_gpu.sh py:benchmarks.optimizer_step)
"""

from __future__ import annotations

import json
import statistics

import torch

from benchmarks.harness import synced_seconds

# (out, in) of Llama-3.2-1B's q, k, v, o, gate, up, down projections
LINEARS = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
LAYERS, RANK = 16, 16


def adapters(device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(LAYERS) for out, inp in LINEARS for s in ((RANK, inp), (out, RANK))]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]


def per_step_ms(step, n: int = 50) -> float:
    for _ in range(3):
        step()
    return statistics.median(synced_seconds(step, n)) * 1e3


def outside_allocator_bytes() -> int:
    """Device memory the process holds beyond what torch's allocator reserved."""
    from vramplan.gpu import used_memory_bytes

    return used_memory_bytes() - torch.cuda.memory_reserved()


def main() -> None:
    from vramplan.train.optim import FusedAdamW8bit, eight_bit_adamw

    device = torch.device("cuda")
    torch.cuda.init()
    variants = [("fused eager", lambda p: FusedAdamW8bit(p, lr=2e-4, weight_decay=0.0)),
                ("bnb flat", lambda p: eight_bit_adamw(False, flat=True)(p, lr=2e-4, weight_decay=0.0)),
                ("bnb per tensor", lambda p: eight_bit_adamw(False, flat=False)(p, lr=2e-4, weight_decay=0.0))]
    base_outside = outside_allocator_bytes()
    for name, make in variants:  # fused first: the outside reading is taken before any bitsandbytes kernel
        params = adapters(device)
        opt = make(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.randn_like(p) * 1e-3
            else:
                p.grad.copy_(torch.randn_like(p) * 1e-3)
        if isinstance(opt, FusedAdamW8bit):
            clip = lambda: opt.clip_grad_norm_(1.0)  # noqa: E731
        else:
            clip = lambda: float(torch.nn.utils.clip_grad_norm_(params, 1.0))  # noqa: E731  the host read the recipe does
        opt.step()
        torch.cuda.synchronize()
        row = {"variant": name, "values": sum(p.numel() for p in params), "tensors": len(params),
               "step_ms": round(per_step_ms(opt.step), 3),
               "clip_and_step_ms": round(per_step_ms(lambda: (clip(), opt.step())), 3),
               "outside_delta_mib": round((outside_allocator_bytes() - base_outside) / 2**20, 1)}
        if isinstance(opt, FusedAdamW8bit):
            graph = opt.capture(max_norm=1.0)
            row["graph_clip_and_step_ms"] = round(per_step_ms(graph.replay), 3)
        print(json.dumps(row), flush=True)
        del opt, params
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
