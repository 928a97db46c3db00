"""Rotary position embedding on q and k, in place where that is free, forward and backward.

The rotate-half convention of transformers: ``y = x·cos + rotate_half(x)·sin`` with
``rotate_half(x) = cat(-x[half:], x[:half])``, i.e. dim ``i`` pairs with dim ``i + half``.
cos/sin come from the model's rotary embedding ([batch, seq, rotary_dim] or [seq, rotary_dim]),
already gathered at ``position_ids``, so packed sequences whose positions restart mid-row need
nothing special here. Per-layer-type theta (Gemma 3/4 sliding vs full layers) is just a
different cos/sin per layer type.

Two partial-rotary layouts exist, and both are supported:

* **cos/sin narrower than head_dim** (Phi-3, GLM, NeoX-style ``partial_rotary_factor``):
  the first ``rotary_dim`` dims are rotated with ``half = rotary_dim / 2``, the rest pass through.
* **cos/sin as wide as head_dim, but only some pairs turn** — Gemma 4's "proportional" RoPE
  (transformers ``_compute_proportional_rope_parameters``): its full-attention layers have
  ``partial_rotary_factor 0.25``, and the rotary embedding pads ``inv_freq`` with zeros up to
  ``head_dim / 2``, so cos = 1 and sin = 0 on the pairs ``i >= rotated_pairs`` of each half
  (``rotated_pairs = int(0.25 · head_dim // 2)``, 64 of 256 for head_dim 512). Pass
  ``rotated_pairs`` and the kernel leaves the other dims untouched instead of multiplying them by 1.

q and k may be ``[batch, heads, seq, head_dim]`` (``unsqueeze_dim=1``, Llama) or
``[batch, seq, heads, head_dim]`` (``unsqueeze_dim=2``, Gemma 4), in any strides with head_dim
contiguous (others take the reference path) — no copy is made. One launch rotates q and k: one
program per token (per 4 tokens where a token has few heads), all heads of both, cos/sin loaded once
(Liger's layout of the work): on an H100 that took 0.4-0.8x the time of one launch per tensor
(benchmarks/results/kernels-tuned.md), the step being mostly launch and Python overhead at these sizes.
Where cos/sin are ``cat(f, f)``, as every transformers rotary embedding builds them, ``same_halves``
reads one half of them (the trainer's patch checks the modeling source for it).
Backward is the transpose of the rotation (by −θ), written in place into the incoming gradient
(as Liger does): in training that is attention's fresh dq/dk; a caller passing its own
``grad_outputs`` gets them back rotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import use_triton


@triton.jit
def _rotate_heads(X, Y, tok_offsets, x_sh, cols, pmask, c1, c2, s1, s2,
                  N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate every head of the program's tokens: [tokens, heads, pairs] tiles of both halves at once.
    ``Y`` has ``X``'s strides (it may be ``X``). The tokens' int64 offsets move the base pointers
    once; the offsets within a token stay 32-bit."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[None, :, None] < N_HEADS) & pmask[:, None, :]
    inner = heads[None, :, None] * x_sh + cols[None, None, :]
    x_first = (X + tok_offsets)[:, None, None] + inner
    y_first = (Y + tok_offsets)[:, None, None] + inner
    x1_in = tl.load(x_first, mask=mask, other=0.0)
    x2_in = tl.load(x_first + HALF, mask=mask, other=0.0)
    x1, x2 = x1_in.to(c1.dtype), x2_in.to(c1.dtype)
    tl.store(y_first, (x1 * c1[:, None, :] - x2 * s1[:, None, :]).to(x1_in.dtype), mask=mask)
    tl.store(y_first + HALF, (x2 * c2[:, None, :] + x1 * s2[:, None, :]).to(x1_in.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    Q, QY, q_sb, q_ss, q_sh, K, KY, k_sb, k_ss, k_sh, COS, SIN, c_sb, c_ss, seq_len, n_tokens,
    N_Q_HEADS: tl.constexpr, N_K_HEADS: tl.constexpr, HALF: tl.constexpr, N_PAIRS: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr, SAME_HALVES: tl.constexpr, ACC: tl.constexpr, REVERSE: tl.constexpr,
):
    block = tl.program_id(0)
    if REVERSE:  # the last tokens first: what the op before wrote last is likeliest still in the L2
        block = tl.num_programs(0) - 1 - block
    token = block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = token // seq_len
    s = token - b * seq_len
    cols = tl.arange(0, BLOCK_P)
    pmask = (token < n_tokens)[:, None] & (cols < N_PAIRS)[None, :]
    trig = b * c_sb + s * c_ss
    cos_first = (COS + trig)[:, None] + cols[None, :]
    sin_first = (SIN + trig)[:, None] + cols[None, :]
    c1 = tl.load(cos_first, mask=pmask, other=1.0).to(ACC)
    s1 = tl.load(sin_first, mask=pmask, other=0.0).to(ACC)
    if SAME_HALVES:  # cos/sin = cat(f, f): the second half is the first, not read again
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_first + HALF, mask=pmask, other=1.0).to(ACC)
        s2 = tl.load(sin_first + HALF, mask=pmask, other=0.0).to(ACC)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: the forward with
        # (s1, s2) replaced by (-s2, -s1).
        s_first = -s2
        s2 = -s1
        s1 = s_first
    _rotate_heads(Q, QY, b * q_sb + s * q_ss, q_sh, cols, pmask, c1, c2, s1, s2,
                  N_HEADS=N_Q_HEADS, HALF=HALF, BLOCK_H=BLOCK_QH)
    if N_K_HEADS > 0:
        _rotate_heads(K, KY, b * k_sb + s * k_ss, k_sh, cols, pmask, c1, c2, s1, s2,
                      N_HEADS=N_K_HEADS, HALF=HALF, BLOCK_H=BLOCK_KH)


#: Launch settings, overridable for benchmarks/kernel_sweep.py (``None``: :func:`_launch_settings`).
TOKENS_PER_PROGRAM = None
NUM_WARPS = None
#: Programs walk the tokens last to first. q and k (and in backward dq and dk) were written by the op just
#: before (the projection or q/k-norm; attention's backward), last tokens last, so those are the ones
#: still in the L2. In CUDA graphs on the H100 (benchmarks/results/session9/sweep-rope-order.jsonl) this
#: took 2-4% off every shape, and Gemma 4's sliding layers from 0.97-0.99x Liger to 1.02-1.03x.
#: Evict-first hints on the loads, timed beside it, changed nothing.
REVERSE_ORDER = True


def _launch_settings(token_elements: int) -> tuple[int, int]:
    """(tokens per program, warps) for a token whose heads' rotated halves hold ``token_elements``.

    Swept in CUDA graphs (benchmarks/results/session8/sweep.jsonl, H200): Gemma 4's sliding layers
    (8 q heads and 1-2 KV heads, 1,152-1,280 elements a token) ran 21-25% faster as 4 tokens on 2 warps
    than 1 token on 4, its full layers alike; Llama-3.1-8B's 40 heads (2,560) ran best one token a program.
    On the H100 (sweep-rope.jsonl) 8 and 16 tokens, 1-4 warps, did no better than 4 on 2."""
    if token_elements <= 2048:
        return 4, 2
    return 1, 8 if token_elements >= 4096 else 4


def _batched(trig: torch.Tensor) -> torch.Tensor:
    return trig.unsqueeze(0) if trig.dim() == 2 else trig


def _layout(q: torch.Tensor, cos: torch.Tensor, rotated_pairs: int | None) -> tuple[int, int]:
    """(half, rotated pairs) for q's head_dim and cos's width; see the module docstring."""
    head_dim, rotary_dim = q.shape[-1], cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rope: cos/sin width {rotary_dim} must be even and at most head_dim {head_dim}")
    half = rotary_dim // 2
    pairs = half if rotated_pairs is None else int(rotated_pairs)
    if not 0 <= pairs <= half:
        raise ValueError(f"rope: rotated_pairs {pairs} outside 0..{half}")
    return half, pairs


def _token_major(x: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int, int]:
    """(batch, seq, heads) sizes and (batch, seq, head) strides of q or k read as [batch, seq, heads,
    head_dim], without making that view."""
    st = x.stride()
    if unsqueeze_dim == 1:
        return x.shape[0], x.shape[2], x.shape[1], (st[0], st[2], st[1])
    return x.shape[0], x.shape[1], x.shape[2], (st[0], st[1], st[2])


def _launch(q: torch.Tensor, q_out: torch.Tensor, k: torch.Tensor | None, k_out: torch.Tensor | None,
            cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, half: int, pairs: int, backward: bool,
            same_halves: bool = False) -> None:
    """Write ``q`` (and ``k``) rotated into ``q_out`` (``k_out``) in one launch: one program per few tokens
    (:func:`_launch_settings`) rotates all their heads of q and of k with cos/sin loaded once. An output has
    its input's strides (it may be the input) and a unit stride over head_dim. Only the rotated dims are written."""
    b, s, q_heads, q_strides = _token_major(q, unsqueeze_dim)
    if cos.shape != sin.shape or cos.shape[-2] != s or cos.shape[0] not in (1, b):
        raise ValueError(f"rope: cos/sin of shape {tuple(cos.shape)} do not match {tuple(q.shape)}")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if k is not None:
        k_b, k_s, k_heads, k_strides = _token_major(k, unsqueeze_dim)
        if (k_b, k_s) != (b, s):
            raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or sequence")
    else:
        k, k_out, k_heads, k_strides = q, q_out, 0, (0, 0, 0)
    block_p = triton.next_power_of_2(max(pairs, 1))
    block_qh, block_kh = triton.next_power_of_2(q_heads), triton.next_power_of_2(max(k_heads, 1))
    block_t, num_warps = _launch_settings((block_qh + (block_kh if k_heads else 0)) * block_p)
    block_t, num_warps = TOKENS_PER_PROGRAM or block_t, NUM_WARPS or num_warps
    _rope_kernel[(triton.cdiv(b * s, block_t),)](
        q, q_out, *q_strides, k, k_out, *k_strides,
        cos, sin, 0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), s, b * s,
        N_Q_HEADS=q_heads, N_K_HEADS=k_heads, HALF=half, N_PAIRS=pairs, BACKWARD=backward,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_P=block_p, BLOCK_T=block_t, SAME_HALVES=same_halves,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, REVERSE=REVERSE_ORDER,
        num_warps=num_warps,
    )


