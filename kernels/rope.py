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
``[batch, seq, heads, head_dim]`` (``unsqueeze_dim=2``, Gemma 4), in any strides — no copy is
made. One program handles one token of q (or k): all its heads, loading cos/sin once.
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
def _rope_kernel(
    X, x_sb, x_ss, x_sh, x_sd, Y, y_sb, y_ss, y_sh, y_sd, n_heads,
    COS, SIN, c_sb, c_ss, c_sd, seq_len, half, n_pairs,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    cols = tl.arange(0, BLOCK_P)
    pmask = cols < n_pairs
    trig = b * c_sb + s * c_ss
    c1 = tl.load(COS + trig + cols * c_sd, mask=pmask, other=1.0).to(ACC)
    c2 = tl.load(COS + trig + (cols + half) * c_sd, mask=pmask, other=1.0).to(ACC)
    s1 = tl.load(SIN + trig + cols * c_sd, mask=pmask, other=0.0).to(ACC)
    s2 = tl.load(SIN + trig + (cols + half) * c_sd, mask=pmask, other=0.0).to(ACC)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: the forward with
        # (s1, s2) replaced by (-s2, -s1).
        s_first = -s2
        s2 = -s1
        s1 = s_first
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < n_heads) & pmask[None, :]
    x_first = X + b * x_sb + s * x_ss + heads[:, None] * x_sh + cols[None, :] * x_sd
    y_first = Y + b * y_sb + s * y_ss + heads[:, None] * y_sh + cols[None, :] * y_sd
    x1_in = tl.load(x_first, mask=mask, other=0.0)
    x1 = x1_in.to(ACC)
    x2 = tl.load(x_first + half * x_sd, mask=mask, other=0.0).to(ACC)
    tl.store(y_first, (x1 * c1 - x2 * s1).to(x1_in.dtype), mask=mask)
    tl.store(y_first + half * y_sd, (x2 * c2 + x1 * s2).to(x1_in.dtype), mask=mask)


def _token_major(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """The [batch, seq, heads, head_dim] view of q or k (no copy)."""
    return x.transpose(1, 2) if unsqueeze_dim == 1 else x


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


def _launch(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int, pairs: int,
            backward: bool) -> None:
    """Write ``x`` rotated into ``y`` (both [batch, seq, heads, head_dim], any strides; ``y`` may be ``x``).
    Only the rotated dims are written: an out-of-place ``y`` must already hold the others."""
    b, s, heads, _ = x.shape
    if cos.shape != sin.shape or cos.shape[-2] != s or cos.shape[0] not in (1, b):
        raise ValueError(f"rope: cos/sin of shape {tuple(cos.shape)} do not match {tuple(x.shape)}")
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h, block_p = triton.next_power_of_2(heads), triton.next_power_of_2(max(pairs, 1))
    _rope_kernel[(b * s,)](
        x, *x.stride(), y, *y.stride(), heads,
        cos, sin, 0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2), s, half, pairs,
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_P=block_p,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        num_warps=8 if block_h * block_p >= 4096 else 4,
    )


def _writable(grad: torch.Tensor) -> torch.Tensor:
    """Gradients can arrive expanded (stride 0, e.g. from ``.sum()``); rotating those in place would
    write one element many times, so they are copied first."""
    if 0 in grad.stride():
        return grad.contiguous()
    return grad


class RopeFunction(torch.autograd.Function):
    """Rotates one tensor. q and k go through separately: autograd lets a Function modify a view
    input in place only when it has a single output.

    In place unless ``x`` needs a gradient and is a leaf (autograd forbids that) or a view (Llama's
    q and k are transposed views of the projections): for a view autograd would answer
    ``mark_dirty`` with an as_strided backward and a clone of the whole gradient (CopySlices),
    three extra passes over dq, while writing a new tensor costs the same traffic as writing in
    place, and the view's memory is freed when the caller drops it. Backward always rotates the
    incoming gradient in place.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim, half, pairs, inplace):
        cos, sin = _batched(cos), _batched(sin)
        if inplace:
            y = x
            ctx.mark_dirty(x)
        elif pairs < x.shape[-1] // 2:
            y = x.clone()  # the kernel writes only the rotated dims
        else:
            y = torch.empty_like(x)
        if pairs:
            _launch(_token_major(x, unsqueeze_dim), _token_major(y, unsqueeze_dim), cos, sin, half, pairs, False)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.half, ctx.pairs = unsqueeze_dim, half, pairs
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = _writable(dy)
        if ctx.pairs:
            dy_ = _token_major(dy, ctx.unsqueeze_dim)
            _launch(dy_, dy_, cos, sin, ctx.half, ctx.pairs, True)
        return dy, None, None, None, None, None, None


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


def apply_rope_one(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1, rotated_pairs: int | None = None,
) -> torch.Tensor:
    """Rotate one tensor: the signature of Gemma 4's ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)``,
    which rotates q and k in separate calls (its shared-KV layers rotate only q). Use the returned
    tensor: the Triton path rotates in place where that is free (see RopeFunction).

    ``unsqueeze_dim`` means what it means in transformers: 1 for [batch, heads, seq, head_dim],
    2 for [batch, seq, heads, head_dim].
    """
    if unsqueeze_dim not in (1, 2) or x.dim() != 4:
        raise ValueError("rope: q and k must be 4-D and unsqueeze_dim 1 (b,h,s,d) or 2 (b,s,h,d)")
    half, pairs = _layout(x, cos, rotated_pairs)
    if use_triton(x):
        return RopeFunction.apply(x, cos, sin, unsqueeze_dim, half, pairs, _in_place(x))
    return rope_reference_one(x, cos, sin, unsqueeze_dim)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    unsqueeze_dim: int = 1, rotated_pairs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k: the arguments of Llama's ``apply_rotary_pos_emb`` (see ``apply_rope_one``)."""
    return (apply_rope_one(q, cos, sin, unsqueeze_dim, rotated_pairs),
            apply_rope_one(k, cos, sin, unsqueeze_dim, rotated_pairs))
