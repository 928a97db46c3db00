"""Matmuls of 16-bit matrices with an fp32 result.

cuBLAS accumulates a 16-bit matmul in fp32 either way; writing the result in fp32 keeps what fp16 cannot hold and
what bf16 would round. fp16 steps scale their loss (2^16 to start), and a sum over every token (an adapter's weight
gradient) or over every query (a key's gradient in attention) passes fp16's 65,504 long before one token's gradient
does; Gemma's unscaled attention logits, rounded to bf16, would move by ~0.1. torch's CUDA ``mm`` and ``bmm`` take
``out_dtype=torch.float32`` (torch 2.8 and newer); elsewhere (the CPU, an older torch) the inputs are upcast first.
"""

from __future__ import annotations

import torch

_out_dtype = True  # whether this torch's CUDA mm/bmm take ``out_dtype``; cleared on the first refusal


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 (float64 inputs stay float64): 2-D, or batched over matching leading dimensions."""
    global _out_dtype
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and _out_dtype:
        try:
            if a.dim() == 2:
                return torch.mm(a, b, out_dtype=torch.float32)
            lead = a.shape[:-2]
            out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
            return out.view(*lead, a.shape[-2], b.shape[-1])
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype: upcast from now on
            _out_dtype = False
    return torch.matmul(a, b) if a.dtype == torch.float64 else torch.matmul(a.float(), b.float())