def _writable(grad: torch.Tensor | None) -> torch.Tensor | None:
    """Gradients can arrive expanded (stride 0, e.g. from ``.sum()``), and rotating those in place
    would write one element many times; or with a non-unit stride over head_dim, which the kernel
    does not take. Those are copied first."""
    if grad is not None and (grad.stride(-1) != 1 or 0 in grad.stride()):
        return grad.contiguous()
    return grad


def _source_and_output(x: torch.Tensor, inplace: bool, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel reads and where it writes (at the same strides)."""
    if inplace:
        return x, x
    if pairs == x.shape[-1] // 2:
        y = torch.empty_like(x)  # a dense x's strides, kept
        if y.stride() == x.stride():
            return x, y
    # Partial rotary: the untouched dims are copied; a non-dense view (a slice of a fused qkv
    # projection) becomes a dense copy. Either is then rotated in place.
    y = x.clone()
    return y, y


class RopeFunction(torch.autograd.Function):
    """Rotates q, or q and k together (``k`` None for one tensor), in one launch each way.

    In place unless a tensor needs a gradient and is a leaf (autograd forbids that) or a view
    (Llama's q and k are transposed views of the projections): for a view autograd would answer
    ``mark_dirty`` with an as_strided backward and a clone of the whole gradient (CopySlices),
    three extra passes over dq, while writing a new tensor costs the same traffic as writing in
    place, and the view's memory is freed when the caller drops it. (Autograd also refuses a
    view modified in place by a Function with two outputs.) Backward always rotates the
    incoming gradients in place.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim, half, pairs, q_inplace, k_inplace, same_halves=False):
        cos, sin = _batched(cos), _batched(sin)
        q_src, q_out = _source_and_output(q, q_inplace, pairs)
        k_src, k_out = _source_and_output(k, k_inplace, pairs) if k is not None else (None, None)
        if q_inplace and k_inplace and k is not None:
            ctx.mark_dirty(q, k)
        elif q_inplace or k_inplace:
            ctx.mark_dirty(q if q_inplace else k)
        if pairs:
            _launch(q_src, q_out, k_src, k_out, cos, sin, unsqueeze_dim, half, pairs, False, same_halves)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.half, ctx.pairs, ctx.same_halves = unsqueeze_dim, half, pairs, same_halves
        return (q_out, k_out) if k is not None else q_out

    @staticmethod
    def backward(ctx, dq, dk=None):
        cos, sin = ctx.saved_tensors
        dq, dk = _writable(dq), _writable(dk)
        if ctx.pairs and (dq is not None or dk is not None):
            first, second = (dq, dk) if dq is not None else (dk, None)
            _launch(first, first, second, second, cos, sin, ctx.unsqueeze_dim, ctx.half, ctx.pairs, True, ctx.same_halves)
        return dq, dk, None, None, None, None, None, None, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """One tensor rotated as transformers does it (and its partial-rotary split), out of place."""
    cos, sin = _batched(cos).unsqueeze(unsqueeze_dim), _batched(sin).unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1, rotated_pairs: int | None = None):
    """transformers' apply_rotary_pos_emb in plain PyTorch, out of place.

    ``rotated_pairs`` is accepted for symmetry and ignored: it only promises cos = 1, sin = 0
    beyond it, which this computes anyway.
    """
    return rope_reference_one(q, cos, sin, unsqueeze_dim), rope_reference_one(k, cos, sin, unsqueeze_dim)


