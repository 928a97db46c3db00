"""The CUDA caching allocator's settings for a training process.

Expandable segments let the allocator grow one mapping instead of caching separately
``cudaMalloc``-ed blocks that never merge: a load's transient bf16 tables and a step's
differently-sized working sets then stop stranding memory. On the H100, Gemma-4-31B at 2,048
tokens held 21.0 GB with them against 22.3 GB without (benchmarks/results/trainer_graphs_h100.jsonl);
captured CUDA graphs run under them unchanged. A setting the user made is kept.
"""

from __future__ import annotations

import os

from vramplan.train import switches

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def allocator_settings() -> str:
    """The allocator settings the environment gives this process (torch reads either name), or ""."""
    return os.environ.get(ALLOC_CONF_ENV) or os.environ.get("PYTORCH_ALLOC_CONF") or ""


def prefer_expandable_segments() -> None:
    """Ask for expandable segments unless the environment configures the allocator already or the switch
    ``expandable_segments`` is off (read when the allocator starts; where CUDA has started already, set for the
    segments made from now on)."""
    if allocator_settings() or not switches.enabled("expandable_segments"):
        return
    os.environ[ALLOC_CONF_ENV] = EXPANDABLE
    import torch

    if torch.cuda.is_initialized() and hasattr(torch.cuda.memory, "_set_allocator_settings"):
        torch.cuda.memory._set_allocator_settings(EXPANDABLE)
