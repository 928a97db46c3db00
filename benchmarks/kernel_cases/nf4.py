"""NF4 dequantization at real weight shapes: vramplan's Triton kernel vs bitsandbytes vs PyTorch.

The kernel is bound by memory: it reads the packed codes and the 8-bit absmax and writes bf16,
so ``bytes_moved`` is those three and the result is a fraction of measured bandwidth.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from vramplan_kernels.nf4 import ABSMAX_BLOCKSIZE, dequantize_nf4, dequantize_nf4_reference, quantize_nf4

# [out, in] of the MLP projections (up/gate, down) and one attention projection
WEIGHT_SHAPES = {
    "gemma4-e2b up (6144x1536)": (6144, 1536),
    "gemma4-e2b down (1536x6144)": (1536, 6144),
    "gemma4-e2b wide up (12288x1536)": (12288, 1536),
    "gemma4-e4b up (10240x2560)": (10240, 2560),
    "gemma4-e4b down (2560x10240)": (2560, 10240),
    "llama3.1-8b q (4096x4096)": (4096, 4096),
    "llama3.1-8b up (14336x4096)": (14336, 4096),
    "llama3.1-8b down (4096x14336)": (4096, 14336),
}


def dequant_bytes(numel: int, blocksize: int = 64, out_bytes: int = 2) -> int:
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // ABSMAX_BLOCKSIZE) + out_bytes * numel


def cases(device, shapes: dict[str, tuple[int, int]] | None = None) -> list[Case]:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # the GPU machine may not have it: compare with PyTorch only
        bnbf = None
    result = []
    for name, shape in (shapes or WEIGHT_SHAPES).items():
        weight = torch.randn(shape, device=device, dtype=torch.bfloat16)
        q = quantize_nf4(weight)
        out = torch.empty(shape, device=device, dtype=torch.bfloat16)
        variants = {"vramplan": lambda q=q, out=out: dequantize_nf4(q, out=out)}
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
            # bitsandbytes writes into a given buffer on CUDA only (its CPU backend lacks the .out op)
            bnb_out = torch.empty(shape, device=device, dtype=torch.bfloat16) if out.is_cuda else None
            variants["bitsandbytes"] = lambda p=packed, s=state, o=bnb_out: bnbf.dequantize_4bit(p, s, out=o)
        variants["torch"] = lambda q=q: dequantize_nf4_reference(q)
        result.append(Case(op="nf4_dequantize", shape=name, variants=variants, bytes_moved=dequant_bytes(q.numel()),
                           notes="double-quantized absmax, bf16 out, preallocated output"))
        del weight
    return result
