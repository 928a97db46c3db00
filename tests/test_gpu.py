"""GPU detection through the real pynvml: a clear one-line error where NVML cannot start, the real
GPU where it can; and the matching of NVML's names to the catalog, which is pure data."""

from __future__ import annotations

import time

import pytest
import torch

from vramplan.catalog import list_gpus, resolve_gpu
from vramplan.gpu import detect_gpu, match_catalog, process_memory_bytes, used_memory_bytes
from vramplan.errors import VramplanError

GiB = 2**30


def _nvml_starts() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


NVML = _nvml_starts()


@pytest.mark.skipif(NVML, reason="NVML works here: the no-GPU error cannot happen")
@pytest.mark.parametrize("call", [detect_gpu, used_memory_bytes, process_memory_bytes])
def test_without_nvml_the_error_names_the_fix(call):
    with pytest.raises(VramplanError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no NVIDIA GPU found (NVML: ") and "--gpu NAME" in message and "--gpu 12GB" in message


@pytest.mark.parametrize(
    "nvml_name, total, expected",
    [
        ("NVIDIA GeForce RTX 4060 Laptop GPU", 8585216000, "rtx-4060-laptop"),
        ("NVIDIA GeForce RTX 4060", 8585740288, "rtx-4060"),
        ("NVIDIA H100 80GB HBM3", 85520809984, "h100"),
        ("NVIDIA H100 PCIe", 85520809984, "h100-pcie"),
        ("NVIDIA A100-SXM4-40GB", 42505273344, "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", 85899345920, "a100-80gb"),
        ("Tesla T4", 16106127360, "t4"),
        ("NVIDIA H200", 150754820096, "h200"),
        ("NVIDIA RTX 6000 Ada Generation", 51527024640, "rtx-6000-ada"),
    ],
)
def test_nvml_names_match_the_catalog_with_the_real_memory(nvml_name, total, expected):
    spec = match_catalog(nvml_name, total)
    assert spec.name == expected and spec.memory_bytes == total
    catalog_entry = resolve_gpu(expected)
    assert spec.bf16_tflops == catalog_entry.bf16_tflops and spec.bandwidth_gbs == catalog_entry.bandwidth_gbs


def test_every_catalog_label_finds_its_own_entry():
    for spec in list_gpus():
        assert match_catalog(spec.label, spec.memory_bytes).name == spec.name


def test_an_unknown_gpu_keeps_its_real_memory_and_unknown_speed():
    spec = match_catalog("NVIDIA GeForce RTX 9090 Super", 40 * GiB, supports_bf16=True)
    assert spec.name == "rtx-9090-super" and spec.label == "NVIDIA GeForce RTX 9090 Super"
    assert spec.memory_bytes == 40 * GiB and spec.bf16_tflops == 0 and spec.bandwidth_gbs == 0 and spec.kind == "budget"
    assert not match_catalog("Quadro RTX 4000", 8 * GiB, supports_bf16=False).supports_bf16


@pytest.mark.gpu
def test_detects_the_real_gpu():
    import pynvml

    torch.cuda.init()
    pynvml.nvmlInit()
    # NVML's total, not cudaMemGetInfo's: CUDA reports ~0.5 GB less on an H100 (what the driver keeps)
    total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
    found = detect_gpu(0)
    assert found.spec.memory_bytes == total
    assert found.nvml_name == torch.cuda.get_device_name(0)
    assert found.spec == match_catalog(found.nvml_name, total, supports_bf16=torch.cuda.is_bf16_supported())
    assert found.free_bytes + found.used_bytes <= total and found.driver.count(".") >= 1
    if "H100" in found.nvml_name:
        assert found.spec.name.startswith("h100") and found.spec.bf16_tflops > 700


@pytest.mark.gpu
def test_used_memory_sees_an_allocation():
    torch.zeros(1, device="cuda")  # the CUDA context first, so it is not part of the difference
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before, reserved_before = used_memory_bytes(0), torch.cuda.memory_reserved()
    block = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda").fill_(1)
    torch.cuda.synchronize()
    new_segments = torch.cuda.memory_reserved() - reserved_before  # 0 if a cached segment served it
    deadline = time.monotonic() + 3.0
    while (grown := used_memory_bytes(0) - before) < new_segments and time.monotonic() < deadline:
        time.sleep(0.05)  # in a VM, NVML's reading can trail the allocation
    assert abs(grown - new_segments) < 256 * 2**20
    held = process_memory_bytes()
    # 0 where NVML lists host PIDs (a container with its own PID namespace); else context + the block
    assert held == 0 or held > 2 * GiB
    del block
