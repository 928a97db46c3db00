"""The adapters' gradients held in one buffer, made before the backward that would make them.

A backward makes each adapter's gradient when it reaches that adapter, among its own transients (torch's small pool
serves the ones of at most 1 MiB). When the transients are freed, the pages the gradients sit on stay mapped around
the holes: torch's allocator never moves a live block. Made first, as views of one zeroed buffer, the gradients take
pages of their own and every backward adds into them. Captured steps hold them so since session 21
(``compact_captures``, ``train.graphs``); eager steps with the switch ``held_eager_gradients``.
"""

from __future__ import annotations

import torch

from vramplan.train import switches


def held_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors to hold the gradients of ``params``: views of one zeroed buffer (one allocation, pages of their
    own), or the gradients already there (an optimizer's flat buffer) and a zeroed tensor each for the rest."""
    kinds = {(p.dtype, p.device) for p in params}
    if any(p.grad is not None for p in params) or len(kinds) != 1 or not all(p.is_contiguous() for p in params):
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    (dtype, device), = kinds
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
    return [view.view_as(p) for view, p in zip(torch.split(flat, sizes), params)]


def point_gradients_at(params: list[torch.Tensor], held: list[torch.Tensor]) -> None:
    """Every ``.grad`` at its held tensor. One replaced (an eager micro-batch's backward) moves its value back into
    the held tensor; one dropped (``zero_grad(set_to_none=True)``) leaves it zeroed."""
    for p, tensor in zip(params, held):
        if p.grad is not tensor:
            if p.grad is None:
                tensor.zero_()
            else:
                tensor.copy_(p.grad)
            p.grad = tensor


def hold_eager_gradients(params: list[torch.Tensor]) -> bool:
    """Before an eager step's first backward: the gradients made as one buffer where none exist yet (the first step;
    later steps zero them in place, ``zero_grad(set_to_none=False)``). Whether the step holds them."""
    if not params or not switches.enabled("held_eager_gradients"):
        return False
    if any(p.grad is None for p in params):
        point_gradients_at(params, held_gradients(params))
    return True
