"""QLoRA linear: ``y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ (+ bias)`` with a frozen NF4 (or bf16) base.

The backward produces dX, dA, dB (and d(bias) when the bias trains), never dW. The base weight
is dequantized again in the backward instead of being saved: saving it would keep a bf16 copy
of every linear alive between forward and backward, the memory QLoRA exists to avoid.

Two ways to run the base matmul on the GPU; which one wins depends on the token count M:

* ``fused`` (``nf4_matmul``): Triton matmuls that decode NF4 tiles in registers. At small M the
  matmul is bound by reading W: this reads 0.5 byte a weight (+ its absmax), where dequantize +
  cuBLAS reads 0.5, writes 2 and reads 2 again. A program loads a [BLOCK_N, BLOCK_K / 2] tile of
  packed bytes (contiguous along W's rows), looks both nibbles up in the code book held in
  registers, interleaves them with join + reshape, scales by one absmax per 64 values of a row
  (loaded once a tile, broadcast) and multiplies in the activations' dtype with fp32
  accumulation: the same bf16 weight the dequant path multiplies. The forward tiles W's rows
  (N); the input gradient reduces over them, so its few column tiles (32 at K = 4096) split
  W's rows over programs whose fp32 partial sums one more launch adds, in a fixed order.
* ``dequant``: dequantize into a reused buffer (one per device and dtype), then cuBLAS; the
  decode costs one pass over W, amortised when M is large and the matmul is bound by arithmetic.

``auto`` picks ``fused`` up to ``FUSED_MAX_TOKENS`` tokens on weights of at least ``FUSED_MIN_WEIGHT``
elements and ``dequant`` otherwise; override with ``base_path("fused"|"dequant")``,
``qlora_linear(..., base_path=...)`` or ``VRAMPLAN_QLORA_BASE``. Graph-timed forward + backward on the H100
(benchmarks/results/session11/fused-sweep.jsonl), fused against the dequant path: Llama-3.1-8B's up and
down projections (58.7M elements) 1.24x and 1.27x at 32 tokens, 1.43x and 1.37x at 64, 0.87x at 128;
Gemma-4-E4B's up projection (26.2M) 1.08x and 1.18x at 32 and 64; Gemma-4-E2B's (9.4M) 0.92x and 0.95x,
too small a weight for reading it once to pay. The bounds sit between those: 64 tokens, 2^24 elements.
They are mirrored in vramplan/memory/weights.py (a test checks they agree).

The LoRA branch computes ``x·Aᵀ`` once and saves that [M, r] product for the backward (it is
r/in_features the size of x). With 16-bit activations the LoRA matmuls run in x's dtype with
fp32 accumulation, as under autocast; with fp32/fp64 activations, in the adapters' dtype.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton
import triton.language as tl
from torch.optim.optimizer import register_optimizer_step_post_hook

from vramplan_kernels.dispatch import Switch, interpreting, sm_count, use_triton
from vramplan_kernels.wide_matmul import matmul_fp32
from vramplan_kernels.nf4 import (
    NF4Tensor,
    _absmax_of_blocks,
    _dequant_launch,
    dequantize_nf4,
    dequantize_nf4_reference,
    nf4_code,
    quantize_nf4,
)

#: the most tokens ``auto`` sends to the fused kernels, and the fewest weight elements (see the module's docstring)
FUSED_MAX_TOKENS = 64
FUSED_MIN_WEIGHT = 1 << 24
_BASE_PATHS = ("auto", "fused", "dequant")
_BASE = Switch("VRAMPLAN_QLORA_BASE", _BASE_PATHS, "auto")


def base_path(path: str):
    """Force how the NF4 base matmul runs (benchmarks, tests): ``auto``, ``fused`` or ``dequant``."""
    return _BASE.override(path)


def choose_base_path(tokens: int, weight_numel: int, path: str | None = None) -> str:
    path = path or _BASE.value
    if path == "auto":
        return "fused" if tokens <= FUSED_MAX_TOKENS and weight_numel >= FUSED_MIN_WEIGHT else "dequant"
    return path


# --------------------------------------------------------------------------------------------
# Triton: matmul with the NF4 weight decoded tile by tile
# --------------------------------------------------------------------------------------------


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, high_code, low_code, rows, k0, N, K,
              BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] in fp32, for K a multiple of BLOCKSIZE (every row starts a block).

    The packed bytes load as one [BLOCK_N, BLOCK_K / 2] tile, contiguous along each row; both
    nibbles decode through the code book and interleave with join + reshape (a byte's first value
    is its high nibble). One absmax is loaded per GROUP values of a row and broadcast, not
    gathered per value. Rows past N are clamped to the last row (loads need no row mask): the
    callers zero them through the activations or mask them on the store.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    GROUP: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K  # values of a row under one absmax
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = tl.minimum(rows, N - 1)
    byte = k0 // 2 + tl.arange(0, HALF)
    start = k0 + tl.arange(0, GROUPS) * GROUP  # each group's first column
    block = (rows[:, None] * K + start[None, :]) // BLOCKSIZE
    # columns past K decode as code 0 times absmax 0 (or the offset): finite, and met by zero activations
    in_k = tl.broadcast_to(start[None, :] < K, block.shape)
    absmax = _absmax_of_blocks(absmax_ptr, scale_ptr, code8_ptr, offset_ptr, block, in_k, DOUBLE_QUANT)
    if EVEN_K:
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte[None, :]).to(tl.int32)
    else:
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte[None, :], mask=byte[None, :] < K // 2,
                         other=0).to(tl.int32)
    absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], [BLOCK_N, GROUPS, GROUP // 2]), [BLOCK_N, HALF])
    high = _lookup(high_code, packed) * absmax
    low = _lookup(low_code, packed) * absmax
    return tl.reshape(tl.join(high, low), [BLOCK_N, BLOCK_K])


@triton.jit
def _byte_code_books(code4_ptr):
    """The values of a byte's high and low nibble, indexed by the whole byte (two 256-entry tables,
    loaded once a program): a lookup needs no shift or mask of the byte first."""
    byte = tl.arange(0, 256)
    return tl.load(code4_ptr + (byte >> 4)), tl.load(code4_ptr + (byte & 0xF))


@triton.jit
def _lookup(table, index):
    """table[index] from a table in registers (tl.gather), not a load from memory: the software
    pipeliner would stage a load's [BLOCK_N, BLOCK_K / 2] gathered fp32 values in shared memory,
    num_stages times over (70-360 KB a program, measured compiling for sm_90)."""
    flat = tl.reshape(index, [index.numel])
    return tl.reshape(tl.gather(table, flat, 0), index.shape)


@triton.jit
def _rounded_to(w, dtype: tl.constexpr):
    """w (fp32) rounded to ``dtype`` and back, nearest even; by hand for bf16, whose cast the interpreter truncates."""
    if dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return w.to(dtype).to(tl.float32)


@triton.jit
def _dot_decoded(acc, x, w, DOT_IN_FP32: tl.constexpr):
    """acc + x · w, the decoded w (fp32) first rounded to x's dtype, the values dequant + cuBLAS multiply.

    ``DOT_IN_FP32`` (the interpreter, whose tl.dot reads bf16 tiles as their raw 16-bit integers):
    the product in fp32 of the same rounded values. fp32 activations multiply in full fp32, not TF32.
    """
    if DOT_IN_FP32:
        return tl.dot(x.to(tl.float32), _rounded_to(w, x.dtype), acc)
    if x.dtype == tl.float32:
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


@triton.jit
def _nf4_matmul_wt_kernel(
    a_ptr, packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, code4_ptr, out_ptr,
    M, N, K, stride_am, m_bucket, splits,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_IN_FP32: tl.constexpr = False,
):
    """The forward, out[s, M, N] = a[M, K-chunk s] · W[N, K-chunk s]ᵀ.

    Programs: (M block, N block, split); the M blocks of one W tile are neighbours in launch order,
    so all but the first read it from L2. ``splits`` > 1 cuts K into chunks whose fp32 partial
    sums ``_sum_splits_kernel`` adds up (only where the N blocks alone would leave SMs idle).
    ``m_bucket`` is only the autotuning key.
    """
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1).to(tl.int64)  # clamped: stored masked
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
    k_start = pid_s * chunk
    high_code, low_code = _byte_code_books(code4_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + chunk, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :])
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=rk[None, :] < K, other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, high_code, low_code, rn, k0, N, K,
                      BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, BLOCK_K, EVEN_K)
        acc = _dot_decoded(acc, a, tl.trans(w), DOT_IN_FP32)
    out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out = out_ptr + pid_s.to(tl.int64) * M * N + out_m[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(out_m[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _nf4_matmul_w_kernel(
    g_ptr, packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, code4_ptr, out_ptr,
    M, N, K, stride_gm, m_bucket, splits,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_IN_FP32: tl.constexpr = False,
):
    """The input gradient, out[s, M, K] = g[M, N-chunk s] · W[N-chunk s, K].

    Programs: (M block, K block, split). The reduction runs over W's rows, and K / BLOCK_K
    column blocks are few (32 at K = 4096), so the rows are split across programs by default and
    their fp32 partial sums added by ``_sum_splits_kernel``. Each W tile is the forward's
    [BLOCK_N, BLOCK_K] tile: BLOCK_K / 2 contiguous bytes of each of BLOCK_N rows.
    """
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1).to(tl.int64)
    k0 = pid_k * BLOCK_K
    chunk = tl.cdiv(tl.cdiv(N, splits), BLOCK_N) * BLOCK_N
    n_start = pid_s * chunk
    high_code, low_code = _byte_code_books(code4_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, tl.minimum(n_start + chunk, N), BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        # rows past N: zero gradient, so the tile's clamped duplicate rows add nothing
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=rn[None, :] < N, other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, high_code, low_code, rn, k0, N, K,
                      BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, BLOCK_K, EVEN_K)
        acc = _dot_decoded(acc, g, w, DOT_IN_FP32)
    out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + pid_s.to(tl.int64) * M * K + out_m[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(out_m[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    """out = partial[0] + partial[1] + ... in a fixed order: the same bits on every run (no atomics)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + s * numel + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tile_configs(wide: bool) -> list[triton.Config]:
    """Hopper tiles for M = 16..256: ``wide`` (VRAMPLAN_FUSED_TUNING=wide) tries every combination
    of BLOCK_M 16/32/64, BLOCK_N and BLOCK_K 64/128/256, 4/8 warps, 3/4 stages (hundreds of
    compiles a shape); the default, a handful of them that span those sizes."""
    if wide:
        tiles = [(bm, bn, bk, w, s) for bm in (16, 32, 64) for bn in (64, 128, 256) for bk in (64, 128, 256)
                 for w in (4, 8) for s in (3, 4)]
    else:
        tiles = [(16, 64, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (16, 128, 256, 8, 3),
                 (16, 256, 64, 4, 4), (32, 64, 128, 4, 3), (32, 64, 256, 4, 4), (32, 128, 128, 4, 4),
                 (32, 128, 256, 8, 3), (64, 64, 128, 4, 3), (64, 64, 256, 8, 3), (64, 128, 128, 8, 3),
                 (64, 128, 256, 8, 3), (64, 256, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _tiles_for_m(configs, named_args, **kwargs):
    """No BLOCK_M above the token count's bucket: the rows past M would be computed for nothing."""
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["m_bucket"])]
    return fitting or configs


def _tuned(kernel):
    tuned = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(kernel)
    return triton.autotune(_tile_configs(os.environ.get("VRAMPLAN_FUSED_TUNING") == "wide"),
                           key=["m_bucket", "N", "K", "splits", "BLOCKSIZE", "DOUBLE_QUANT"],
                           prune_configs_by={"early_config_prune": _tiles_for_m})(tuned)


_nf4_matmul_wt_tuned = _tuned(_nf4_matmul_wt_kernel)
_nf4_matmul_w_tuned = _tuned(_nf4_matmul_w_kernel)
#: the interpreter's tiles: small, so a CPU test takes seconds; BLOCK_N < N and BLOCK_K < K at the tests' shapes
_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
#: the shortest stretch of the reduction a split gets: each split writes an fp32 [M, out] partial
MIN_SPLIT_LENGTH = 512
_DOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _reduction_splits(m: int, out_features: int, reduction: int, device: torch.device) -> int:
    """How many programs share one output tile's reduction: as many as the SMs that the output
    tiles (counted at 64 x 128) leave idle allow, e.g. 4 for the input gradient at K = 4096 and 64
    tokens on an H100 (32 column tiles, 132 SMs); none where the tiles fill the GPU (their fp32
    partial sums cost a write and a read of [splits, M, out]); never a split shorter than
    ``MIN_SPLIT_LENGTH``."""
    tiles = triton.cdiv(m, 64) * triton.cdiv(out_features, 128)
    return max(1, min(sm_count(device) // tiles, reduction // MIN_SPLIT_LENGTH))


def nf4_matmul(a: torch.Tensor, q: NF4Tensor, transpose_w: bool, splits: int | None = None) -> torch.Tensor:
    """a·Wᵀ (``transpose_w``: the forward) or a·W (the input gradient), W never materialised.

    ``splits``: programs sharing each output tile's reduction (None: ``_reduction_splits``).
    A weight whose rows do not start whole absmax blocks (K not a multiple of the block size; no
    real model's), or fp64 activations, take the dequantized weight instead.
    """
    n, k = q.shape
    if k % q.blocksize or a.dtype not in _DOT_DTYPES:
        w = dequantize_nf4(q, a.dtype)
        return torch.mm(a, w.t() if transpose_w else w)
    a = a.contiguous()
    m = a.shape[0]
    out_features, reduction = (n, k) if transpose_w else (k, n)
    splits = splits or _reduction_splits(m, out_features, reduction, a.device)
    # fp32 where partial sums are added later, and in the interpreter, whose stores truncate to bf16
    direct = splits == 1 and not (interpreting() and a.dtype == torch.bfloat16)
    partials = torch.empty((splits, m, out_features), dtype=a.dtype if direct else torch.float32, device=a.device)
    args = (a, *_dequant_launch(q).tensors, partials, m, n, k, a.stride(0), max(16, triton.next_power_of_2(m)), splits)
    quant = dict(BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant)
    if interpreting():
        kernel = _nf4_matmul_wt_kernel if transpose_w else _nf4_matmul_w_kernel
        tiles = _INTERPRETER_TILES
        out_block = tiles["BLOCK_N"] if transpose_w else tiles["BLOCK_K"]
        kernel[(triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(out_features, out_block), splits)](
            *args, **quant, **tiles, EVEN_K=k % tiles["BLOCK_K"] == 0, DOT_IN_FP32=True)
    else:
        kernel, out_block = (_nf4_matmul_wt_tuned, "BLOCK_N") if transpose_w else (_nf4_matmul_w_tuned, "BLOCK_K")
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(out_features, meta[out_block]), splits)  # noqa: E731
        kernel[grid](*args, **quant, enable_fp_fusion=False)
    return partials[0] if direct else _sum_splits(partials, a.dtype)


def _sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[splits, M, P] fp32 partial sums -> [M, P] in ``dtype``, in one launch."""
    splits, m, p = partials.shape
    staging = interpreting() and dtype == torch.bfloat16  # the interpreter's store would truncate
    out = torch.empty((m, p), dtype=torch.float32 if staging else dtype, device=partials.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * p, block),)](partials, out, m * p, splits, BLOCK=block)
    return out.to(dtype)


# --------------------------------------------------------------------------------------------
# The base matmul, either way
# --------------------------------------------------------------------------------------------

_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_buffer_views: dict[tuple[torch.device, torch.dtype, torch.Size], tuple[torch.Tensor, torch.Tensor]] = {}


def _dequant_buffer(q: NF4Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, Wᵀ): a [N, K] view of one flat buffer per (device, dtype), grown to the largest weight seen, and its transpose.

    Every linear reuses it: one transient bf16 weight at a time instead of one per layer
    (the caching allocator would otherwise hand out, and keep, a block per weight shape).
    The views are kept per shape: a decoder has a handful of weight shapes, and slicing and
    viewing anew costs three host ops per call, hundreds of calls per step.
    """
    view_key = (q.device, dtype, q.shape)
    views = _buffer_views.get(view_key)
    if views is not None:
        return views
    key = (q.device, dtype)
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < q.numel():
        buffer = _buffers[key] = torch.empty(q.numel(), dtype=dtype, device=q.device)
        for stale in [k for k in _buffer_views if k[:2] == key]:
            del _buffer_views[stale]
    w = buffer[: q.numel()].view(q.shape)
    views = _buffer_views[view_key] = (w, w.t())
    return views


def _base_matmul(a: torch.Tensor, weight, transpose_w: bool, path: str | None) -> torch.Tensor:
    if isinstance(weight, NF4Tensor):
        if use_triton(a):
            if choose_base_path(a.shape[0], weight.numel(), path) == "fused":
                return nf4_matmul(a, weight, transpose_w)
            w, w_t = _dequant_buffer(weight, a.dtype)
            dequantize_nf4(weight, out=w)
            return torch.mm(a, w_t if transpose_w else w)
        w = dequantize_nf4(weight, a.dtype)
    else:
        w = weight if weight.dtype == a.dtype else weight.to(a.dtype)
    return torch.mm(a, w.t() if transpose_w else w)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (a host op saved, hundreds per step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim]: a view when t is contiguous (one host op, where reshape costs two)."""
    if t.dim() == 2:
        return t
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


class QLoRALinearFunction(torch.autograd.Function):
    """The LoRA matmuls run in x's dtype when it is 16-bit (as under autocast), accumulating into
    the base output with ``addmm_``: no [M, out] fp32 intermediate, the largest cost of PEFT's
    LoRA branch at training token counts. The adapters' gradients come back in their own dtype.

    ``lora_copies`` (optional) are A and B already in the compute dtype, with their transposes:
    ``QLoRALinear`` keeps them for a whole optimizer step (see ``LoRACopies``), so the forward,
    its recompute under checkpointing and the backward cast nothing. Only activations go
    through ``save_for_backward`` (where checkpointing's hooks drop and recompute them); the
    adapters are parameters and sit on ``ctx`` as they are.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias, path, lora_copies=None):
        x2 = _rows(x)
        y = _base_matmul(x2, weight, transpose_w=True, path=path)
        xa = None
        if lora_a is not None:
            if _low_precision(x2):
                a_c, a_t, b_c, b_t = lora_copies if lora_copies is not None and lora_copies[0].dtype == x2.dtype \
                    else _copies(lora_a, lora_b, x2.dtype)
                xa = torch.mm(x2, a_t)
            else:
                a_c, a_t, b_c, b_t = _copies(lora_a, lora_b, lora_a.dtype)
                xa = torch.mm(_cast(x2, lora_a.dtype), a_t)
            y.addmm_(_cast(xa, y.dtype), _cast(b_t, y.dtype), alpha=scale)
            ctx.lora = (lora_a, lora_b, a_c, b_c)
            ctx.save_for_backward(x2, xa)
        if bias is not None:
            y += _cast(bias, y.dtype)
        ctx.weight, ctx.scale, ctx.path = weight, scale, path
        ctx.has_bias, ctx.has_lora = bias is not None, lora_a is not None
        ctx.x_shape = x.shape
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        g = _rows(grad_y)
        if not g.is_contiguous():
            g = g.contiguous()
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_matmul(g, ctx.weight, transpose_w=False, path=ctx.path)
        if ctx.has_lora:
            x2, xa = ctx.saved_tensors
            lora_a, lora_b, a_c, b_c = ctx.lora
            compute = xa.dtype
            g_c = _cast(g, compute)
            # the scale rides in the matmul (addmm's alpha over an ignored input): one launch, not mm + mul_
            zero = _zero(g_c)
            g_xa = torch.addmm(zero, g_c, _cast(b_c, compute), beta=0, alpha=ctx.scale)  # [M, r]: the gradient at x·Aᵀ
            # fp16 steps scale their loss (train.loss_scale): a weight gradient sums over every token and passes
            # fp16's 65,504 long before the per-token gradients do, so it is produced in fp32
            wide = compute == torch.float16
            flat = _flat_of(lora_a)
            sink = (flat.grad_sink(lora_a, lora_b, torch.float32 if wide else compute)
                    if flat is not None and all(ctx.needs_input_grad[2:4]) else None)
            if sink is not None and wide:
                sink[1].add_(matmul_fp32(g_c.t(), xa), alpha=ctx.scale)
                sink[0].add_(matmul_fp32(g_xa.t(), _cast(x2, compute)))
            elif sink is not None:  # into the flat gradient buffer, cast once for all adapters at the end
                sink[1].addmm_(g_c.t(), xa, alpha=ctx.scale)
                sink[0].addmm_(g_xa.t(), _cast(x2, compute))
            elif wide:
                grad_b = _cast(matmul_fp32(g_c.t(), xa).mul_(ctx.scale), lora_b.dtype)
                grad_a = _cast(matmul_fp32(g_xa.t(), _cast(x2, compute)), lora_a.dtype)
            else:
                grad_b = _cast(torch.addmm(zero, g_c.t(), xa, beta=0, alpha=ctx.scale), lora_b.dtype)
                grad_a = _cast(torch.mm(g_xa.t(), _cast(x2, compute)), lora_a.dtype)
            if grad_x is not None:
                grad_x.addmm_(_cast(g_xa, grad_x.dtype), _cast(a_c, grad_x.dtype))
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g.sum(0)
        if grad_x is not None and grad_x.shape != ctx.x_shape:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, grad_a, grad_b, None, grad_bias, None, None


_zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of ``like``'s dtype and device: the input of ``addmm(..., beta=0)``, which reads no
    value of it (and with beta 0 copies nothing into the output), kept so no step allocates one."""
    key = (like.device, like.dtype)
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


def _copies(lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(A, Aᵀ, B, Bᵀ) in ``dtype``, detached (the Function differentiates through the originals)."""
    a, b = _cast(lora_a.detach(), dtype), _cast(lora_b.detach(), dtype)
    return a, a.t(), b, b.t()


class LoRACopies:
    """A module's LoRA pair cast to the compute dtype once per optimizer step, not once per call.

    With checkpointing each adapted linear runs its forward twice and its backward once per
    step, and each would cast the fp32 adapters to bf16 again (six casts, 24 host ops). The
    copies are rebuilt when an optimizer has stepped since (a global step hook bumps
    ``_generation``: bitsandbytes' fused update writes the parameters in place without bumping
    their version counter) or when the parameters were changed in place by torch ops or replaced
    (version counter, data pointer). Memory: r·(in+out) 16-bit values per linear (22 MB for
    Llama-3.2-1B at r=16), held between steps.
    """

    _generation = 0

    def __init__(self):
        self._key = None
        self._copies: tuple[torch.Tensor, ...] | None = None

    def drop(self) -> None:
        """Forgets the copies (the next ``get`` makes new ones): a CUDA graph's capture drops the eager pass's."""
        self._key = self._copies = None

    @classmethod
    def _optimizer_stepped(cls, *_args) -> None:
        cls._generation += 1

    def get(self, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (LoRACopies._generation, dtype, lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr())
        if key != self._key:
            together = _flat_of(lora_a)
            if together is not None and together.holds(lora_a) and together.holds(lora_b):
                # changed since this step's copies were made (not by the optimizer): cast the whole buffer anew
                changed = self._key is not None and self._key[:2] == key[:2]
                self._copies = together.copies(lora_a, lora_b, dtype, refresh=changed)
            else:
                self._copies = _copies(lora_a, lora_b, dtype)
            self._key = key
        return self._copies


register_optimizer_step_post_hook(LoRACopies._optimizer_stepped)


class _FlatAdapters:
    """Adapters stored as views of one flat tensor (an optimizer's flat parameter):

    * their compute-dtype copies come from one cast of the whole tensor per optimizer step,
      instead of two casts per module;
    * with ``grad`` (the flat gradient whose views are the adapters' ``.grad``), the backward
      adds dA and dB straight into a flat compute-dtype buffer (``addmm_``, the scale folded in; fp32 for fp16 steps,
      whose loss-scaled weight gradients pass fp16's range) and autograd gets no gradient for them: at the end of the
      backward one ``add_``
      moves the whole buffer into ``grad`` (the same values autograd's per-tensor cast and
      accumulate would give), and one ``zero_`` clears it. Two launches per step instead of two
      casts per adapted linear. Off under ``create_graph`` (the normal path then runs).
    """

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor | None):
        self._flat = weakref.ref(flat)  # dies with its optimizer
        self._grad = weakref.ref(grad) if grad is not None else None
        self._key, self._cast, self._sink, self._flush_queued = None, None, None, False

    @property
    def flat(self) -> torch.Tensor | None:
        return self._flat()

    def holds(self, t: torch.Tensor) -> bool:
        flat = self.flat
        return flat is not None and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and t.is_contiguous()

    def copies(self, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype, refresh: bool) -> tuple[torch.Tensor, ...]:
        key = (LoRACopies._generation, dtype)
        if refresh or key != self._key:
            self._cast, self._key = self.flat.detach().to(dtype), key
        a, b = self._view(self._cast, lora_a), self._view(self._cast, lora_b)
        return a, a.t(), b, b.t()

    def grad_sink(self, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(dA, dB) views to accumulate this backward's adapter gradients into, or None: return them to autograd."""
        grad = self._grad() if self._grad is not None else None
        if grad is None or torch.is_grad_enabled() or not (self.holds(lora_a) and self.holds(lora_b)):
            return None
        if self._sink is None or self._sink.dtype != dtype or self._sink.device != grad.device:
            self._sink = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
        if not self._flush_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_queued = True
        return self._view(self._sink, lora_a), self._view(self._sink, lora_b)

    def _flush(self) -> None:
        self._flush_queued = False
        grad = self._grad()
        if grad is not None:
            grad.add_(self._sink)
        self._sink.zero_()

    def _view(self, buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        start = t.storage_offset() - self.flat.storage_offset()
        return buffer[start:start + t.numel()].view(t.shape)


_flat_adapters: dict[int, _FlatAdapters] = {}


def flat_adapters(flat: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """Register ``flat``, the storage of adapters that are views of it: one cast per step for all
    of them, and with ``grad`` (``flat``'s gradient, whose views are the adapters' ``.grad``) their
    gradients written there in one launch per backward. See ``_FlatAdapters``."""
    _flat_adapters[flat.untyped_storage().data_ptr()] = _FlatAdapters(flat, grad)


def _flat_of(lora_a: torch.Tensor) -> _FlatAdapters | None:
    return _flat_adapters.get(lora_a.untyped_storage().data_ptr()) if _flat_adapters else None


def _low_precision(x: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16)


def qlora_linear(x: torch.Tensor, weight: NF4Tensor | torch.Tensor, lora_a: torch.Tensor | None,
                 lora_b: torch.Tensor | None, scale: float, bias: torch.Tensor | None = None,
                 base_path: str | None = None, lora_copies: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``x·dequant(W)ᵀ + scale·(x·Aᵀ)·Bᵀ + bias`` in x's dtype; gradients for x, A, B and bias only.

    ``lora_copies``: (A, Aᵀ, B, Bᵀ) already in x's dtype, from ``LoRACopies.get`` (saves the casts)."""
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither")
    if base_path is not None and base_path not in _BASE_PATHS:
        raise ValueError(f"base path {base_path!r}; choose one of {', '.join(_BASE_PATHS)}")
    return QLoRALinearFunction.apply(x, weight, lora_a, lora_b, scale, bias, base_path, lora_copies)


def qlora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None):
    """The same function in plain PyTorch ops, differentiated by autograd (W dequantized up front)."""
    w = dequantize_nf4_reference(weight, x.dtype) if isinstance(weight, NF4Tensor) else weight.to(x.dtype)
    y = x @ w.t()
    if lora_a is not None:
        y = y + ((x.to(lora_a.dtype) @ lora_a.t() @ lora_b.t()) * scale).to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class QLoRALinear(torch.nn.Module):
    """A frozen base linear (NF4, or a plain bf16 weight) plus a trainable LoRA pair.

    The adapters are ``lora_A`` / ``lora_B`` submodules so their state-dict keys read
    ``….lora_A.weight`` [r, in] and ``….lora_B.weight`` [out, r], as PEFT writes them.
    """

    def __init__(self, weight: NF4Tensor | torch.Tensor, bias: torch.Tensor | None, rank: int, alpha: float,
                 lora_dtype: torch.dtype = torch.float32, storage=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.scale = rank, alpha / rank
        self.base_path: str | None = None  # None follows the global choice; "fused" / "dequant" pin this layer
        device = weight.device
        if isinstance(weight, NF4Tensor):
            self.weight = weight  # moved by _apply, never cast: its scales must stay fp32
        else:
            self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        # ``storage(shape)``: the adapters as views of one buffer made before the layers (``AdapterArena``)
        where = "meta" if storage is not None else device
        self.lora_A = torch.nn.Linear(self.in_features, rank, bias=False, device=where, dtype=lora_dtype)
        self.lora_B = torch.nn.Linear(rank, self.out_features, bias=False, device=where, dtype=lora_dtype)
        if storage is not None:  # initialised as the constructor would have: the same random draws either way
            for lora in (self.lora_A, self.lora_B):
                lora.weight = torch.nn.Parameter(storage(lora.weight.shape))
                lora.reset_parameters()
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        torch.nn.init.zeros_(self.lora_B.weight)
        self._lora_copies = LoRACopies()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rank: int, alpha: float, quant: str = "nf4",
                    double_quant: bool = True, lora_dtype=torch.float32, storage=None) -> "QLoRALinear":
        if quant == "nf4":
            weight = quantize_nf4(linear.weight.detach(), double_quant=double_quant)
        elif quant == "bf16":
            # "bf16" means not quantized: keep the dtype the model was loaded in (bf16 on a GPU)
            weight = linear.weight.detach()
        else:
            raise ValueError(f"quant {quant!r}: choose nf4 or bf16")
        return cls(weight, linear.bias, rank, alpha, lora_dtype, storage)

    def _apply(self, fn, recurse=True):
        if isinstance(self.weight, NF4Tensor):
            self.weight = self.weight.to(fn(torch.empty(0, device=self.weight.device)).device)
        return super()._apply(fn, recurse)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base as a dense tensor (dequantized when NF4): for merging and for tests."""
        if isinstance(self.weight, NF4Tensor):
            return dequantize_nf4(self.weight, dtype)
        return self.weight.detach().to(dtype or self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        copies = self._lora_copies.get(a, b, x.dtype) if _low_precision(x) and a.dtype != x.dtype else None
        return qlora_linear(x, self.weight, a, b, self.scale, self.bias, base_path=self.base_path, lora_copies=copies)

    def extra_repr(self) -> str:
        kind = "nf4" if isinstance(self.weight, NF4Tensor) else str(self.weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, base={kind}"
