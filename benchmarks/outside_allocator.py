"""What device memory a library takes outside torch's allocator, one probe per fresh process.

NVML counts it, ``torch.cuda.memory_reserved`` does not: bitsandbytes' paged (cudaMallocManaged)
optimizer states, cuBLAS(Lt) handles and kernel images. Each probe runs in its own process
above a context that exists already, and prints ``outside`` (NVML used minus reserved, above the
reading before the probe) as one JSON line.

    python -m benchmarks.outside_allocator            # every probe
    python -m benchmarks.outside_allocator paged:96:131072
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


def probe(name: str) -> dict:
    import torch

    torch.zeros(1, device="cuda")
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS exists before the baseline unless the probe is the matmul
    before = outside()
    kind, *args = name.split(":")
    if kind == "matmul":
        x = torch.randn(256, 256, device="cuda")
        torch.nn.functional.linear(x, x, x[0]).sum().item()  # fp32 addmm with bias: the cuBLASLt path
    elif kind == "paged":
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
    return {"probe": name, "outside": outside() - before}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(probe(sys.argv[2])), flush=True)
        return
    for name in sys.argv[1:] or PROBES:
        child = subprocess.run([sys.executable, "-m", "benchmarks.outside_allocator", "--one", name],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"probe": name, "error": child.stderr.strip().splitlines()[-1:]}),
              flush=True)


if __name__ == "__main__":
    main()
