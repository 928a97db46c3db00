"""Attention for heads wider than SDPA's flash and cuDNN kernels take, as chunked matmuls.

Gemma 4's full-attention layers have 512-wide heads. SDPA runs them on its memory-efficient
kernels, whose backward for wide heads is slow: on the H100, Gemma-4-E2B at 2,048 tokens spent
6.6 ms a call in ``fmha_cutlassB`` against 0.4 ms in the forward, 46 ms of a 160 ms step for its
seven full layers (benchmarks/results/session13/profile-graphs-gemma-4-e2b-text-2048.txt).

Here the same softmax attention runs as cuBLAS matmuls over chunks of queries: each chunk's
scores (fp32 out of bf16 inputs) exist only while the chunk is computed, the causal chunk reads
only the keys up to its last query, and the backward recomputes the chunk's probabilities from
the saved log-sum-exp as flash attention does. Peak extra memory is a few score chunks
(``memory.activations.CHUNKED_ATTENTION_SCORE_BYTES`` each), not the [heads, tokens, tokens] square. The row passes between the matmuls
(scale, mask, softmax; the probabilities' gradient) run as one Triton launch each way on causal chunks
(``vramplan_kernels.attention_rows``, switch ``wide_head_fused_rows``: 2.2x faster than six to eight PyTorch
passes at E2B's full-layer shape), or as those PyTorch ops under a padding mask or with the switch off.

It is hooked in where transformers looks up its ``sdpa`` function (``install``): the attention
modules, their KV sharing and the decoder loop stay untouched (see vramplan.train.patching), and
anything the chunked path does not cover (inference, dropout, position biases, narrow heads,
cached decoding) goes to transformers' own function.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable

import torch

from vramplan.memory.activations import (FLASH_MAX_HEAD_DIM, band_pays, chunked_attention_chunk_rows,
                                         chunked_attention_chunks)
from vramplan.train import switches
from vramplan_kernels.attention_rows import softmax_grad_rows, softmax_rows
from vramplan_kernels.dispatch import use_triton
from vramplan_kernels.wide_matmul import matmul_fp32


def _accumulator(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, float64 for float64 (the tests' reference precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t times ``scale`` in place; no pass over it when the scale is 1 (Gemma 4's, whose q and k are normed)."""
    return t if scale == 1.0 else t.mul_(scale)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool, first_query: int, queries: int,
            window: int = 0) -> torch.Tensor:
    """Apply a chunk's mask in place: causal (key index past the query's; with a ``window``, also ``window`` keys or
    more before it), boolean (False = masked) or additive. The scores' rows are the chunk's ``queries`` repeated for
    each query head sharing a K/V head; ``first_query`` counts from the chunk's first key."""
    if causal:  # only the keys from the chunk's first query on can lie in a query's future: mask that block alone
        rows, keys = scores.shape[-2:]
        query = first_query + torch.arange(rows, device=scores.device) % queries
        future = torch.arange(first_query, keys, device=scores.device)[None, :] > query[:, None]
        scores[..., first_query:].masked_fill_(future, float("-inf"))
        if window:
            past = torch.arange(keys, device=scores.device)[None, :] <= query[:, None] - window
            scores.masked_fill_(past, float("-inf"))
    elif mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.to(scores.dtype))
    return scores


