"""What each training stack does with a plan: which bytes it keeps where, phase by phase.

A stack turns (Architecture, Plan) into a ``StepMemory``: the components alive in each
phase of a step, the allocator fragmentation it causes, the library memory it loads,
and notes on plan settings it cannot honour. ``vramplan.memory.peak`` picks the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepMemory:
    phases: dict[str, dict[str, int]]
    fragmentation: int
    library_bytes: int
    resident_paged: int = 0  # paged optimizer states NVML counts on the GPU (memory.optimizer.resident_paged_state_bytes)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # an eager step's small-pool gradients made after its allocated peak, the slack's feature (None: not priced so)
    small_gradients_after_peak: int | None = None


def step_memory(arch, plan) -> StepMemory:
    """One rank's step memory: the stack's, spread over ``plan.gpus`` GPUs as ``plan.parallel`` says."""
    from vramplan.stacks import distributed, hf, vramplan

    return distributed.per_rank(arch, plan, (hf if plan.stack == "hf" else vramplan).step_memory(arch, plan))
