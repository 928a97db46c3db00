"""Chooses between an op's Triton kernel and its plain-PyTorch reference.

The default (``auto``) runs Triton on CUDA tensors and the reference on CPU tensors, so the
trainer runs everywhere. Kernel tests force Triton on the CPU, where it runs in the
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), to check the kernels
themselves. ``VRAMPLAN_KERNELS=reference`` turns every kernel off (to bisect a bug).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_MODES = ("auto", "triton", "reference")
_mode = os.environ.get("VRAMPLAN_KERNELS", "auto")
if _mode not in _MODES:
    raise ValueError(f"VRAMPLAN_KERNELS={_mode!r}; choose one of {', '.join(_MODES)}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Should an op given ``tensor`` launch its Triton kernel?"""
    if _mode == "reference":
        return False
    if _mode == "triton":
        return tensor.is_cuda or interpreting()
    return tensor.is_cuda


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Temporarily force ``triton`` or ``reference`` (tests and benchmarks)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r}; choose one of {', '.join(_MODES)}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous
