"""The row-wise passes of chunked attention (vramplan.train.attention), one Triton launch each way.

Chunked attention computes a chunk's scores S = q·kᵀ with cuBLAS (fp32 out) and then works on S row by row:
the forward scales and masks it, finds each row's log-sum-exp and writes the probabilities in bf16 for the
P·V matmul; the backward recomputes them from the saved log-sum-exp and forms dS = P ⊙ (dP − δ) · scale for the
dQ and dK matmuls. In plain PyTorch those are six to eight elementwise passes over the fp32 chunk (scale, mask,
logsumexp, subtract, exp, cast; then the same again with dP), and they, not the matmuls, took most of the
chunked path's time on Gemma-4-E2B. Here each direction reads the fp32 rows once or twice and writes the bf16
results once. The causal mask, and a sliding window's, are built from the row's query index; other masks stay on
the PyTorch path.

Rows of a chunk's scores are [batch, kv heads, group, queries] flattened, so a row's query is
``first_query + row % queries``, counted from the chunk's first key; its keys run 0..cols-1 and a key past the query
is masked, as is, with a ``window`` W, a key W or more before it (transformers' sliding window: q − W < k ≤ q).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import use_triton

BLOCK_COLS = 1024


@triton.jit
def _scaled_scores(S, base, offs, cols, scale, query, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """A block of a row's scores times ``scale``, -inf where masked (past the row's query, under CAUSAL; ``window``
    keys or more before it, under WINDOWED), and which of its columns exist."""
    inside = offs < cols
    keep = inside
    if CAUSAL:
        keep = keep & (offs <= query)
    if WINDOWED:
        keep = keep & (offs > query - window)
    z = tl.load(S + base + offs, mask=inside, other=0.0).to(tl.float32) * scale
    return tl.where(keep, z, float("-inf")), inside


@triton.jit
def _forward_rows_kernel(S, P, LSE, cols, scale, first_query, queries, window,
                         CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    query = first_query + row % queries
    base = row.to(tl.int64) * cols
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in range(0, cols, BLOCK):
        z, _ = _scaled_scores(S, base, start + tl.arange(0, BLOCK), cols, scale, query, window, CAUSAL, WINDOWED)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(z - safe_max), axis=0)
        running_max = new_max
    lse = tl.where(running_sum > 0, running_max + tl.log(running_sum), float("-inf"))
    tl.store(LSE + row, lse)
    shift = tl.where(lse == float("-inf"), float("inf"), lse)  # a fully masked row: probabilities 0
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z, inside = _scaled_scores(S, base, offs, cols, scale, query, window, CAUSAL, WINDOWED)
        tl.store(P + base + offs, tl.exp(z - shift).to(P.dtype.element_ty), mask=inside)


@triton.jit
def _backward_rows_kernel(S, DP, LSE, DELTA, P, DS, cols, scale, first_query, queries, window,
                          CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    query = first_query + row % queries
    base = row.to(tl.int64) * cols
    lse = tl.load(LSE + row)
    shift = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z, inside = _scaled_scores(S, base, offs, cols, scale, query, window, CAUSAL, WINDOWED)
        p = tl.exp(z - shift)
        dp = tl.load(DP + base + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(P + base + offs, p.to(P.dtype.element_ty), mask=inside)
        tl.store(DS + base + offs, (p * (dp - delta) * scale).to(DS.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scaled_scores_reference(scores, scale, causal, first_query, queries, window=0) -> torch.Tensor:
    """scale·scores in fp32 (float64 for float64), -inf past each row's query under ``causal`` and ``window`` keys or
    more before it: the kernels' ``z``."""
    z = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32) * scale
    rows, cols = z.shape[-2:]
    query = first_query + torch.arange(rows, device=z.device) % queries
    key = torch.arange(cols, device=z.device)[None, :]
    if causal:
        z = z.masked_fill(key > query[:, None], float("-inf"))
    if window:
        z = z.masked_fill(key <= query[:, None] - window, float("-inf"))
    return z


def softmax_rows_reference(scores: torch.Tensor, scale: float, causal: bool, first_query: int, queries: int,
                           out_dtype: torch.dtype, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P in ``out_dtype``, lse fp32) of scale·scores under the causal (and window) mask, as the kernel computes them."""
    z = _scaled_scores_reference(scores, scale, causal, first_query, queries, window)
    lse = torch.logsumexp(z, dim=-1)
    probs = torch.exp(z - lse.nan_to_num(neginf=float("inf"))[..., None])
    return probs.to(out_dtype), lse


def softmax_rows(scores: torch.Tensor, scale: float, causal: bool, first_query: int, queries: int,
                 out_dtype: torch.dtype, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's row pass over a chunk's fp32 scores [..., rows, cols]: probabilities and log-sum-exp."""
    if not use_triton(scores):
        return softmax_rows_reference(scores, scale, causal, first_query, queries, out_dtype, window)
    flat = _rows(scores.contiguous())
    probs = torch.empty(flat.shape, dtype=out_dtype, device=scores.device)
    lse = torch.empty(flat.shape[0], dtype=torch.float32, device=scores.device)
    _forward_rows_kernel[(flat.shape[0],)](flat, probs, lse, flat.shape[1], float(scale), int(first_query),
                                           int(queries), int(window), CAUSAL=bool(causal), WINDOWED=bool(window),
                                           BLOCK=BLOCK_COLS, num_warps=4)
    return probs.view(scores.shape), lse.view(scores.shape[:-1])


def softmax_grad_rows_reference(scores, grad_probs, lse, delta, scale, causal, first_query, queries, out_dtype,
                                window=0):
    """(P, dS) in ``out_dtype``: the probabilities again from the saved log-sum-exp, and P ⊙ (dP − δ)·scale."""
    z = _scaled_scores_reference(scores, scale, causal, first_query, queries, window)
    wide = z.dtype
    probs = torch.exp(z - lse.to(wide).nan_to_num(neginf=float("inf"))[..., None])
    grad = probs * (grad_probs.to(wide) - delta.to(wide)[..., None]) * scale
    return probs.to(out_dtype), grad.to(out_dtype)


def softmax_grad_rows(scores, grad_probs, lse, delta, scale, causal, first_query, queries, out_dtype, window=0):
    """The backward's row pass: P and dS of a chunk in ``out_dtype`` from its fp32 scores, dP, lse and δ = rowsum(dO ⊙ O)."""
    if not use_triton(scores):
        return softmax_grad_rows_reference(scores, grad_probs, lse, delta, scale, causal, first_query, queries,
                                           out_dtype, window)
    flat, grad_flat = _rows(scores.contiguous()), _rows(grad_probs.contiguous())
    probs = torch.empty(flat.shape, dtype=out_dtype, device=scores.device)
    grad = torch.empty(flat.shape, dtype=out_dtype, device=scores.device)
    _backward_rows_kernel[(flat.shape[0],)](flat, grad_flat, lse.reshape(-1).float().contiguous(),
                                            delta.reshape(-1).float().contiguous(), probs, grad, flat.shape[1],
                                            float(scale), int(first_query), int(queries), int(window),
                                            CAUSAL=bool(causal), WINDOWED=bool(window), BLOCK=BLOCK_COLS, num_warps=4)
    return probs.view(scores.shape), grad.view(scores.shape)