def _chunk_mask(mask: torch.Tensor | None, groups: int, start: int, stop: int, keys: int) -> torch.Tensor | None:
    """The mask rows of queries start..stop, broadcast like the grouped scores [b, kv heads, groups * rows, keys]
    (a mask reads every key from the first: only causal chunks start later, ``chunked_attention_chunks``)."""
    if mask is None:
        return None
    rows = mask[..., start:stop, :keys]  # [b or 1, heads or 1, rows, keys]
    b, h = rows.shape[:2]
    if h == 1:
        return rows.unsqueeze(2).expand(b, 1, groups, stop - start, keys).reshape(b, 1, groups * (stop - start), keys)
    return rows.reshape(b, h // groups, groups * (stop - start), keys)


def _probabilities(scores, lse, scale, mask, groups, start, stop, first, upto, causal, window) -> torch.Tensor:
    """A chunk's fp32 probabilities from its raw scores (in place): scaled, masked, less the rows' log-sum-exp, exp'd;
    a fully masked row gives 0."""
    _masked(_scaled(scores, scale), _chunk_mask(mask, groups, start, stop, upto), causal, start - first, stop - start,
            window)
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(lse.nan_to_num(posinf=0.0, neginf=0.0)).exp_(), lse


class ChunkedAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + mask)·v over query chunks; q [b, h, s, d], k and v [b, h_kv, s_k, d] (grouped queries
    share a K/V head without copies). Saves q, k, v, the output and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, chunk, window):
        b, h, s, d = q.shape
        h_kv, keys = k.shape[1], k.shape[2]
        g = h // h_kv
        q5 = q.view(b, h_kv, g, s, d)
        out = torch.empty(b, h_kv, g, s, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h_kv, g, s, dtype=_accumulator(q), device=q.device)
        fused = causal and fused_rows_apply(q)
        for start, stop, first, upto in chunked_attention_chunks(s, keys, chunk, causal, window):
            qc = q5[:, :, :, start:stop].reshape(b, h_kv, g * (stop - start), d)
            scores = matmul_fp32(qc, k[:, :, first:upto].transpose(-1, -2))
            if fused:  # scale, mask, log-sum-exp and the bf16 probabilities in one Triton pass
                probs, chunk_lse = softmax_rows(scores, scale, True, start - first, stop - start, v.dtype, window)
            else:
                probs, chunk_lse = _probabilities(scores, None, scale, mask, g, start, stop, first, upto, causal, window)
                probs = probs.to(v.dtype)
            del scores
            out[:, :, :, start:stop] = torch.matmul(probs, v[:, :, first:upto]).view(b, h_kv, g, stop - start, -1)
            lse[:, :, :, start:stop] = chunk_lse.view(b, h_kv, g, stop - start)
            del probs  # before the next chunk's scores: one chunk's buffers at a time, as the planner prices them
        out = out.view(b, h, s, -1)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.causal, ctx.chunk, ctx.fused, ctx.window = scale, causal, chunk, fused, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        scale, causal, chunk, window = ctx.scale, ctx.causal, ctx.chunk, ctx.window
        b, h, s, d = q.shape
        h_kv, keys = k.shape[1], k.shape[2]
        g = h // h_kv
        q5, o5, do5 = q.view(b, h_kv, g, s, d), out.view(b, h_kv, g, s, -1), grad_out.contiguous().view(b, h_kv, g, s, -1)
        grad_q = torch.empty_like(q).view(b, h_kv, g, s, d)
        grad_k = torch.zeros(k.shape, dtype=_accumulator(k), device=k.device)
        grad_v = torch.zeros(v.shape, dtype=_accumulator(v), device=v.device)
        for start, stop, first, upto in chunked_attention_chunks(s, keys, chunk, causal, window):
            rows = g * (stop - start)
            qc = q5[:, :, :, start:stop].reshape(b, h_kv, rows, d)
            doc = do5[:, :, :, start:stop].reshape(b, h_kv, rows, -1)
            kc, vc = k[:, :, first:upto], v[:, :, first:upto]
            scores = matmul_fp32(qc, kc.transpose(-1, -2))
            chunk_lse = lse[:, :, :, start:stop].reshape(b, h_kv, rows, 1)
            delta = (doc.to(grad_v.dtype) * o5[:, :, :, start:stop].reshape(b, h_kv, rows, -1)).sum(-1, keepdim=True)
            if ctx.fused:  # P again and dS = P ⊙ (dP − δ)·scale, both bf16, in one Triton pass
                probs, grad_scores = softmax_grad_rows(scores, matmul_fp32(doc, vc.transpose(-1, -2)), chunk_lse,
                                                       delta, scale, True, start - first, stop - start, q.dtype, window)
                del scores
                grad_v[:, :, first:upto] += torch.matmul(probs.transpose(-1, -2), doc)
            else:
                probs, _ = _probabilities(scores, chunk_lse, scale, mask, g, start, stop, first, upto, causal, window)
                del scores
                grad_v[:, :, first:upto] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), doc)
                grad_scores = _scaled(matmul_fp32(doc, vc.transpose(-1, -2)).sub_(delta).mul_(probs), scale).to(q.dtype)
            grad_q[:, :, :, start:stop] = torch.matmul(grad_scores, kc).view(b, h_kv, g, stop - start, d)
            grad_k[:, :, first:upto] += torch.matmul(grad_scores.transpose(-1, -2), qc)
            # before the next chunk's: held across it, this chunk's score-sized buffers had made the widest chunk's
            # backward hold 3.75 chunks of fp32 scores where 3 are priced (the fused rows; 2.5 in PyTorch)
            del probs, grad_scores
        return grad_q.view(b, h, s, d), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None, None


