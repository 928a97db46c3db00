"""The peak of a step: the largest of its phases, each a sum of the components alive then.

A step runs load (once), forward, backward and the optimizer step; memory rises and
falls between them, so the peak is the maximum over phases, never a sum of everything.
The stack (``vramplan.stacks``) says which component holds how many bytes in which
phase; this module only adds what every phase carries and picks the peak.
"""

from __future__ import annotations

PHASES = ("load", "forward", "backward", "optimizer_step")


def assemble(phases: dict[str, dict[str, int]], every_phase: dict[str, int],
             after_load: dict[str, int]) -> tuple[str, dict[str, int], dict[str, int]]:
    """Add ``every_phase`` components (CUDA context, libraries) to all phases and ``after_load``
    ones (fragmentation: the allocator's cache never shrinks) to all phases after load; return
    the peak phase's name, its components (summing to the peak) and each phase's total."""
    full: dict[str, dict[str, int]] = {}
    for name in PHASES:
        parts = dict(phases.get(name, {}))
        parts.update(every_phase)
        if name != "load":
            parts.update(after_load)
        full[name] = {k: int(v) for k, v in parts.items()}
    totals = {name: sum(parts.values()) for name, parts in full.items()}
    peak_phase = max(PHASES, key=lambda name: totals[name])
    return peak_phase, full[peak_phase], totals