def proportional_rotated_pairs(head_dim: int, partial_rotary_factor: float) -> int:
    """How many pairs of each half Gemma 4's proportional RoPE turns (the rest have cos 1, sin 0)."""
    return int(partial_rotary_factor * head_dim // 2)


def _in_place(x: torch.Tensor) -> bool:
    """Rotate in place unless autograd would copy for it (a view) or forbid it (a leaf)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return True
    return x._base is None and x.grad_fn is not None


def rope_applies(x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the Triton kernel takes this call of transformers' ``apply_rotary_pos_emb`` (a model patch
    runs the original otherwise): the kernel's mode for x, a 4-D x with head_dim contiguous, and cos
    of [seq, width] or [batch, seq, width] with an even width up to head_dim."""
    return (use_triton(x) and x.dim() == 4 and x.stride(-1) == 1 and unsqueeze_dim in (1, 2)
            and cos.dim() in (2, 3) and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= x.shape[-1])


def apply_rope_one(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1, rotated_pairs: int | None = None,
    same_halves: bool = False,
) -> torch.Tensor:
    """Rotate one tensor: the signature of Gemma 4's ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)``,
    which rotates q and k in separate calls (its shared-KV layers rotate only q). Use the returned
    tensor: the Triton path rotates in place where that is free (see RopeFunction).

    ``unsqueeze_dim`` means what it means in transformers: 1 for [batch, heads, seq, head_dim],
    2 for [batch, seq, heads, head_dim]. ``same_halves`` promises cos/sin = ``cat(f, f)`` over their
    last dimension, as every transformers rotary embedding builds them (``torch.cat((freqs, freqs))``):
    the kernel then reads half of them, 5% of the traffic on Gemma 4's sliding layers.
    """
    if unsqueeze_dim not in (1, 2) or x.dim() != 4:
        raise ValueError("rope: q and k must be 4-D and unsqueeze_dim 1 (b,h,s,d) or 2 (b,s,h,d)")
    half, pairs = _layout(x, cos, rotated_pairs)
    if use_triton(x) and x.stride(-1) == 1:
        return RopeFunction.apply(x, None, cos, sin, unsqueeze_dim, half, pairs, _in_place(x), False, same_halves)
    return rope_reference_one(x, cos, sin, unsqueeze_dim)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    unsqueeze_dim: int = 1, rotated_pairs: int | None = None, same_halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in one launch: the arguments of Llama's ``apply_rotary_pos_emb`` (see ``apply_rope_one``)."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("rope: q and k must be 4-D and unsqueeze_dim 1 (b,h,s,d) or 2 (b,s,h,d)")
    half, pairs = _layout(q, cos, rotated_pairs)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"rope: q head_dim {q.shape[-1]} and k head_dim {k.shape[-1]} differ")
    if use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        return RopeFunction.apply(q, k, cos, sin, unsqueeze_dim, half, pairs, _in_place(q), _in_place(k), same_halves)
    return rope_reference_one(q, cos, sin, unsqueeze_dim), rope_reference_one(k, cos, sin, unsqueeze_dim)
