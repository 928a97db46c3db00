"""The CUDA caching allocator, set up for training before the first CUDA allocation.

Expandable segments let the allocator grow one virtual range instead of carving fixed 2/20 MB
blocks: a layer's transient buffers, which change size between the forward, the recompute and
the backward, then reuse the same pages instead of stranding free blocks (the gap between
``max_memory_reserved`` and ``max_memory_allocated`` that NVML sees as process memory).
A user's own ``PYTORCH_CUDA_ALLOC_CONF`` wins.
"""

from __future__ import annotations

import os

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
TRAINING_ALLOC_CONF = "expandable_segments:True"


def configure_allocator_for_training() -> str:
    """Set the allocator's configuration unless the user did; return the one in force.

    Must run before CUDA is initialised: torch reads the variable when it creates the allocator.
    """
    return os.environ.setdefault(ALLOC_CONF_ENV, TRAINING_ALLOC_CONF)