def fused_rows_apply(q: torch.Tensor) -> bool:
    """Whether a causal call's row passes run as the Triton kernels of ``vramplan_kernels.attention_rows`` (switch
    ``wide_head_fused_rows``; CUDA tensors, or the interpreter when the kernel tests force Triton)."""
    return switches.enabled("wide_head_fused_rows") and use_triton(q)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                      scale: float | None = None, causal: bool = False, chunk: int | None = None,
                      window: int = 0) -> torch.Tensor:
    """Softmax attention over query chunks, as ``F.scaled_dot_product_attention`` computes it (grouped K/V heads
    allowed; ``causal`` aligns queries and keys at their start, the mask is ignored then; a ``window`` with
    ``causal`` keeps each query's last ``window`` keys, itself included, as transformers' sliding window does)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    window = int(window) if causal and window and window < k.shape[2] else 0
    chunk = chunk or chunked_attention_chunk_rows(q.shape[0], q.shape[1], k.shape[2], window)  # the planner's rule
    return ChunkedAttention.apply(q, k, v, None if causal else mask, float(scale), bool(causal), int(chunk), window)


def band_mask(seq: int, window: int, device) -> torch.Tensor:
    """The boolean [seq, seq] mask of causal attention over a sliding ``window`` (True = attend): q − window < k ≤ q."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril().triu(1 - window)


