"""The public API of the planner: price a plan on a model, optionally against a GPU.

``estimate_plan(plan, profile, gpu)`` is pure arithmetic (no torch, no device): it reads
the architecture from the profile's config, lets the plan's stack say which bytes live
in which phase of a step, adds the CUDA context and the allocator's fragmentation, and
reports the peak phase with its components. A plan on several GPUs (``plan.gpus`` > 1)
is priced **per rank**: one process on one GPU, with one CUDA context, holding its copy
(DDP) or shard (FSDP2) of the model (``vramplan.stacks.distributed``); the budget is one GPU's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
import json
from typing import Any

from vramplan.arch import Architecture, from_config
from vramplan.catalog import GpuSpec, ModelProfile
from vramplan.memory.overhead import cuda_context_bytes
from vramplan.memory.peak import assemble
from vramplan.plan import Plan
from vramplan.stacks import step_memory

#: What the driver keeps of a catalog GPU's memory (ECC/firmware and driver allocations
#: visible in nvidia-smi on an idle card): 300 MiB. A bare budget (``--gpu 12GB``) and
#: detected free memory (``--gpu auto``) are taken as given.
DRIVER_RESERVE_BYTES = 300 * 2**20


@dataclass(frozen=True)
class Estimate:
    """A plan's memory: the peak, what it is made of, and whether it fits a budget."""

    plan: Plan
    model: str
    peak_bytes: int
    components: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    budget_bytes: int | None = None
    gpu: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpus": self.plan.gpus,
            "parallel": self.plan.parallel,
            "memory_per": "rank" if self.plan.gpus > 1 else "gpu",  # components, peak and budget are one GPU's
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "headroom_bytes": self.headroom_bytes,
            "gpu": self.gpu,
            "components": dict(self.components),
            "phases": dict(self.phases),
            "plan": self.plan.to_dict(),
            "notes": list(self.notes),
        }


def budget_bytes(gpu: GpuSpec) -> int:
    """What one GPU offers a process: a catalog card less the driver's reserve; a bare budget as given."""
    if gpu.kind == "budget":
        return gpu.memory_bytes
    return gpu.memory_bytes - DRIVER_RESERVE_BYTES


@lru_cache(maxsize=64)
def _architecture(config_json: str, where: str) -> Architecture:
    return from_config(json.loads(config_json), where)


def architecture(profile: ModelProfile) -> Architecture:
    """The profile's Architecture, built once per distinct config (fit prices thousands of plans)."""
    return _architecture(json.dumps(profile.config, sort_keys=True), profile.source or profile.name)


def estimate_plan(plan: Plan, profile: ModelProfile, gpu: GpuSpec | None = None,
                  budget: int | None = None) -> Estimate:
    """Price ``plan`` on ``profile``; with a ``gpu`` (or an explicit ``budget`` in bytes) also say whether it fits."""
    arch = architecture(profile)
    step = step_memory(arch, plan)
    every = {"cuda_context": cuda_context_bytes(), "cuda_libraries": step.library_bytes}
    after_load = {"fragmentation": step.fragmentation}
    if step.resident_paged:
        after_load["paged_states_resident"] = step.resident_paged
    peak_phase, components, phases = assemble(step.phases, every, after_load)
    if budget is None and gpu is not None:
        budget = budget_bytes(gpu)
    return Estimate(
        plan=plan, model=profile.name, peak_bytes=sum(components.values()), components=components,
        phases=phases, peak_phase=peak_phase, budget_bytes=budget, gpu=gpu.name if gpu else None, notes=step.notes,
    )
