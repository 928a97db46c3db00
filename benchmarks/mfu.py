"""Model FLOPs utilisation: the matmul work a step needs, per second, against the bf16 matmul rate
the same GPU reaches in the same run.

"Needs" means the model's forward and backward (frozen base weights need dX only, no dW; the
adapters need all three), the LM head and attention, as ``vramplan.throughput.step_flops`` counts
them, without the forward that checkpointing recomputes: that is work the memory saving costs, not
work the model asks for. The rate is a large square bf16 matmul timed with CUDA events, so the
ratio is against what this GPU, driver and torch reach, not the datasheet.
"""

from __future__ import annotations

import torch

from vramplan.catalog import resolve_model
from vramplan.estimate import architecture
from vramplan.plan import Plan
from vramplan.throughput import step_flops


def model_flops(plan: Plan) -> float:
    """Matmul FLOPs one micro-batch needs (no recompute), for ``plan``'s model profile."""
    arch = architecture(resolve_model(plan.model))
    return float(sum(step_flops(arch, plan.replace(checkpointing="none")).values()))


def bf16_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """The dense bf16 matmul rate this GPU reaches now (TFLOP/s), timed with CUDA events after a warm-up."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del a, b
    return 2 * size**3 / seconds / 1e12


def utilisation(plan: Plan, step_seconds: float, matmul_tflops: float) -> float:
    """The fraction of the measured matmul rate a step of ``step_seconds`` turns into needed work."""
    return utilisation_of(model_flops(plan), step_seconds, matmul_tflops)


def utilisation_of(flops: float, step_seconds: float, matmul_tflops: float) -> float:
    """:func:`utilisation` for a step whose needed FLOPs are counted already."""
    return flops / step_seconds / (matmul_tflops * 1e12)
