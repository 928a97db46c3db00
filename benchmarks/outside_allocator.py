"""What device memory a library takes outside torch's allocator, one probe per fresh process.

NVML counts it, ``torch.cuda.memory_reserved`` does not: bitsandbytes' paged (cudaMallocManaged)
optimizer states, cuBLAS(Lt) handles and kernel images. Each probe runs in its own process
above a context that exists already, and prints ``outside`` (NVML used minus reserved, above the
reading before the probe) as one JSON line.

    python -m benchmarks.outside_allocator            # every probe
    python -m benchmarks.outside_allocator paged:96:131072
    python -m benchmarks.outside_allocator --sequence paged:96:131072 nothing paged:96:131072

``--sequence`` asks what a process leaves behind: the probes run one child after another, as the trainer
benchmark's children do, and each line adds the device's used memory (NVML, every process's) read by the parent,
which never starts CUDA, before and after the child, and NVML's per-process listing inside the child after its
context and after its probe. A paging child left part of its 128 MiB managed reserve on the device (sessions 19-21's
baselines), and ``vramplan calibrate`` measures device-wide: whether NVML's per-process figure sees that leftover
decides whether calibrate can measure past it. ``prepaged:COUNT:BYTES`` is ``paged`` after one small managed allocation
made before the baseline: if it takes over what an earlier process left, a run measured above that baseline reads the
same whether or not one did.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBES = ["nothing", "matmul", "paged:1:12582912", "paged:96:131072", "paged:448:131072", "paged:2:5636096",
          "adam8:96:131072", "adam8plain:96:131072"]


def outside() -> int:
    import torch

    from vramplan.gpu import used_memory_bytes

    torch.cuda.synchronize()
    return used_memory_bytes() - torch.cuda.memory_reserved()


def listing() -> list[list[int]]:
    """NVML's compute processes on GPU 0: [pid, used bytes] (inside a container the pids are the host's)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return [[p.pid, int(p.usedGpuMemory or 0)] for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def probe(name: str) -> dict:
    import torch

    from vramplan.gpu import used_memory_bytes

    torch.zeros(1, device="cuda")
    context = {"device_used": used_memory_bytes(), "processes": listing()}
    kind, *args = name.split(":")
    if kind == "prepaged":  # a managed allocation before the baseline: does it take over a chunk left on the device?
        import bitsandbytes.functional as F

        F.fill(F.get_paged(4096, dtype=torch.uint8, device=torch.device("cuda", 0)), 0)
        torch.cuda.synchronize()
        context["after_first_managed"] = used_memory_bytes()
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS exists before the baseline unless the probe is the matmul
    before = outside()
    if kind == "matmul":
        x = torch.randn(256, 256, device="cuda")
        torch.nn.functional.linear(x, x, x[0]).sum().item()  # fp32 addmm with bias: the cuBLASLt path
    elif kind in ("paged", "prepaged"):
        import bitsandbytes.functional as F

        count, nbytes = int(args[0]), int(args[1])
        buffers = [F.get_paged(nbytes, dtype=torch.uint8, device=torch.device("cuda", 0)) for _ in range(count)]
        for b in buffers:
            F.fill(b, 0)
            F.prefetch_tensor(b)
    elif kind in ("adam8", "adam8plain"):
        from vramplan.train.optim import eight_bit_adamw

        count, numel = int(args[0]), int(args[1])
        params = [torch.nn.Parameter(torch.zeros(numel, device="cuda")) for _ in range(count)]
        for p in params:
            p.grad = torch.ones_like(p)
        cls = eight_bit_adamw(paged=kind == "adam8", flat=False)
        cls(params, lr=1e-3).step()
    torch.cuda.synchronize()
    return {"probe": name, "outside": outside() - before, "after_context": context,
            "after_probe": {"device_used": used_memory_bytes(), "processes": listing()}}


def run_child(name: str) -> dict:
    """One probe in a fresh process, its JSON line as a dict."""
    child = subprocess.run([sys.executable, "-m", "benchmarks.outside_allocator", "--one", name],
                           capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"probe": name, "error": child.stderr.strip().splitlines()[-1:]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(probe(sys.argv[2])), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--sequence":
        from vramplan.gpu import used_memory_bytes  # NVML only: the parent never starts CUDA

        for index, name in enumerate(sys.argv[2:]):
            before = used_memory_bytes()
            line = run_child(name)
            print(json.dumps({"child_index": index, "device_used_before": before, **line,
                              "device_used_after": used_memory_bytes()}), flush=True)
        return
    for name in sys.argv[1:] or PROBES:
        print(json.dumps(run_child(name)), flush=True)


if __name__ == "__main__":
    main()
