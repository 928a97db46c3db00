"""How fast this machine's host drives its GPU, and what that does to predicted speed.

An eager step (no CUDA graphs: checkpoints offloaded, MoE models, several GPUs, the hf recipe) is bound by its host:
the Python modules, autograd's engine and the driver's launches that queue its kernels. Hosts sold with one GPU model
differ here by half: eager runs of one plan took 0.134 s a step on one H100 machine and 0.241 s on
another (Llama-3.2-1B at 4,096 tokens, rank 128; benchmarks/results/session25). A tiny autograd loop times the same
work (:func:`autograd_op_us`): it read 27.7 and 38.9 µs an op on those two machines. The speed model's fitted host
cost per op (``vramplan.throughput.Factors.seconds_per_host_op``) holds for a host whose probe reads
:data:`REFERENCE_AUTOGRAD_OP_US`; :func:`host_scale` moves it to another host's reading. ``vramplan calibrate`` probes
the host it runs on and stores the reading (:func:`store_probe`), so later predictions on that machine use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

#: The probe's reading on the host the speed model's host cost per op holds for: the one that minimises the mean
#: step-time error of the probed eager runs no speed hold-out counts (session 24's rank sweep on the H100: 8 runs,
#: 24.7-36.0 µs an op), the calibrated cost per op kept (``benchmarks.throughput.reference_host_fit``: 10.4% there).
REFERENCE_AUTOGRAD_OP_US = 28.3
#: Where ``vramplan calibrate`` keeps this machine's reading: in the user's vramplan cache, beside (not among) the
#: calibrations, whose folder holds calibrations only.
PROBE_FILE = "host.json"


def autograd_op_us(device, layers: int = 24, rounds: int = 5) -> float:
    """Host µs an op of a tiny forward and backward through ``layers`` linear-and-SiLU layers on ``device`` (best of
    ``rounds`` of 20 passes): the Python, dispatcher, autograd and launch work an eager training step is made of,
    with almost no GPU work to wait on."""
    import torch

    x = torch.randn(4, 16, device=device)
    weights = [torch.randn(16, 16, device=device, requires_grad=True) for _ in range(layers)]
    ops = 4 * layers  # forward: matmul, SiLU; backward: their two gradient ops (the sum and its backward aside)

    def once() -> None:
        hidden = x
        for weight in weights:
            hidden = torch.nn.functional.silu(hidden @ weight)
        hidden.sum().backward()

    def drained() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(device)

    best = float("inf")
    for _ in range(rounds):
        once()
        drained()
        started = time.perf_counter()
        for _ in range(20):
            once()
        drained()
        best = min(best, (time.perf_counter() - started) / (20 * ops))
    return round(best * 1e6, 3)


def host_scale(probe_us: float | None) -> float:
    """How much longer this host takes per op than the reference host; 1 when it was not probed."""
    return probe_us / REFERENCE_AUTOGRAD_OP_US if probe_us else 1.0


@dataclass(frozen=True)
class HostProbe:
    """One machine's stored probe: the reading, the GPU it drove and when."""

    autograd_op_us: float
    gpu: str
    measured: str

    @classmethod
    def taken_now(cls, probe_us: float, gpu: str) -> "HostProbe":
        """A reading taken today."""
        return cls(autograd_op_us=float(probe_us), gpu=gpu, measured=date.today().isoformat())

    def describe(self) -> str:
        return (f"host probed {self.autograd_op_us:.1f} µs an op driving the {self.gpu} on {self.measured} "
                f"(reference {REFERENCE_AUTOGRAD_OP_US:.1f}): eager steps' host time x{host_scale(self.autograd_op_us):.2f}")


def _probe_path(directory: Path | None) -> Path:
    from vramplan.calibration import cache_dir

    return (directory or cache_dir().parent) / PROBE_FILE


def store_probe(probe_us: float, gpu: str, directory: Path | None = None) -> HostProbe:
    """Keep this machine's reading for later predictions (atomically: a failed write leaves the old one)."""
    from vramplan.atomic import write_json_atomic

    probe = HostProbe.taken_now(probe_us, gpu)
    path = _probe_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, probe.__dict__)
    return probe


def stored_probe(directory: Path | None = None) -> HostProbe | None:
    """This machine's stored reading, or None where none was stored."""
    import json

    from vramplan.errors import VramplanError

    path = _probe_path(directory)
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data: Any = json.loads(text)
        probe = HostProbe(autograd_op_us=float(data["autograd_op_us"]), gpu=str(data["gpu"]),
                          measured=str(data["measured"]))
    except (ValueError, KeyError, TypeError) as err:
        raise VramplanError(f"{path}: not a host probe ({err}); delete it or run `vramplan calibrate` again") from None
    if not probe.autograd_op_us > 0:
        raise VramplanError(f"{path}: autograd_op_us must be positive; delete it or run `vramplan calibrate` again")
    return probe