def attention_reference(q, k, v, mask=None, scale=None, causal=False, window=0) -> torch.Tensor:
    """The same in plain PyTorch over the whole square (K/V heads repeated), for the tests."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal and window:
        scores = scores.masked_fill(~band_mask(q.shape[2], window, q.device), float("-inf"))
    elif causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
                                    .triu(1 + k.shape[2] - q.shape[2]), float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def takes_chunked_path(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                       kwargs: dict, min_head_dim: int = FLASH_MAX_HEAD_DIM + 1, window: int = 0) -> bool:
    """Whether a call of transformers' sdpa function runs here: a training step's wide heads, or a sliding ``window``
    whose mask was left to this call (:func:`band_window`), queries and keys of one length, nothing SDPA's other
    arguments would change (dropout, a position bias, soft-capping)."""
    wide = query.shape[-1] >= min_head_dim and switches.enabled("wide_head_attention")
    banded = bool(window) and switches.enabled("sliding_band_attention")
    return ((wide or banded) and key.shape[-1] == value.shape[-1] == query.shape[-1]
            and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            and dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False) and query.shape[2] == key.shape[2] > 1)


def band_window(module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> int:
    """The sliding window a call must apply itself: its layer's window (transformers' ``sliding_window`` argument, or
    the module's) where the row is longer and no mask came, which only the trainer's steps arrange
    (:func:`sliding_masks_left_out`, vramplan.train.graphs.packing_decided); 0 otherwise."""
    if attention_mask is not None:
        return 0
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return window if isinstance(window, int) and 0 < window < key.shape[2] == query.shape[2] else 0


_BANDS = False  # whether the installed function also takes sliding windows' bands (install(bands=True))


def bands_sliding_windows() -> bool:
    """Whether transformers' sliding-window masks may be left out of an unpadded, unpacked step: the installed sdpa
    function applies their windows itself (switch ``sliding_band_attention``)."""
    from transformers.modeling_utils import AttentionInterface

    return _BANDS and switches.enabled("sliding_band_attention") and hasattr(
        AttentionInterface._global_mapping.get("sdpa"), "vramplan_original")


@contextlib.contextmanager
def sliding_masks_left_out():
    """While a step's forward builds its masks: leave transformers' sliding-window mask out of unpadded rows whose
    queries and keys align and are long enough for the band to pay (vramplan.memory.activations.band_pays), where the
    installed sdpa function applies the windows itself (:func:`bands_sliding_windows`).
    transformers never asks (``allow_is_causal_skip`` off) for packed rows, padded ones, or masks with any other
    pattern (a vision block's bidirectional attention): those keep theirs. Captured steps decide the same in
    vramplan.train.graphs.packing_decided, which also knows the packing without a host sync."""
    if not bands_sliding_windows():
        yield
        return
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa
    signature = inspect.signature(original)

    @functools.wraps(original)  # its signature stays transformers' for packing_decided's wrapper to bind
    def skip_sliding_mask(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        window, rows = given.get("local_attention_size"), given.get("q_length")
        if (window is not None and given.get("padding_mask") is None and rows == given.get("kv_length")
                and band_pays(window, rows)):
            return True
        return original(*args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = skip_sliding_mask
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


def with_wide_heads(original: Callable, min_head_dim: int = FLASH_MAX_HEAD_DIM + 1) -> Callable:
    """transformers' ``sdpa_attention_forward`` with wide heads, and sliding windows whose mask was left out, through
    :func:`chunked_attention`; everything else, and every call on CPU tensors unless ``min_head_dim`` is lowered
    (tests), through ``original`` (a left-out window then as its explicit band mask)."""

    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
        window = band_window(module, query, key, attention_mask, kwargs)
        if (query.is_cuda or min_head_dim <= FLASH_MAX_HEAD_DIM) and \
                takes_chunked_path(query, key, value, dropout, kwargs, min_head_dim, window):
            causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            causal = bool(causal_flag) and attention_mask is None
            out = chunked_attention(query, key, value, attention_mask, scaling, causal, window=window)
            return out.transpose(1, 2).contiguous(), None
        if window:
            attention_mask, is_causal = band_mask(query.shape[2], window, query.device)[None, None], False
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)

    sdpa_attention_forward.vramplan_original = original
    return sdpa_attention_forward


def install(min_head_dim: int = FLASH_MAX_HEAD_DIM + 1, bands: bool = False) -> bool:
    """Point transformers' ``sdpa`` attention at :func:`with_wide_heads` (process-wide, once); True if it now is.
    ``bands``: the model's sliding-window modules name their windows, so their masks may be left out
    (:func:`bands_sliding_windows`)."""
    global _BANDS
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    current = mapping.get("sdpa")
    if current is None:
        return False
    _BANDS = _BANDS or bands
    if hasattr(current, "vramplan_original"):
        return True
    mapping["sdpa"] = with_wide_heads(current, min_head_dim)
    return True


def uninstall() -> None:
    """Give transformers back its own ``sdpa`` function."""
    global _BANDS
    from transformers.modeling_utils import AttentionInterface

    _BANDS = False
    current = AttentionInterface._global_mapping.get("sdpa")
    if current is not None and hasattr(current, "vramplan_original"):
        AttentionInterface._global_mapping["sdpa"] = current.vramplan_original
