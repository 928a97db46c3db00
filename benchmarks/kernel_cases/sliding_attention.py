"""Attention of sliding-window layers (Gemma 4's local layers: 256-wide heads, window 512), forward+backward, bf16:
vramplan's chunked attention over the window's band (fused row passes, and in PyTorch; the fused one also with its
chunks' first keys unaligned, as before session 15) against SDPA under the
explicit band mask transformers gives it, which computes the whole masked square, and SDPA's causal kernel, which
is not the same function (every key up to the query) but the cost of the square's causal half. Shapes are (batch,
query heads, K/V heads, tokens, head width, window). Timed from a CUDA graph too, as the trainer replays it.
"""

from __future__ import annotations

import torch

from benchmarks.fwd_bwd import forward_backward
from benchmarks.harness import Case
from vramplan.memory import activations
from vramplan.train import switches
from vramplan.train.attention import band_mask, chunked_attention

SHAPES = {
    "gemma-4-e2b sliding 2048": (1, 8, 1, 2048, 256, 512),
    "gemma-4-e2b sliding 4096": (1, 8, 1, 4096, 256, 512),
    "gemma-4-e2b sliding 6144": (1, 8, 1, 6144, 256, 512),
    "gemma-4-e2b sliding 8192": (1, 8, 1, 8192, 256, 512),
    "gemma-4-e4b sliding 8192": (1, 8, 2, 8192, 256, 512),
}


def _step(fn, q, k, v, grad):
    """The forward and backward of ``fn(q, k, v)`` as one zero-argument callable to time."""
    return forward_backward(lambda: fn(q, k, v), (q, k, v), (grad,))


def _band(fused: bool, window: int):
    def fn(q, k, v):
        with switches.forced(wide_head_fused_rows=fused):
            return chunked_attention(q, k, v, scale=1.0, causal=True, window=window)
    return fn


def _unaligned(step):
    """``step`` (forward and backward) with the band's chunks reading from exactly ``window - 1`` keys before their
    first query, as before session 15, instead of from a multiple of ``activations.BAND_KEY_MULTIPLE``."""
    def run():
        shipped = activations.BAND_KEY_MULTIPLE
        activations.BAND_KEY_MULTIPLE = 1
        try:
            return step()
        finally:
            activations.BAND_KEY_MULTIPLE = shipped
    return run


def _sdpa_masked(mask):
    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    return fn


def _sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True, enable_gqa=True)


def cases(device, shapes=None) -> list[Case]:
    out = []
    for name, (b, h, h_kv, s, d, window) in (SHAPES if shapes is None else shapes).items():
        g = torch.Generator(device=device).manual_seed(0)
        q = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
        k = (torch.randn(b, h_kv, s, d, device=device, dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
        v = torch.randn(b, h_kv, s, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        grad = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g)
        mask = band_mask(s, window, device)[None, None]
        variants = {"vramplan band, fused rows": _step(_band(True, window), q, k, v, grad),
                    "vramplan band, fused rows, unaligned keys": _unaligned(_step(_band(True, window), q, k, v, grad)),
                    "vramplan band": _step(_band(False, window), q, k, v, grad),
                    "sdpa, band mask (transformers)": _step(_sdpa_masked(mask), q, k, v, grad),
                    "sdpa causal (not the same function)": _step(_sdpa_causal, q, k, v, grad)}
        band_keys = window - window * window / (2 * s)  # mean keys a query attends
        out.append(Case(op="sliding-window attention fwd+bwd", shape=name, variants=variants,
                        flops=int(3.5 * 4 * b * h * s * band_keys * d), measure_peak_memory=True, cuda_graph=True,
                        notes=f"window {window}, scale 1, bf16; FLOPs: forward and backward (2.5 forwards) over the band"))
    return out
