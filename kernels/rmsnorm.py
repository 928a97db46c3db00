"""RMSNorm, forward and backward, in the two conventions transformers' models use.

``y = x̂ · (offset + w)`` with ``x̂ = x · rstd`` and ``rstd = 1/sqrt(mean(x²) + eps)``, summed in fp32.
The model families differ in two places, read from transformers 5.x:

* **offset** — ``LlamaRMSNorm`` (and Mistral, Qwen2/3, Phi3 …) scale by ``w`` (initialised to ones);
  ``GemmaRMSNorm``/``Gemma2RMSNorm``/``Gemma3RMSNorm`` scale by ``1 + w`` (initialised to zeros),
  so ``offset=1.0``; ``Gemma3nRMSNorm``/``Gemma4RMSNorm`` went back to ``w`` (ones), ``offset=0.0``.
* **cast order** — Llama rounds ``x̂`` to the input dtype *before* multiplying by ``w``
  (``weight * x̂.to(input_dtype)``, output dtype = promote(x, w)); every Gemma multiplies in fp32 and
  rounds once at the end (``(x̂ · w.float()).type_as(x)``), see transformers PR #29402. ``cast_mode``
  picks one: ``"llama"`` or ``"gemma"``.
* Gemma 4 also has norms **without a weight** (``with_scale=False``: ``v_norm``, the per-layer input
  norms): pass ``weight=None``; the result is ``x̂`` rounded to the input dtype.

Backward recomputes ``x̂`` from ``x`` and the saved ``rstd`` (one fp32 per row), so the norm keeps
no activation of its own beyond its input. ``dw`` is reduced across rows in fp32: each program
sums the rows it owns into one partial row, and the partials are summed at the end; it is skipped
entirely when the weight is frozen (LoRA), which is the common case here.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import sm_count, use_triton

CAST_MODES = ("llama", "gemma")
_MAX_FUSED_BYTES = 65536
# With dW: programs per SM, and the elements of the tile each program's loop takes per step.
# Chosen on an H100 among 4-16 programs per SM, tiles of 2048-8192 elements and a loop that
# prefetches the next tile (benchmarks/results/kernels-tuned.md, one run, noisy at these sub-ms
# sizes): Gemma's q_norm (65536 rows of 256) went from 0.60 to 0.34 ms forward+backward with
# 16-row tiles whose dW is summed over rows once, after the loop. Swept again in CUDA graphs on an
# H200 (benchmarks/results/session8/sweep.jsonl: 2-16 programs per SM × 2,048-8,192-element tiles):
# 4 × 2,048 was fastest on all four shapes, Gemma-4-E2B's 1,536-wide rows 0.061 -> 0.052 ms. Session 21 (H100, with the
# partials summed in one launch, benchmarks/results/session21/call1/rmsnorm-sweep.jsonl): 4 × 2,048 still fastest for
# E2B (0.057 ms, torch.compile 0.063); 2 per SM was 3-9% faster on the wider rows, kept at 4 for one setting everywhere.
_DW_PROGRAMS_PER_SM = 4
_DW_TILE_ELEMENTS = 2048
# dW's partials summed and cast in one Triton launch (_dw_sum_kernel) rather than torch's sum and cast:
# a switch so benchmarks.kernel_sweep times both in one process.
_FUSED_DW_SUM = True


@triton.jit
def _rms_norm_forward_kernel(
    Y, y_row_stride, X, x_row_stride, W, RSTD, n_rows, n_cols, eps, offset,
    HAS_WEIGHT: tl.constexpr, LLAMA_CAST: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x_in = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    x = x_in.to(ACC)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd.to(RSTD.dtype.element_ty), mask=row_mask)
    x_hat = x * rstd[:, None]
    if LLAMA_CAST:
        x_hat = x_hat.to(x_in.dtype).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC) + offset
        x_hat = x_hat * w[None, :]
    tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], x_hat.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DX, dx_row_stride, DY, dy_row_stride, X, x_row_stride, W, RSTD, DW_PARTIAL,
    n_rows, n_cols, offset, rows_per_program,
    HAS_WEIGHT: tl.constexpr, LLAMA_CAST: tl.constexpr, COMPUTE_DW: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = min(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC) + offset
    dw = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x_in = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0).to(ACC)
        x_hat = x_in.to(ACC) * rstd[:, None]
        if HAS_WEIGHT:
            if COMPUTE_DW:
                # Summed over rows once, after the loop: no cross-warp reduction per tile.
                if LLAMA_CAST:
                    dw += dy * x_hat.to(x_in.dtype).to(ACC)
                else:
                    dw += dy * x_hat
            dx_hat = dy * w[None, :]
        else:
            dx_hat = dy
        # d/dx of x·rstd is rstd · (g − x̂ · mean(g · x̂)); the llama path's rounding of x̂ passes
        # gradients through unchanged.
        dot = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (dx_hat - x_hat * dot[:, None])
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@triton.jit
def _dw_sum_kernel(DW, DW_PARTIAL, n_partials, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """dW = the partials summed over programs, stored in the weight's dtype: one launch where
    ``partial.sum(0).to(dtype)`` takes two (about 2 µs of a 60 µs step at Gemma-4-E2B's width)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    acc = tl.zeros([ROWS, BLOCK], dtype=DW_PARTIAL.dtype.element_ty)
    for first in range(0, n_partials, ROWS):
        rows = first + tl.arange(0, ROWS)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(DW_PARTIAL + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)


def _summed_dw(dw_partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_partials, n_cols = dw_partial.shape
    dw = torch.empty(n_cols, dtype=dtype, device=dw_partial.device)
    block = 64
    _dw_sum_kernel[(triton.cdiv(n_cols, block),)](dw, dw_partial, n_partials, n_cols, ROWS=64, BLOCK=block, num_warps=4)
    return dw


def _launch_shape(n_cols: int, element_size: int, tile_elements: int = 2048) -> tuple[int, int, int]:
    """(rows per tile, columns per tile, warps). Narrow rows (Gemma's q_norm/k_norm over a
    256-wide head, 8 heads per token) are stacked into tiles of about ``tile_elements``, so a
    program does as much work as one over a row that wide."""
    block = triton.next_power_of_2(n_cols)
    if block * element_size > _MAX_FUSED_BYTES:
        raise ValueError(f"rms_norm: hidden size {n_cols} is over the fused row limit; use the reference")
    rows = max(1, min(16, tile_elements // block))
    tile = rows * block
    num_warps = 32 if tile >= 32768 else 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return rows, block, num_warps


def _backward_programs(n_rows: int, tile_rows: int, device: torch.device, compute_dw: bool) -> int:
    """One tile per program without dW (most parallelism); with dW, a few programs per SM, each
    summing its rows' dW in registers, so the partials to add up stay small."""
    tiles = triton.cdiv(n_rows, tile_rows)
    if not compute_dw:
        return tiles
    if device.type == "cuda":
        return min(tiles, _DW_PROGRAMS_PER_SM * sm_count(device))
    return min(tiles, 4)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs; fp64 inputs stay fp64 (tests check the formulas there)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t.view(-1, t.shape[-1])  # one host op where reshape costs two
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_mode):
        llama_cast = cast_mode == "llama"
        x_rows = _as_rows(x)
        n_rows, n_cols = x_rows.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if (llama_cast and weight is not None) else x.dtype
        # Allocated in x's shape, not viewed into it: a view would make RoPE's in-place write on
        # Gemma's q_norm/k_norm output go through autograd's CopySlices.
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=_accumulator(x.dtype), device=x.device)
        tile_rows, block, num_warps = _launch_shape(n_cols, x.element_size())
        _rms_norm_forward_kernel[(triton.cdiv(n_rows, tile_rows),)](
            y, n_cols, x_rows, x_rows.stride(0), weight if weight is not None else x_rows, rstd,
            n_rows, n_cols, eps, offset,
            HAS_WEIGHT=weight is not None, LLAMA_CAST=llama_cast, ACC=_tl_accumulator(x.dtype),
            ROWS=tile_rows, BLOCK=block, num_warps=num_warps,
        )
        # the weight is a parameter: kept on ctx, not through checkpointing's saved-tensor hooks
        ctx.save_for_backward(x_rows, rstd)
        ctx.weight, ctx.offset, ctx.llama_cast, ctx.x_shape = weight, offset, llama_cast, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x_rows, rstd = ctx.saved_tensors
        weight = ctx.weight
        n_rows, n_cols = x_rows.shape
        dy_rows = _as_rows(dy)
        dx = torch.empty(ctx.x_shape, dtype=x_rows.dtype, device=x_rows.device)
        compute_dw = weight is not None and ctx.needs_input_grad[1]
        tile_rows, block, num_warps = _launch_shape(n_cols, x_rows.element_size(),
                                                    _DW_TILE_ELEMENTS if compute_dw else 2048)
        programs = max(1, _backward_programs(n_rows, tile_rows, x_rows.device, compute_dw))
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), tile_rows) * tile_rows
        dw_partial = torch.empty((programs, n_cols) if compute_dw else (1,), dtype=rstd.dtype, device=x_rows.device)
        _rms_norm_backward_kernel[(programs,)](
            dx, n_cols, dy_rows, dy_rows.stride(0), x_rows, x_rows.stride(0),
            weight if weight is not None else x_rows, rstd, dw_partial,
            n_rows, n_cols, ctx.offset, rows_per_program,
            HAS_WEIGHT=weight is not None, LLAMA_CAST=ctx.llama_cast, COMPUTE_DW=compute_dw,
            ACC=_tl_accumulator(x_rows.dtype), ROWS=tile_rows, BLOCK=block, num_warps=num_warps,
        )
        dw = None
        if compute_dw:
            dw = _summed_dw(dw_partial, weight.dtype) if _FUSED_DW_SUM else dw_partial.sum(0).to(weight.dtype)
        return dx, dw, None, None, None


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0, cast_mode: str = "llama"
) -> torch.Tensor:
    """The same function in plain PyTorch, rounding where transformers' modules round."""
    input_dtype, acc = x.dtype, _accumulator(x.dtype)
    x_acc = x.to(acc)
    x_hat = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return x_hat.to(input_dtype)
    if cast_mode == "llama":
        out_dtype = torch.promote_types(input_dtype, weight.dtype)
        return ((weight.to(acc) + offset) * x_hat.to(input_dtype).to(acc)).to(out_dtype)
    return (x_hat * (weight.to(acc) + offset)).to(input_dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0, cast_mode: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton on CUDA tensors, the reference elsewhere."""
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode {cast_mode!r}; choose one of {', '.join(CAST_MODES)}")
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset), cast_mode)
    return rms_norm_reference(x, weight, eps, offset, cast_mode)


# transformers' norm classes whose convention is not Llama's (weight * x̂.to(input_dtype)).
_HF_CONVENTIONS = {
    "GemmaRMSNorm": (1.0, "gemma"),
    "Gemma2RMSNorm": (1.0, "gemma"),
    "Gemma3RMSNorm": (1.0, "gemma"),
    "Gemma3nRMSNorm": (0.0, "gemma"),
    "Gemma4RMSNorm": (0.0, "gemma"),
}
_LLAMA_SOURCE = "self.weight * hidden_states.to(input_dtype)"
_ONE_PLUS_W_SOURCE = "1.0 + self.weight.float()"


def hf_convention(module: torch.nn.Module) -> tuple[float, str]:
    """(offset, cast_mode) of a transformers RMSNorm module, by class name or, failing that, by its source."""
    name = type(module).__name__
    if name in _HF_CONVENTIONS:
        return _HF_CONVENTIONS[name]
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        source = ""
    if _LLAMA_SOURCE in source:
        return 0.0, "llama"
    if _ONE_PLUS_W_SOURCE in source:
        return 1.0, "gemma"
    raise ValueError(f"rms_norm: unknown RMSNorm convention of {name}; add it to _HF_CONVENTIONS")


class RMSNorm(torch.nn.Module):
    """Drop-in for a transformers RMSNorm module; shares (not copies) the original's weight."""

    def __init__(self, weight: torch.nn.Parameter | None, eps: float, offset: float = 0.0, cast_mode: str = "llama"):
        super().__init__()
        if cast_mode not in CAST_MODES:
            raise ValueError(f"cast_mode {cast_mode!r}; choose one of {', '.join(CAST_MODES)}")
        self.weight = weight
        self.eps, self.offset, self.cast_mode = float(eps), float(offset), cast_mode

    @classmethod
    def from_hf(cls, module: torch.nn.Module) -> "RMSNorm":
        offset, cast_mode = hf_convention(module)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise ValueError(f"rms_norm: {type(module).__name__} has neither variance_epsilon nor eps")
        weight = module.weight if getattr(module, "with_scale", True) else None
        return cls(weight, eps, offset, cast_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.cast_mode)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else None
        return f"{shape}, eps={self.eps}, offset={self.offset}, cast_mode={self.cast_mode}"
