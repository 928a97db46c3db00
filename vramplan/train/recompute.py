"""Activation checkpointing that a CUDA graph capture can hold.

torch's non-reentrant checkpoint (torch 2.11, the GPU machine's) saves each layer's inputs through
an extra autograd node rooted on a CPU leaf (a 0-element tensor that requires grad). At the end of
a backward the engine makes the caller's stream wait on every leaf's stream; under capture that
wait crosses from the capturing stream to one that is not capturing, and the capture fails
("operation would make the legacy stream depend on a capturing blocking stream", first seen in
the backward of a checkpointed layer: benchmarks/graph_debug.py). PyTorch has since made this
an opt-in override (``torch.autograd.graph.set_override_stale_capture_stream``), absent in 2.11.

This one adds no node and no leaf: saved-tensor hooks store an index for each tensor the forward
saves and, on the first unpack in backward, run the layer again with grad enabled to collect the
same tensors in the same order. The layer's inputs are held by the closure, as torch holds them.
Each recomputed tensor is dropped as its backward node takes it, so a layer's recomputed
activations live only while that layer's backward runs (holding them to the end of the backward
made a captured Llama-3.2-1B step as large as one without checkpointing: 4.9 GB against 2.1).
It never saves or restores RNG state (nothing in the trainer's layers draws random numbers).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def checkpoint_without_leaf(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, keeping none of the tensors it saves for backward: they are
    recomputed when the backward first needs one."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    recomputed: list[torch.Tensor | None] | None = None
    packed = 0

    def pack(_tensor: torch.Tensor) -> int:
        nonlocal packed
        packed += 1
        return packed - 1

    def unpack(index: int) -> torch.Tensor:
        nonlocal recomputed
        if recomputed is None:
            again: list[torch.Tensor] = []

            def keep(tensor: torch.Tensor) -> int:
                again.append(tensor)
                return len(again) - 1

            with torch.autograd.graph.saved_tensors_hooks(keep, again.__getitem__), torch.enable_grad():
                fn(*args, **kwargs)
            if len(again) != packed:
                raise RuntimeError(f"checkpoint: the recompute saved {len(again)} tensors, the forward {packed}")
            recomputed = again
        tensor = recomputed[index]
        if tensor is None:
            raise RuntimeError("checkpoint: a recomputed tensor was unpacked twice (backward through the graph a second time?)")
        recomputed[index] = None  # each saved tensor is unpacked once: let it go with its node, not with the graph
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*args, **kwargs)
