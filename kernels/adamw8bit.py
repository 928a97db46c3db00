"""8-bit blockwise AdamW in one kernel, with lr, step and clip scale read from device tensors.

Why: under CUDA graphs a small model's step is dominated by what stays eager, and bitsandbytes'
8-bit AdamW is one launch plus Python per adapter tensor (15.3 ms of a 65 ms Llama-3.2-1B step on
the H100). One launch over the flat LoRA buffer (``vramplan.train.optim.FlatLoRA``) does it all,
and because lr, the step count and the gradient-clipping scale are pointers, not Python floats,
the step needs no host sync and a captured graph replays it with whatever lr a scheduler set.

State layout, as bitsandbytes' blockwise 8-bit optimizers keep it (``functional.py``,
``optimizer_update_8bit_blockwise``): each state is one uint8 code per value plus one fp32 absmax
per block of 256 values; a value is ``code[q] · absmax``. m uses the signed dynamic map, v the
unsigned one (``create_dynamic_map``). The math per value, each operation rounded on its own
(no FMA, ``enable_fp_fusion=False``), so the kernel and :func:`adamw8bit_reference` agree bit for
bit in the states:

    g  = g · clip_scale
    m  = m · β1 + g · (1 − β1)            v = v · β2 + g² · (1 − β2)
    c1 = 1 − β1^t                         c2 = sqrt(1 − β2^t)          (β^t = exp2(t · log2 β))
    p  = p · (1 − lr · wd)                p = p − (lr / c1) · (m / (sqrt(v) / c2 + ε))

then each block's new absmax is taken and every value is stored as the nearest code (ties to the
lower code: the count of code midpoints strictly below ``value / absmax``, as ``torch.bucketize``
and bitsandbytes' own default backend choose). A NaN clip scale (a non-finite gradient norm, see
:func:`clip_scale`) makes the step write nothing, so a diverged gradient leaves the run as it was
without the host having to look first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import use_triton

BLOCKSIZE = 256  # values per absmax, as bitsandbytes
_BLOCKS_PER_PROGRAM = 4
_TINY = 1e-38  # an all-zero block's absmax is divided as this (its codes then encode 0)


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code map (``create_dynamic_map``, 7 exponent bits), sorted, fp32:
    a decimal exponent from 1e-6 to 1, and the remaining bits as an evenly spaced fraction."""
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((10 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / 2.0)).tolist()
        values += means + ([-x for x in means] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed code, its midpoints, unsigned code, its midpoints) on ``device``."""
    out = []
    for signed in (True, False):
        code = dynamic_map(signed)
        out += [code.to(device), ((code[:-1] + code[1:]) / 2).to(device)]
    return tuple(out)


@dataclass
class AdamW8bitState:
    """m and v as uint8 codes with one fp32 absmax per block (bitsandbytes' ``state1``/``absmax1``, ``state2``/``absmax2``)."""

    m: torch.Tensor
    m_absmax: torch.Tensor
    v: torch.Tensor
    v_absmax: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device) -> "AdamW8bitState":
        blocks = triton.cdiv(n, BLOCKSIZE)
        return cls(torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device),
                   torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device))

    @classmethod
    def quantized(cls, m: torch.Tensor, v: torch.Tensor) -> "AdamW8bitState":
        """The state holding flat fp32 moments ``m`` and ``v``, blocked from their first value, each
        value stored as its nearest code (as the update stores them): within one code step."""
        blocks = triton.cdiv(m.numel(), BLOCKSIZE)
        m_absmax, m_idx = _quantize(_blocked(m, blocks), signed=True)
        v_absmax, v_idx = _quantize(_blocked(v, blocks), signed=False)
        return cls(m_idx.reshape(-1)[:m.numel()], m_absmax, v_idx.reshape(-1)[:v.numel()], v_absmax)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) as flat fp32 values: each code times its block's absmax."""
        n, blocks = self.m.numel(), self.m_absmax.numel()
        m_code, _, v_code, _ = _maps(self.m.device)
        m = _blocked(m_code[self.m.long()], blocks) * self.m_absmax[:, None]
        v = _blocked(v_code[self.v.long()], blocks) * self.v_absmax[:, None]
        return m.reshape(-1)[:n], v.reshape(-1)[:n]


