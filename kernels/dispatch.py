"""Chooses between an op's Triton kernel and its plain-PyTorch reference.

The default (``auto``) runs Triton on CUDA tensors and the reference on CPU tensors, so the
trainer runs everywhere. Kernel tests force Triton on the CPU, where it runs in the
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), to check the kernels
themselves. ``VRAMPLAN_KERNELS=reference`` turns every kernel off (to bisect a bug).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

_MODES = ("auto", "triton", "reference")


class Switch:
    """A process-wide choice among fixed values: read once from an environment variable, and
    overridable for a block of code (tests and benchmarks force a path this way)."""

    def __init__(self, env: str, choices: tuple[str, ...], default: str):
        self.env, self.choices = env, choices
        self.value = os.environ.get(env, default)
        if self.value not in choices:
            raise ValueError(f"{env}={self.value!r}; choose one of {', '.join(choices)}")

    @contextlib.contextmanager
    def override(self, value: str) -> Iterator[None]:
        if value not in self.choices:
            raise ValueError(f"{value!r} for {self.env}; choose one of {', '.join(self.choices)}")
        previous, self.value = self.value, value
        try:
            yield
        finally:
            self.value = previous


_MODE = Switch("VRAMPLAN_KERNELS", _MODES, "auto")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Should an op given ``tensor`` launch its Triton kernel?"""
    if _MODE.value == "reference":
        return False
    if _MODE.value == "triton":
        return tensor.is_cuda or interpreting()
    return tensor.is_cuda


def kernel_mode(mode: str):
    """Temporarily force ``triton`` or ``reference`` (tests and benchmarks)."""
    return _MODE.override(mode)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): launch grids are sized by it."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
