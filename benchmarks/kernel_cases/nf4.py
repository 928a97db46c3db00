"""NF4 dequantization at real weight shapes: vramplan's Triton kernel vs bitsandbytes vs PyTorch.

The kernel is bound by memory: it reads the packed codes and the 8-bit absmax and writes bf16,
so ``bytes_moved`` is those three and the result is a fraction of measured bandwidth.

A decode of a Gemma-4-E2B weight takes ~10 µs, so the eager timing carries launch gaps: the
cases are also timed from a CUDA graph (the kernel's own time, which the bandwidth fraction
uses). Each call decodes ``repeats`` distinct weights of the shape, at least 128 MB of traffic in
all, so a graph's back-to-back replays cannot find a small weight still in the H100's 50 MB L2.
Beside the rivals: "ceiling: copy" copies the same number of bytes (what this size allows), and
vramplan's other launches (the byte kernel, other tiles and grids) at the smaller shapes, so
one run says which launch ``nf4._dequant_config`` should pick.
"""

from __future__ import annotations

import torch

from benchmarks.harness import YARDSTICK, Case
from vramplan_kernels.nf4 import (
    ABSMAX_BLOCKSIZE,
    BYTE_KERNEL,
    DequantConfig,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_with,
    quantize_nf4,
)

# [out, in] of the MLP projections (up/gate, down) and one attention projection
WEIGHT_SHAPES = {
    "gemma4-e2b kv (256x1536)": (256, 1536),
    "gemma4-e2b q (2048x1536)": (2048, 1536),
    "gemma4-e2b up (6144x1536)": (6144, 1536),
    "gemma4-e2b down (1536x6144)": (1536, 6144),
    "gemma4-e2b wide up (12288x1536)": (12288, 1536),
    "gemma4-e4b up (10240x2560)": (10240, 2560),
    "gemma4-e4b down (2560x10240)": (2560, 10240),
    "llama3.1-8b q (4096x4096)": (4096, 4096),
    "llama3.1-8b up (14336x4096)": (14336, 4096),
    "llama3.1-8b down (4096x14336)": (4096, 14336),
}
#: where vramplan's alternative launches are timed too (the sizes that read below 70%, and one above)
SWEEP_SHAPES = ("gemma4-e2b kv (256x1536)", "gemma4-e2b q (2048x1536)", "gemma4-e2b up (6144x1536)", "gemma4-e2b down (1536x6144)", "llama3.1-8b q (4096x4096)",
                "gemma4-e4b up (10240x2560)")
#: (programs per SM: as many as its registers allow; ptxas for sm_90 gave 40 registers a thread
#: with the absmax prefetched at 128-512 words and 4-8 warps, 32 without, 80 at 1024 words / 8 warps)
LAUNCHES = {
    "vramplan byte kernel": BYTE_KERNEL,
    "vramplan words 256/4w, absmax not prefetched, 16/SM": DequantConfig(programs_per_sm=16, prefetch_absmax=False),
    "vramplan words 256/4w, 1 tile per program": DequantConfig(programs_per_sm=0),
    "vramplan words 256/4w, two waves": DequantConfig(programs_per_sm=24),
    "vramplan words 128/4w, one wave": DequantConfig(words=128, num_warps=4, programs_per_sm=12),
    "vramplan words 512/8w, one wave": DequantConfig(words=512, num_warps=8, programs_per_sm=6),
    "vramplan words 1024/8w, one wave": DequantConfig(words=1024, num_warps=8, programs_per_sm=3),
}
TRAFFIC_PER_CALL = 128 * 1024**2


def dequant_bytes(numel: int, blocksize: int = 64, out_bytes: int = 2) -> int:
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // ABSMAX_BLOCKSIZE) + out_bytes * numel


def _each(items, fn):
    """A callable running ``fn`` over every item (the case's repeats), returning the last result."""
    def run():
        for item in items:
            result = fn(*item)
        return result
    return run


def cases(device, shapes: dict[str, tuple[int, int]] | None = None) -> list[Case]:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # the GPU machine may not have it: compare with PyTorch only
        bnbf = None
    on_gpu = torch.device(device).type == "cuda"
    result = []
    for name, shape in (shapes or WEIGHT_SHAPES).items():
        numel = shape[0] * shape[1]
        bytes_moved = dequant_bytes(numel)
        repeats = max(1, -(-TRAFFIC_PER_CALL // bytes_moved)) if on_gpu else 1
        weights = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(repeats)]
        qs = [quantize_nf4(w) for w in weights]
        outs = [torch.empty(shape, device=device, dtype=torch.bfloat16) for _ in range(repeats)]
        variants = {"vramplan": _each(list(zip(qs, outs)), lambda q, out: dequantize_nf4(q, out=out))}
        if on_gpu:  # main's launch everywhere, the others where the sweep runs
            for label, config in LAUNCHES.items():
                if config == BYTE_KERNEL or name in SWEEP_SHAPES:
                    variants[label] = _each(list(zip(qs, outs)), lambda q, out, c=config: dequantize_nf4_with(q, out, c))
        if bnbf is not None:
            bnb = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
            # bitsandbytes writes into a given buffer on CUDA only (its CPU backend lacks the .out op)
            bnb_outs = [torch.empty(shape, device=device, dtype=torch.bfloat16) if on_gpu else None for _ in weights]
            variants["bitsandbytes"] = _each([(p, s, o) for (p, s), o in zip(bnb, bnb_outs)],
                                             lambda p, s, o: bnbf.dequantize_4bit(p, s, out=o))
        variants["torch"] = _each([(q,) for q in qs], dequantize_nf4_reference)
        if on_gpu:  # read + write of the op's traffic: bytes_moved / 2 copied
            copies = [(torch.empty(bytes_moved // 2, device=device, dtype=torch.uint8).random_(),
                       torch.empty(bytes_moved // 2, device=device, dtype=torch.uint8)) for _ in range(repeats)]
            variants[f"{YARDSTICK}copy of the same bytes"] = _each(copies, lambda src, dst: dst.copy_(src))
        result.append(Case(op="nf4_dequantize", shape=name, variants=variants, bytes_moved=bytes_moved,
                           cuda_graph=True, repeats=repeats,
                           notes=f"double-quantized absmax, bf16 out, preallocated output; {repeats} distinct "
                                 "weights a call, times per decode"))
        del weights
    return result