def _blocked(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Flat ``x`` zero-padded to ``blocks`` rows of BLOCKSIZE values."""
    return torch.nn.functional.pad(x.reshape(-1), (0, blocks * BLOCKSIZE - x.numel())).view(blocks, BLOCKSIZE)


def _quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per row, uint8 index of each value's nearest code) of blocked ``x``: the rounding rule
    of the module docstring (ties to the lower code), m's signed map or v's unsigned one."""
    _, m_mid, _, v_mid = _maps(x.device)
    absmax = x.abs().amax(dim=1) if signed else x.amax(dim=1)
    idx = torch.bucketize(x / absmax.clamp(min=_TINY)[:, None], m_mid if signed else v_mid).to(torch.uint8)
    return absmax, idx


@triton.jit
def _nearest_code(x, MID):
    """Index of the nearest code: the number of midpoints below ``x`` (8 halvings of the 255)."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        mid = tl.load(MID + idx + ((128 >> s) - 1))
        idx = tl.where(mid < x, idx + (128 >> s), idx)
    return idx


@triton.jit
def _adamw8bit_kernel(
    P, G, MQ, M_ABSMAX, VQ, V_ABSMAX, M_CODE, M_MID, V_CODE, V_MID, LR, STEP, SCALE, n,
    beta1, one_minus_beta1, log2_beta1, beta2, one_minus_beta2, log2_beta2, eps, weight_decay,
    BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = offs < n
    block_mask = blocks * BLOCKSIZE < n
    lr = tl.load(LR)
    t = tl.load(STEP)
    scale = tl.load(SCALE)
    finite = scale == scale  # NaN scale: a non-finite gradient norm, nothing changes
    write = tl.where(finite, mask, False)

    g = tl.load(G + offs, mask=mask, other=0.0) * scale
    mq = tl.load(MQ + offs, mask=mask, other=0).to(tl.int32)
    vq = tl.load(VQ + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(M_CODE + mq, mask=mask, other=0.0) * tl.load(M_ABSMAX + blocks, mask=block_mask, other=0.0)[:, None]
    v = tl.load(V_CODE + vq, mask=mask, other=0.0) * tl.load(V_ABSMAX + blocks, mask=block_mask, other=0.0)[:, None]
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2

    c1 = 1.0 - tl.exp2(t * log2_beta1)
    c2 = tl.sqrt_rn(1.0 - tl.exp2(t * log2_beta2))
    denom = tl.div_rn(tl.sqrt_rn(v), c2) + eps
    p = tl.load(P + offs, mask=mask, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    p = p - tl.div_rn(lr, c1) * tl.div_rn(m, denom)
    tl.store(P + offs, p, mask=write)

    m_absmax = tl.max(tl.abs(m), axis=1)
    v_absmax = tl.max(v, axis=1)
    # typed: Triton 3.6 reads a bare 1e-38 (below fp32's normal range) as fp64 and refuses the mix
    tiny = tl.full(m_absmax.shape, 1e-38, tl.float32)
    m_idx = _nearest_code(tl.div_rn(m, tl.maximum(m_absmax, tiny)[:, None]), M_MID)
    v_idx = _nearest_code(tl.div_rn(v, tl.maximum(v_absmax, tiny)[:, None]), V_MID)
    tl.store(MQ + offs, m_idx.to(tl.uint8), mask=write)
    tl.store(VQ + offs, v_idx.to(tl.uint8), mask=write)
    block_write = tl.where(finite, block_mask, False)
    tl.store(M_ABSMAX + blocks, m_absmax, mask=block_write)
    tl.store(V_ABSMAX + blocks, v_absmax, mask=block_write)


def _constants(betas: tuple[float, float]) -> tuple[float, ...]:
    b1, b2 = betas
    return b1, 1.0 - b1, math.log2(b1), b2, 1.0 - b2, math.log2(b2)


def _check(p: torch.Tensor, g: torch.Tensor, state: AdamW8bitState, *scalars: torch.Tensor) -> None:
    if p.dtype != torch.float32 or g.dtype != torch.float32 or p.dim() != 1 or g.shape != p.shape:
        raise ValueError("adamw8bit: p and g must be flat fp32 tensors of one size")
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError("adamw8bit: p and g must be contiguous")
    if state.m.numel() != p.numel() or state.m_absmax.numel() != triton.cdiv(p.numel(), BLOCKSIZE):
        raise ValueError(f"adamw8bit: a state of {state.m.numel()} values for {p.numel()} parameters")
    for s in scalars:
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError("adamw8bit: lr, step and scale must be one-value fp32 tensors on the parameters' device")


def adamw8bit_reference(p, g, state: AdamW8bitState, lr, step, scale, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0.0) -> None:
    """The kernel's function in plain PyTorch, in place: same code maps, same rounding rule, the
    same operations in the same order, each its own tensor op (so nothing is fused into an FMA)."""
    b1, one_b1, log2_b1, b2, one_b2, log2_b2 = _constants(betas)
    n = p.numel()
    blocks = state.m_absmax.numel()
    blocked = functools.partial(_blocked, blocks=blocks)

    g = blocked(g * scale)
    m, v = (blocked(x) for x in state.moments())
    m = m * b1 + g * one_b1
    v = v * b2 + (g * g) * one_b2
    t = step.reshape(())
    c1 = 1.0 - torch.exp2(t * log2_b1)
    c2 = torch.sqrt(1.0 - torch.exp2(t * log2_b2))
    denom = torch.sqrt(v) / c2 + eps
    lr = lr.reshape(())
    new_p = blocked(p) * (1.0 - lr * weight_decay)
    new_p = new_p - (lr / c1) * (m / denom)

    m_absmax, m_idx = _quantize(m, signed=True)
    v_absmax, v_idx = _quantize(v, signed=False)
    ok = torch.isfinite(scale.reshape(()))  # a NaN scale: nothing changes (kept on the device: no sync)
    for dst, src in ((p, new_p.reshape(-1)[:n]), (state.m, m_idx.reshape(-1)[:n]), (state.v, v_idx.reshape(-1)[:n]),
                     (state.m_absmax, m_absmax), (state.v_absmax, v_absmax)):
        dst.copy_(torch.where(ok, src, dst))


def adamw8bit_step(p: torch.Tensor, g: torch.Tensor, state: AdamW8bitState, lr: torch.Tensor, step: torch.Tensor,
                   scale: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> None:
    """One AdamW update of flat ``p`` in place. ``lr``, ``step`` (1 on the first update) and
    ``scale`` (gradient clipping; 1: none) are one-value fp32 tensors on ``p``'s device. Triton on
    CUDA tensors, the reference elsewhere."""
    _check(p, g, state, lr, step, scale)
    if not use_triton(p):
        adamw8bit_reference(p, g, state, lr, step, scale, betas, eps, weight_decay)
        return
    if p.numel() == 0:
        return
    m_code, m_mid, v_code, v_mid = _maps(p.device)
    grid = (triton.cdiv(state.m_absmax.numel(), _BLOCKS_PER_PROGRAM),)
    _adamw8bit_kernel[grid](
        p, g, state.m, state.m_absmax, state.v, state.v_absmax, m_code, m_mid, v_code, v_mid, lr, step, scale,
        p.numel(), *_constants(betas), eps, weight_decay,
        BLOCKS=_BLOCKS_PER_PROGRAM, BLOCKSIZE=BLOCKSIZE, num_warps=4, enable_fp_fusion=False,
    )


def clip_scale(grad: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(global L2 norm, min(1, max_norm / (norm + 1e-6))) of a flat gradient as 0-d device tensors,
    with no ``.item()``: the scale goes to the update, the norm to the log after the step. The
    scale is NaN when the norm is not finite, which makes :func:`adamw8bit_step` change nothing."""
    norm = torch.linalg.vector_norm(grad, 2.0, dtype=torch.float32)
    return norm, clip_scale_of(norm, max_norm)


def clip_scale_of(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) of a 0-d norm on its device, NaN when the norm is not finite
    (the norm may be a sum over ranks: FSDP2's sharded gradients)."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return torch.where(torch.isfinite(norm), scale, torch.full_like(scale, math.nan))
