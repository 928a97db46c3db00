"""Forward+backward callables for kernel cases: one step of an op as training runs it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def forward_backward(
    forward: Callable[[], Any], inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]
) -> Callable[[], Any]:
    """A zero-argument callable running ``forward()`` and the gradients of ``inputs``.

    ``torch.autograd.grad`` returns the gradients instead of accumulating them into ``.grad``, so
    no extra add kernel is timed; ``forward`` returns one tensor or a tuple.
    """

    def step():
        out = forward()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return torch.autograd.grad(outs, list(inputs), list(grad_outputs))

    return step


def compiled(fn: Callable[..., Any], backend: str | None) -> Callable[..., Any] | None:
    """``torch.compile(fn)`` with room for one specialization per case (shapes, dtypes, flags):
    past Dynamo's default recompile limit it would quietly fall back to eager. None for no backend
    (the CPU checks of the cases skip inductor, whose C++ builds take seconds each)."""
    if backend is None:
        return None
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, backend=backend)


def default_backend(device: str) -> str | None:
    return "inductor" if device == "cuda" else None


def try_import(path: str, name: str) -> Any | None:
    """``from path import name``, or None where that package (Liger Kernel, say) is not installed."""
    try:
        module = __import__(path, fromlist=[name])
        return getattr(module, name)
    except Exception:  # ImportError, or a broken install: the case runs without that variant
        return None
