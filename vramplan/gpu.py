"""The GPU in this machine, as NVML sees it: its name, its memory, and what a process holds.

NVML (through pynvml) is the driver's own account: it sees the CUDA context and every
allocator's reservations, which torch's counters do not, so it is what a plan must fit
under and what calibration measures. Each call opens and closes NVML; it is cheap and
keeps no state behind the caller's back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vramplan.catalog import GpuSpec, gpus_named_by_nvml
from vramplan.errors import VramplanError

_NAME_A_GPU = "name one with --gpu NAME (see `vramplan gpus`) or give a budget such as --gpu 12GB"


@dataclass(frozen=True)
class DetectedGpu:
    """A GPU found by NVML: its catalog entry (with the real total memory) and its state now."""

    spec: GpuSpec
    free_bytes: int
    used_bytes: int
    driver: str
    nvml_name: str


@contextmanager
def _nvml() -> Iterator[Any]:
    try:
        import pynvml
    except ImportError:
        raise VramplanError(f"cannot detect the GPU: the nvidia-ml-py package is not installed; {_NAME_A_GPU}") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise VramplanError(f"no NVIDIA GPU found (NVML: {err}); {_NAME_A_GPU}") from None
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # pynvml returned bytes before nvidia-ml-py 11.515
    return value.decode() if isinstance(value, bytes) else value


def _handle(pynvml: Any, index: int) -> Any:
    count = pynvml.nvmlDeviceGetCount()
    if not 0 <= index < count:
        raise VramplanError(f"there is no GPU {index}: NVML sees {count} (indices 0 to {count - 1}); {_NAME_A_GPU}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def match_catalog(nvml_name: str, total_bytes: int, supports_bf16: bool = True, profiles: str | Path | None = None) -> GpuSpec:
    """The catalog entry for a GPU that NVML calls ``nvml_name``, with ``total_bytes`` as its memory.

    Where one name covers several sizes (the RTX 4060 Ti has 8 and 16 GB) the entry nearest in
    memory wins. A GPU the catalog lacks still gets a spec: its memory is known, its speed is not
    (zeros, like a bare budget), and ``supports_bf16`` comes from its compute capability.
    """
    candidates = gpus_named_by_nvml(nvml_name, profiles)
    if candidates:
        nearest = min(candidates, key=lambda spec: abs(spec.memory_bytes - total_bytes))
        return replace(nearest, memory_bytes=total_bytes)
    slug = re.sub(r"[^a-z0-9]+", "-", nvml_name.lower().replace("nvidia", "").replace("geforce", "")).strip("-")
    return GpuSpec(name=slug or "unknown-gpu", label=nvml_name, memory_bytes=total_bytes, supports_bf16=supports_bf16, kind="budget")


def has_bf16_arithmetic(major: int) -> bool:
    """Whether a GPU of compute capability ``major``.x computes in bf16: Ampere (8.x) and later. Turing (T4, RTX 20xx)
    and Volta (V100) have none; torch emulates some ops there and Triton's bf16 dot does not compile."""
    return major >= 8


def detect_gpu(index: int = 0, profiles: str | Path | None = None) -> DetectedGpu:
    """The GPU at CUDA/NVML ``index``, matched to the catalog; raises VramplanError without one."""
    with _nvml() as pynvml:
        handle = _handle(pynvml, index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        major, _minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    spec = match_catalog(name, int(memory.total), supports_bf16=has_bf16_arithmetic(major), profiles=profiles)
    return DetectedGpu(spec=spec, free_bytes=int(memory.free), used_bytes=int(memory.used), driver=driver, nvml_name=name)


def used_memory_bytes(index: int = 0) -> int:
    """Memory in use on GPU ``index`` by everyone, as nvidia-smi shows it.

    Sampling this before and after a run gives the run's footprint even where NVML cannot
    attribute memory to processes (containers with their own PID namespace).
    """
    with _nvml() as pynvml:
        return int(pynvml.nvmlDeviceGetMemoryInfo(_handle(pynvml, index)).used)


def process_memory_bytes(pid: int | None = None) -> int:
    """GPU memory held by process ``pid`` (default: this one), summed over all GPUs, from NVML's process list.

    It includes the CUDA context (0.4-0.6 GB) that torch's counters miss. 0 when NVML lists no
    such process: none has started CUDA yet, or, inside a container, NVML lists host PIDs
    (then use :func:`used_memory_bytes` before and after instead).
    """
    pid = os.getpid() if pid is None else pid
    total = 0
    with _nvml() as pynvml:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            seen: set[int] = set()  # a process with a compute and a graphics context is listed twice
            for listing in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
                for process in listing(handle):
                    if process.pid != pid or process.pid in seen:
                        continue
                    seen.add(process.pid)
                    if process.usedGpuMemory is None:
                        raise VramplanError(
                            "NVML does not report per-process GPU memory on this system (WSL or a restricted driver); "
                            "measure with used_memory_bytes() before and after instead"
                        )
                    total += int(process.usedGpuMemory)
    return total


def gpu_and_budget(option: str | None) -> tuple[GpuSpec | None, int | None, str | None]:
    """What a ``--gpu`` option means: (catalog GPU or bare budget, budget in bytes, driver version).

    ``auto`` is the detected GPU with its free memory right now (and its driver, which
    calibrations are keyed by); a catalog name is that card less the driver's reserve; ``12GB``
    is a bare budget. None: no GPU named.
    """
    from vramplan.catalog import resolve_gpu
    from vramplan.estimate import budget_bytes

    if option is None:
        return None, None, None
    if option.strip().lower() == "auto":
        detected = detect_gpu()
        return detected.spec, detected.free_bytes, detected.driver
    gpu = resolve_gpu(option)
    return gpu, budget_bytes(gpu), None
