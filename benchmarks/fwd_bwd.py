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


def try_import(path: str, name: str) -> Any | None:
    """``from path import name``, or None where that package (Liger Kernel, say) is not installed."""
    try:
        module = __import__(path, fromlist=[name])
        return getattr(module, name)
    except Exception:  # ImportError, or a broken install: the case runs without that variant
        return None
