"""Measuring what a run really holds on the GPU, the way the planner counts it.

Two views, because they disagree: torch's caching allocator (allocated and reserved, per phase
of a step) and NVML's used memory for the whole device, which also sees the CUDA context,
cuBLAS workspaces and anything allocated outside torch. NVML has no peak counter, so a
background thread samples it; a short spike between samples can be missed, which is why the
sampler also folds in torch's reserved peak plus the non-allocator memory seen at the end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class PhasePeaks:
    """torch allocator peaks of one training step, each phase measured from its own start."""

    forward_allocated: int = 0
    backward_allocated: int = 0
    optimizer_allocated: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class NvmlPeakSampler:
    """Polls NVML's used memory of one device in a thread; ``peak_used`` is the largest reading.

    Use as a context manager around the work. ``baseline_used`` is the reading at entry, so
    ``peak_used - baseline_used`` is what the work added (the CUDA context excluded when it
    already existed at entry).
    """

    def __init__(self, index: int = 0, interval_s: float = 0.002, baseline_used: int | None = None):
        import pynvml

        self._pynvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.interval_s = interval_s
        self.peak_used = self.used()
        # an earlier reading may stand in for the baseline: two runs of one calibration are both
        # measured above the device as it was before the first (libraries it loaded stay counted)
        self.baseline_used = self.peak_used if baseline_used is None else baseline_used
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.used()
            self.samples += 1
            if value > self.peak_used:
                self.peak_used = value
            time.sleep(self.interval_s)

    def __enter__(self) -> "NvmlPeakSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-peak-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_used = max(self.peak_used, self.used())

    @property
    def peak_delta(self) -> int:
        return self.peak_used - self.baseline_used


def measure_step(forward: Callable[[], Any], backward: Callable[[Any], None], optimizer_step: Callable[[], None]) -> PhasePeaks:
    """Run one step's three phases, recording torch's allocator peak in each."""
    import torch

    peaks = PhasePeaks()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    peaks.forward_allocated = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    backward(out)
    del out
    torch.cuda.synchronize()
    peaks.backward_allocated = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer_step()
    torch.cuda.synchronize()
    peaks.optimizer_allocated = torch.cuda.max_memory_allocated()
    peaks.peak_allocated = max(peaks.forward_allocated, peaks.backward_allocated, peaks.optimizer_allocated)
    peaks.peak_reserved = torch.cuda.max_memory_reserved()
    return peaks


@dataclass
class StepTimes:
    """Wall time of each step, synchronised; the median after the first is the steady rate."""

    seconds: list[float] = field(default_factory=list)

    def median_after_first(self) -> float | None:
        tail = sorted(self.seconds[1:] or self.seconds)
        return tail[len(tail) // 2] if tail else None
