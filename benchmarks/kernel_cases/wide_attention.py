"""Attention of heads wider than 256 (Gemma 4's full-attention layers), forward+backward, causal, bf16: vramplan's
chunked attention with its row passes fused (Triton) and in PyTorch, against SDPA (which runs its memory-efficient
kernels at these widths) and SDPA's math path; and the fused rows over chunks 4x smaller, which skip more of the
causal square's upper half in more, smaller matmuls, or 2x and 4x larger (fewer, larger matmuls; more memory). Shapes are (batch, query heads, K/V heads, tokens, head width) of
Gemma-4-E2B's and E4B's full layers; Gemma-4-31B's 32 × 4 heads at 2,048 tokens. Timed from a CUDA graph too, as the
trainer replays it.
"""

from __future__ import annotations

import torch

from benchmarks.fwd_bwd import forward_backward
from benchmarks.harness import Case
from vramplan.train import switches
from vramplan.memory.activations import chunked_attention_chunk_rows
from vramplan.train.attention import chunked_attention

SHAPES = {
    "gemma-4-e2b full 2048": (1, 8, 1, 2048, 512),
    "gemma-4-e2b full 8192": (1, 8, 1, 8192, 512),
    "gemma-4-e4b full 4096": (1, 8, 2, 4096, 512),
    "gemma-4-31b full 2048": (1, 32, 4, 2048, 512),
}


def _step(fn, q, k, v, grad):
    """The forward and backward of ``fn(q, k, v)`` as one zero-argument callable to time."""
    return forward_backward(lambda: fn(q, k, v), (q, k, v), (grad,))


def _chunked(fused: bool, size: float = 1.0):
    """The chunked attention; ``size``: chunks that many times the planner's budget (smaller chunks skip more of the
    causal square's upper half, and launch more, smaller matmuls)."""
    def fn(q, k, v):
        rows = min(q.shape[2], int(chunked_attention_chunk_rows(q.shape[0], q.shape[1], q.shape[2]) * size))
        with switches.forced(wide_head_fused_rows=fused):
            return chunked_attention(q, k, v, scale=1.0, causal=True, chunk=rows)
    return fn


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True, enable_gqa=True)


def _math(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return _sdpa(q, k, v)


def cases(device, shapes=None) -> list[Case]:
    out = []
    for name, (b, h, h_kv, s, d) in (SHAPES if shapes is None else shapes).items():
        g = torch.Generator(device=device).manual_seed(0)
        q = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
        k = (torch.randn(b, h_kv, s, d, device=device, dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
        v = torch.randn(b, h_kv, s, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        grad = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g)
        variants = {"vramplan chunked, fused rows": _step(_chunked(True), q, k, v, grad),
                    "vramplan chunked, fused rows, chunks / 4": _step(_chunked(True, 0.25), q, k, v, grad),
                    "vramplan chunked, fused rows, chunks x 2": _step(_chunked(True, 2), q, k, v, grad),
                    "vramplan chunked, fused rows, chunks x 4": _step(_chunked(True, 4), q, k, v, grad),
                    "vramplan chunked": _step(_chunked(False), q, k, v, grad),
                    "sdpa (memory-efficient)": _step(_sdpa, q, k, v, grad)}
        if s <= 4096:
            variants["sdpa math"] = _step(_math, q, k, v, grad)
        out.append(Case(op="wide-head attention fwd+bwd", shape=name, variants=variants,
                        flops=int(3.5 * 4 * b * h * s * (s + 1) / 2 * d), measure_peak_memory=True, cuda_graph=True,
                        notes="causal, scale 1, bf16; FLOPs: forward and backward (2.5 forwards) over the causal half"))
    return out
