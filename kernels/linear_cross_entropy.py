"""Cross-entropy of an LM head, computed chunk by chunk so the [tokens, vocab] logits never exist whole.

With a 262,144-token vocabulary (Gemma 4) the logits, not the weights, set the peak at long
sequences: 8,192 tokens x 262,144 x 4 bytes = 8.6 GB per fp32 copy, and the unfused path keeps
a bf16 copy, an fp32 copy and an fp32 gradient. Here the forward pass walks the tokens in chunks:
one chunk's logits are computed (matmul in the compute dtype, fp32 accumulation), a Triton kernel
finds each row's logsumexp and target logit online and, in the same launch, overwrites the logits
with the gradient of the loss with respect to them; that gradient is multiplied into the hidden
states' gradient (and the head's, when it trains) before the next chunk reuses the buffer. The
backward pass only scales the stored gradients by ``grad_output``. Extra memory is one chunk's
logits plus grad_hidden [N, H] (plus grad_W [V, H] when the head is trainable).

A frozen head may come quantized (``Int8Rows``: int8 rows with one scale each). Then each chunk's
logits are filled one slice of vocabulary rows at a time, the slice dequantized into a small reused
temporary (``int8_rows.DEQUANT_SLICE_BYTES``), and grad_hidden = d logits · W is summed over the
same slices in fp32: the bf16 head never exists whole.

Learned from Liger Kernel's fused_linear_cross_entropy and Apple's cut-cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vramplan_kernels.dispatch import sm_count, use_triton
from vramplan_kernels.int8_rows import Int8Rows, slice_rows

LOGITS_CHUNK_BYTES = 128 * 1024**2
"""Default budget for one chunk's logits: large enough that the chunk's matmul fills the GPU
(256 tokens at a 262,144 vocabulary in bf16, 512 at 128,256), small next to the 8.6 GB it replaces.
Halved from 256 MB where the planner put the forward phase's peak on this buffer: Llama-3.2-1B at
2,048 tokens with an int8 head (forward 1.28 GB vs backward 1.25 GB at 256 MB; 1.15 vs 1.25 at
128 MB, where the backward's activations set the peak and a smaller chunk saves nothing more), and
Qwen3-0.6B at 2,048 tokens, whose measured peak (trainer_h100.jsonl) the 256 MB buffer explains."""

TRAINABLE_HEAD_CHUNK_FACTOR = 4
"""A trainable head's chunks are this many times larger: each chunk's ``grad_W += grad_logitsᵀ·h``
reads and writes all of grad_W [V, H] (1.6 GB a chunk at Gemma 4's 262,144 x 1,536, ~0.5 ms on
an H100), so fewer chunks save most of that traffic; the chunk's extra logits (384 MB more there, at the 128 MB budget)
are small next to grad_W itself. (The trainer's head is frozen: the planner's logits model
counts the frozen head's budget.)"""

_REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _tanh(x):
    # exp-based so it runs on every backend and in the interpreter; saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dx) of a logit: z = softcap * tanh(x / softcap), slope 1 - tanh^2; without a softcap (x, 1)."""
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t
        slope = 1.0 - t * t
    else:
        z = x
        slope = tl.full(x.shape, 1.0, x.dtype)
    return z, slope


@triton.jit
def _row_max_and_sum_exp(row_ptr, first, n_cols, softcap, HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    """(max, sum of exp(z - max)) over a row's values first..n_cols-1, z = softcap(logits): an online logsumexp."""
    running_max = tl.full([], float("-inf"), dtype=ACC_DTYPE)
    running_sum = tl.zeros([], dtype=ACC_DTYPE)
    for start in range(first, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < n_cols
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        block_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(z - block_max), axis=0)
        running_max = block_max
    return running_max, running_sum


@triton.jit
def _zero_row_segment(row_ptr, first, last, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """An ignored row's gradient: zeros over its values first..last-1."""
    for start in range(first, last, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(row_ptr + offs, tl.zeros((BLOCK_V,), dtype=ACC_DTYPE).to(row_ptr.dtype.element_ty), mask=offs < last)


@triton.jit
def _store_row_loss(row_ptr, loss_ptr, row, label, lse, softcap, HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """loss = logsumexp(z) - z[label], z = softcap(logits)."""
    z_target = tl.load(row_ptr + label).to(ACC_DTYPE)
    if HAS_SOFTCAP:
        z_target = softcap * _tanh(z_target / softcap)
    tl.store(loss_ptr + row, lse - z_target)


@triton.jit
def _write_row_grad(row_ptr, first, last, label, lse, scale, softcap, HAS_SOFTCAP: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """d loss / d logits over values first..last-1, times ``scale``, written over the logits it came from."""
    for start in range(first, last, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < last
        z, slope = _softcapped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
        grad = (tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0).to(ACC_DTYPE)) * slope
        tl.store(row_ptr + offs, (grad * scale).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token row: loss = logsumexp(z) - z[label], z = softcap(logits).

    With WRITE_GRAD the row is overwritten by d loss / d logits, times the row's grad scale:
    (softmax(z) - onehot(label)) * (1 - tanh^2(logits / cap)) * scale. Ignored rows get loss 0
    and a zero gradient.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)

    if label == ignore_index:
        tl.store(loss_ptr + row, tl.zeros([], dtype=ACC_DTYPE))
        if WRITE_GRAD:
            _zero_row_segment(row_ptr, 0, n_cols, ACC_DTYPE, BLOCK_V)
        return

    # Pass 1: running max and running sum of exponentials (online logsumexp).
    running_max, running_sum = _row_max_and_sum_exp(row_ptr, 0, n_cols, softcap, HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)
    lse = running_max + tl.log(running_sum)
    _store_row_loss(row_ptr, loss_ptr, row, label, lse, softcap, HAS_SOFTCAP, ACC_DTYPE)
    if WRITE_GRAD:  # pass 2: the gradient, written over the logits it came from
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(ACC_DTYPE)
        _write_row_grad(row_ptr, 0, n_cols, label, lse, scale, softcap, HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)


@triton.jit
def _row_partials_kernel(logits_ptr, logits_row_stride, part_max_ptr, part_sum_ptr, n_cols, segment, softcap,
                         SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """A split row's first pass: program (row, s) writes the online logsumexp's (max, sum) of its segment."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    first = split * segment
    last = tl.minimum(first + segment, n_cols)
    running_max, running_sum = _row_max_and_sum_exp(logits_ptr + row * logits_row_stride, first, last, softcap,
                                                    HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)
    tl.store(part_max_ptr + row * SPLITS + split, running_max)
    tl.store(part_sum_ptr + row * SPLITS + split, running_sum)


@triton.jit
def _row_finish_kernel(logits_ptr, logits_row_stride, labels_ptr, loss_ptr, grad_scale_ptr, grad_scale_stride,
                       part_max_ptr, part_sum_ptr, n_splits, n_cols, segment, ignore_index, softcap,
                       SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """A split row's second pass: program (row, s) folds the row's partials into its logsumexp, the
    first segment's program writes the loss, and each writes its segment's gradient over the logits
    (what ``_cross_entropy_rows_kernel`` does for a whole row)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    first = split * segment
    last = tl.minimum(first + segment, n_cols)
    if label == ignore_index:
        if split == 0:
            tl.store(loss_ptr + row, tl.zeros([], dtype=ACC_DTYPE))
        if WRITE_GRAD:
            _zero_row_segment(row_ptr, first, last, ACC_DTYPE, BLOCK_V)
    else:
        parts = tl.arange(0, SPLITS)
        part_max = tl.load(part_max_ptr + row * SPLITS + parts, mask=parts < n_splits, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + row * SPLITS + parts, mask=parts < n_splits, other=0.0)
        row_max = tl.max(part_max, axis=0)
        lse = row_max + tl.log(tl.sum(part_sum * tl.exp(part_max - row_max), axis=0))
        if split == 0:
            _store_row_loss(row_ptr, loss_ptr, row, label, lse, softcap, HAS_SOFTCAP, ACC_DTYPE)
        if WRITE_GRAD:
            scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(ACC_DTYPE)
            _write_row_grad(row_ptr, first, last, label, lse, scale, softcap, HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)


#: Splits of each row (None: :func:`row_splits`); benchmarks and tests may set it.
ROW_SPLITS = None
#: Programs per SM the split rows aim for: one program per row left a chunk of 512 rows of Llama's
#: 128,256 logits at ~4 programs an SM, reading at a third of the H100's bandwidth (282 µs a chunk,
#: benchmarks/results/session8/profile-graphs-llama-3.2-1b-2048.txt).
_ROW_PROGRAMS_PER_SM = 8
_MAX_ROW_SPLITS = 16
_MIN_SEGMENT = 8192  # logits a split program takes at least: its two passes stay long loads, not launch overhead
_SPLIT_BLOCK_V = 8192


def row_splits(rows: int, cols: int, device: torch.device) -> int:
    """How many programs share each row: enough for ``_ROW_PROGRAMS_PER_SM`` programs an SM, each with at
    least ``_MIN_SEGMENT`` of the row; one on the CPU (the interpreter) unless ``ROW_SPLITS`` says."""
    if ROW_SPLITS is not None:
        return max(1, ROW_SPLITS)
    if device.type != "cuda":
        return 1
    target = _ROW_PROGRAMS_PER_SM * sm_count(device)
    splits = 1
    while rows * splits < target and splits < _MAX_ROW_SPLITS and cols >= 2 * splits * _MIN_SEGMENT:
        splits *= 2
    return splits



def _row_launch(logits: torch.Tensor) -> dict:
    """The row kernels' launch settings for a [rows, cols] logits block: accumulator, block width, warps."""
    wide = logits.dtype == torch.float64
    block_v = min(triton.next_power_of_2(logits.shape[1]), 8192 if wide else 16384)
    return dict(ACC_DTYPE=tl.float64 if wide else tl.float32, BLOCK_V=block_v, num_warps=16 if block_v >= 4096 else 4)


def _launch_rows(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor | None,
                 ignore_index: int, softcap: float | None) -> None:
    """Run the row kernel on a [rows, V] logits chunk; with ``grad_scale`` it also writes the gradient."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    write_grad = grad_scale is not None
    if grad_scale is None:
        grad_scale = loss  # unread placeholder
    launch = _row_launch(logits)
    cap, scale_stride = float(softcap) if softcap else 1.0, grad_scale.stride(0) if grad_scale.dim() else 0
    splits = row_splits(rows, vocab, logits.device)
    if splits == 1:
        _cross_entropy_rows_kernel[(rows,)](
            logits, logits.stride(0), labels, loss, grad_scale, scale_stride, vocab, ignore_index, cap,
            HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grad, **launch,
        )
        return
    # several programs a row: partial logsumexps per segment, then each segment's loss and gradient
    launch["BLOCK_V"] = min(launch["BLOCK_V"], _SPLIT_BLOCK_V)
    segment = triton.cdiv(triton.cdiv(vocab, splits), launch["BLOCK_V"]) * launch["BLOCK_V"]
    splits = triton.cdiv(vocab, segment)  # every segment holds some of the row
    padded = triton.next_power_of_2(splits)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    part_max = torch.empty(rows, padded, dtype=acc, device=logits.device)
    part_sum = torch.empty(rows, padded, dtype=acc, device=logits.device)
    _row_partials_kernel[(rows, splits)](
        logits, logits.stride(0), part_max, part_sum, vocab, segment, cap,
        SPLITS=padded, HAS_SOFTCAP=bool(softcap), **launch,
    )
    _row_finish_kernel[(rows, splits)](
        logits, logits.stride(0), labels, loss, grad_scale, scale_stride, part_max, part_sum, splits, vocab,
        segment, ignore_index, cap, SPLITS=padded, HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grad, **launch,
    )


@triton.jit
def _online_softmax_slice_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    run_max_ptr,
    run_sum_ptr,
    target_ptr,
    alpha_ptr,
    v0,
    n_cols,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_P: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token row of a vocabulary slice's logits (columns v0 .. v0 + n_cols).

    Folds the slice into the row's running max and sum of exp(z), z = softcap(logits) (an online
    logsumexp over the slices), stores alpha = exp(old max - new max), by which the caller rescales
    what it has summed so far, and the target's z when the label falls in the slice. With WRITE_P the
    slice is overwritten by exp(z - new max) * dz/dlogits (1 - tanh^2 under a softcap), which the
    caller multiplies by the slice's head rows into the hidden states' gradient.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    old_max = tl.load(run_max_ptr + row)
    slice_max, slice_sum = _row_max_and_sum_exp(row_ptr, 0, n_cols, softcap, HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)
    new_max = tl.maximum(old_max, slice_max)
    alpha = tl.exp(old_max - new_max)  # 0 on the first slice (old max -inf)
    tl.store(run_sum_ptr + row, tl.load(run_sum_ptr + row) * alpha + slice_sum * tl.exp(slice_max - new_max))
    tl.store(run_max_ptr + row, new_max)
    tl.store(alpha_ptr + row, alpha)
    local = label - v0
    if (local >= 0) & (local < n_cols):
        z_target = tl.load(row_ptr + local).to(ACC_DTYPE)
        if HAS_SOFTCAP:
            z_target = softcap * _tanh(z_target / softcap)
        tl.store(target_ptr + row, z_target)
    if WRITE_P:
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < n_cols
            z, slope = _softcapped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
            tl.store(row_ptr + offs, (tl.exp(z - new_max) * slope).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_slice(logits, labels, v0, run_max, run_sum, target, alpha, softcap, write_p: bool) -> None:
    rows, cols = logits.shape
    _online_softmax_slice_kernel[(rows,)](
        logits, logits.stride(0), labels, run_max, run_sum, target, alpha, v0, cols,
        float(softcap) if softcap else 1.0, HAS_SOFTCAP=bool(softcap), WRITE_P=write_p, **_row_launch(logits),
    )


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, budget: int | None = None,
                       trainable_head: bool = False) -> int:
    """Tokens per chunk so that one chunk's logits fit in ``budget`` bytes (default LOGITS_CHUNK_BYTES;
    a multiple of 128 when large), or TRAINABLE_HEAD_CHUNK_FACTOR times that when the head's weight
    gets a gradient."""
    element = torch.empty((), dtype=dtype).element_size()
    budget = (budget or LOGITS_CHUNK_BYTES) * (TRAINABLE_HEAD_CHUNK_FACTOR if trainable_head else 1)
    chunk = max(1, budget // (vocab * element))
    if chunk >= 256:
        chunk -= chunk % 128
    return max(1, min(chunk, n_tokens))


def _check(hidden, weight, labels, reduction, lora):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {', '.join(_REDUCTIONS)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the LM head's {weight.shape[1]}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not align with hidden {tuple(hidden.shape[:-1])}")
    if lora is not None:
        lora_a, lora_b, _ = lora
        if lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0] or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the head "
                             f"{tuple(weight.shape)}")


class _ChunkedHead:
    """The pieces of one chunked pass: the head (W, bias, LoRA) applied to a chunk of tokens, and the
    gradients of everything that asked for one, accumulated chunk by chunk."""

    def __init__(self, hidden, weight, bias, lora, need):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dtype = weight.dtype
        self.need_hidden, self.need_weight, self.need_bias, self.need_lora = need
        self.quantized = isinstance(weight, Int8Rows)
        if self.quantized:
            if self.need_weight:
                raise ValueError("a quantized LM head is frozen: it has no weight gradient (train LoRA on it instead)")
            # one reused slice of dequantized rows, shared by the logits and grad_hidden
            rows = min(weight.shape[0], slice_rows(weight.shape[1], self.dtype))
            self.slice = torch.empty(rows, weight.shape[1], dtype=self.dtype, device=hidden.device)
        self.lora_a = self.lora_b = None
        if lora is not None:
            lora_a, lora_b, self.lora_scale = lora
            self.lora_a, self.lora_b = lora_a.to(self.dtype), lora_b.to(self.dtype)
            # x·Aᵀ for every token is [N, r]: tiny, so keep it whole.
            self.hidden_a = hidden.to(self.dtype) @ self.lora_a.t()
        self.grad_hidden = torch.empty_like(hidden) if self.need_hidden else None
        self.grad_weight = torch.zeros_like(weight) if self.need_weight else None
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if self.need_bias else None
        if self.need_lora:
            self.grad_a = torch.zeros(self.lora_a.shape, dtype=acc, device=hidden.device)
            self.grad_b = torch.zeros(self.lora_b.shape, dtype=acc, device=hidden.device)

    def slices(self):
        """(v0, v1, rows v0:v1 of the quantized head dequantized into the reused slice buffer)."""
        step = self.slice.shape[0]
        for v0 in range(0, self.weight.shape[0], step):
            v1 = min(v0 + step, self.weight.shape[0])
            yield v0, v1, self.weight.dequantize(v0, v1, out=self.slice[: v1 - v0])

    def logits(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        h = self.hidden[start:end].to(self.dtype)
        if self.quantized:
            for v0, v1, rows in self.slices():
                torch.mm(h, rows.t(), out=out[:, v0:v1])  # a column block of the buffer: no copy
        else:
            torch.mm(h, self.weight.t(), out=out)
        if self.lora_a is not None:
            out.addmm_(self.hidden_a[start:end], self.lora_b.t(), alpha=self.lora_scale)
        if self.bias is not None:
            out.add_(self.bias.to(self.dtype))
        return out

    def accumulate(self, start: int, end: int, grad_logits: torch.Tensor) -> None:
        """Fold one chunk's d loss / d logits into every requested gradient."""
        h = self.hidden[start:end].to(self.dtype)
        grad_b_chunk = None
        if self.lora_a is not None and (self.need_hidden or self.need_lora):
            grad_b_chunk = grad_logits @ self.lora_b  # [c, r]
        if self.need_hidden:
            out = self.grad_hidden[start:end]
            if self.quantized:
                out.copy_(self.grad_hidden_quantized(grad_logits))
            elif out.dtype == self.dtype:
                torch.mm(grad_logits, self.weight, out=out)  # straight into place: no [c, H] temporary
            else:
                out.copy_(grad_logits @ self.weight)
            if grad_b_chunk is not None:
                out.add_((grad_b_chunk @ self.lora_a).to(out.dtype), alpha=self.lora_scale)
        if self.need_weight:
            self.grad_weight.addmm_(grad_logits.t(), h)
        if self.need_bias:
            self.grad_bias += grad_logits.sum(0, dtype=self.grad_bias.dtype)
        if self.need_lora:
            # dB's chunk [V, r] in the compute dtype (fp32 accumulation inside the matmul), then added
            # to the fp32 sum: casting grad_logits [c, V] to fp32 first would write and read 2x the
            # chunk's logits again (512 MB a chunk at Gemma 4's vocabulary) for a [V, r] result
            self.grad_b.add_(torch.mm(grad_logits.t(), self.hidden_a[start:end]), alpha=self.lora_scale)
            self.grad_a.addmm_(grad_b_chunk.t().to(self.grad_a.dtype), h.to(self.grad_a.dtype), alpha=self.lora_scale)

    def grad_hidden_quantized(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """d logits · W summed over the head's slices in fp32 (fp64 stays fp64): a sum of 16-odd
        partial products rounded to bf16 one by one would lose what one matmul keeps."""
        acc_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        acc = torch.zeros(grad_logits.shape[0], self.weight.shape[1], dtype=acc_dtype, device=grad_logits.device)
        partial = None if self.dtype == acc_dtype else torch.empty_like(acc, dtype=self.dtype)
        for v0, v1, rows in self.slices():
            if partial is None:
                acc.addmm_(grad_logits[:, v0:v1], rows)
            else:
                acc.add_(torch.mm(grad_logits[:, v0:v1], rows, out=partial))
        return acc

    def gradients(self, bias, lora_a, lora_b):
        """(grad_hidden, grad_weight, grad_bias, grad_A, grad_B), each None when not asked for,
        in the dtype of the tensor it belongs to."""
        return (
            self.grad_hidden,
            self.grad_weight,
            self.grad_bias.to(bias.dtype) if self.need_bias else None,
            self.grad_a.to(lora_a.dtype) if self.need_lora else None,
            self.grad_b.to(lora_b.dtype) if self.need_lora else None,
        )


def vocab_major_shape(n_tokens: int, vocab: int, cols: int, dtype: torch.dtype, chunk: int) -> tuple[int, int]:
    """(tokens, head rows) of one block of a quantized head's vocabulary-major pass.

    The block's logits hold no more values than a token-major chunk's (``chunk`` x ``vocab``), so the
    plan's loss budget means the same; its rows are one dequantized slice at most (``slice_rows``).
    As many tokens as leave a full slice: usually all of a micro-batch's, so the head is dequantized once."""
    cells = max(1, chunk) * vocab
    widest = min(slice_rows(cols, dtype), vocab)
    tokens = max(1, min(n_tokens, cells // widest))
    rows = max(1, min(widest, cells // tokens))
    if rows >= 256:
        rows -= rows % 128
    return tokens, rows


class _VocabMajorHead:
    """A frozen int8 head's pass, walked by vocabulary slices outside and token blocks inside out.

    The token-major pass dequantizes every slice of the head twice per chunk of tokens (for the
    logits, then for grad_hidden): 16 chunks of 2,048 tokens meant 32 dequantizations of the whole
    head and ~640 small matmuls. Here each slice is dequantized once per block of tokens, usually
    once in all: its logits are folded into each row's running logsumexp (``_online_softmax_slice_kernel``)
    and, turned into exp(z - running max), multiplied straight back by the same rows into an fp32
    sum that is rescaled whenever a row's max moves, as flash attention rescales its output. At the
    end grad_hidden = scale * (sum / exp-sum - dz/dlogit[target] * W[target])."""

    def __init__(self, hidden, weight: Int8Rows, labels, bias, ignore_index, softcap, chunk, grad_scale, need_hidden):
        self.dtype = weight.dtype
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        self.losses = torch.zeros(n_tokens, dtype=acc, device=hidden.device)
        grads = grad_scale is not None and need_hidden
        self.grad_hidden = torch.empty_like(hidden) if grads else None
        block, rows = vocab_major_shape(n_tokens, vocab, weight.shape[1], self.dtype, chunk)
        logits = torch.empty(block * rows, dtype=self.dtype, device=hidden.device)
        dequantized = torch.empty(rows, weight.shape[1], dtype=self.dtype, device=hidden.device)
        for t0 in range(0, n_tokens, block):
            t1 = min(t0 + block, n_tokens)
            n, h, y = t1 - t0, hidden[t0:t1].to(self.dtype), labels[t0:t1]
            run_max = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
            run_sum, target = torch.zeros(n, dtype=acc, device=hidden.device), torch.zeros(n, dtype=acc, device=hidden.device)
            alpha = torch.empty(n, dtype=acc, device=hidden.device)
            summed = torch.zeros(n, weight.shape[1], dtype=acc, device=hidden.device) if grads else None
            for v0 in range(0, vocab, rows):
                v1 = min(v0 + rows, vocab)
                w = weight.dequantize(v0, v1, out=dequantized[: v1 - v0])
                z = torch.mm(h, w.t(), out=logits[: n * (v1 - v0)].view(n, v1 - v0))
                if bias is not None:
                    z.add_(bias[v0:v1].to(self.dtype))
                _launch_slice(z, y, v0, run_max, run_sum, target, alpha, softcap, write_p=grads)
                if grads:
                    summed.mul_(alpha.unsqueeze(1))
                    summed.add_(z @ w)  # exp(z - max) * dz/dlogits, times the slice's rows
            ignored = y == ignore_index
            self.losses[t0:t1] = torch.where(ignored, 0.0, run_max + run_sum.log() - target)
            if grads:  # in place over the fp32 sum: the only [tokens, hidden] temporary is the targets' rows
                slope = 1.0 - (target / softcap) ** 2 if softcap else torch.ones_like(target)
                wanted = weight.lookup(torch.where(ignored, 0, y))
                grad = summed.div_(run_sum.unsqueeze(1)).addcmul_(wanted, slope.unsqueeze(1), value=-1.0)
                scale = grad_scale[t0:t1] if grad_scale.dim() else grad_scale.expand(n)
                grad.mul_((scale.to(acc) * ~ignored).unsqueeze(1))  # ignored rows: no gradient
                self.grad_hidden[t0:t1].copy_(grad)

    def gradients(self, bias, lora_a, lora_b):
        return self.grad_hidden, None, None, None, None


def _vocab_major_applies(weight, lora, need) -> bool:
    """A frozen int8 head with nothing but the hidden states to differentiate (the trainer's head)."""
    return isinstance(weight, Int8Rows) and lora is None and not need[1] and not need[2] and not need[3]


def _chunked_pass(hidden, weight, labels, bias, lora, ignore_index, softcap, chunk_size, grad_scale, need,
                  vocab_major: bool = True):
    """Per-token losses, and (when ``grad_scale`` is given) the gradients the fused pass produces.

    ``grad_scale`` is a device tensor, scalar or one per token, so no host sync is needed to
    know the reduction's scale.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    if vocab_major and _vocab_major_applies(weight, lora, need):
        chunk = chunk_size or default_chunk_size(n_tokens, vocab, weight.dtype)
        head = _VocabMajorHead(hidden, weight, labels, bias, ignore_index, softcap, chunk, grad_scale, need[0])
        return head.losses, head
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    losses = torch.zeros(n_tokens, dtype=acc, device=hidden.device)
    head = _ChunkedHead(hidden, weight, bias, lora, need if grad_scale is not None else (False,) * 4)
    chunk = chunk_size or default_chunk_size(n_tokens, vocab, weight.dtype, trainable_head=head.need_weight)
    buffer = torch.empty(min(chunk, n_tokens), vocab, dtype=weight.dtype, device=hidden.device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        logits = head.logits(start, end, buffer[: end - start])
        scale = None
        if grad_scale is not None:
            scale = grad_scale[start:end] if grad_scale.dim() else grad_scale
        _launch_rows(logits, labels[start:end], losses[start:end], scale, ignore_index, softcap)
        if grad_scale is not None:
            head.accumulate(start, end, logits)
    return losses, head


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused LM head + cross-entropy. Inputs are already flattened: hidden [N, H], labels [N].
    ``weight`` is a tensor or a frozen ``Int8Rows`` (not a tensor: autograd gives it no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, lora_a, lora_b, lora_scale, ignore_index, softcap, reduction,
                chunk_size, vocab_major=True):
        lora = (lora_a, lora_b, lora_scale) if lora_a is not None else None
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3],
            lora is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]),
        )
        n_targets = (labels != ignore_index).sum()
        ctx.reduction = reduction
        ctx.mark_non_differentiable(n_targets)
        if reduction == "none" or not any(need):
            # The per-token grad_output is known only in backward: compute the losses now and the
            # gradients then, in a second chunked pass. (With nothing to differentiate, only losses.)
            losses, _ = _chunked_pass(hidden, weight, labels, bias, lora, ignore_index, softcap, chunk_size, None, need,
                                      vocab_major)
            if reduction != "none":
                total = losses.sum()
                return (total / n_targets.clamp(min=1) if reduction == "mean" else total), n_targets
            quantized = isinstance(weight, Int8Rows)
            ctx.save_for_backward(hidden, labels, bias, lora_a, lora_b, *(() if quantized else (weight,)))
            ctx.quantized_head = weight if quantized else None
            ctx.args = (lora_scale, ignore_index, softcap, chunk_size, need, vocab_major)
            return losses, n_targets
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if reduction == "mean":
            grad_scale = 1.0 / n_targets.clamp(min=1).to(acc)
        else:
            grad_scale = torch.ones((), dtype=acc, device=hidden.device)
        losses, head = _chunked_pass(hidden, weight, labels, bias, lora, ignore_index, softcap, chunk_size,
                                     grad_scale, need, vocab_major)
        loss = losses.sum() * grad_scale if reduction == "mean" else losses.sum()
        ctx.grads = head.gradients(bias, lora_a, lora_b)
        return loss, n_targets

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        if ctx.reduction == "none":
            hidden, labels, bias, lora_a, lora_b, *weight = ctx.saved_tensors
            weight = ctx.quantized_head if ctx.quantized_head is not None else weight[0]
            lora_scale, ignore_index, softcap, chunk_size, need, vocab_major = ctx.args
            lora = (lora_a, lora_b, lora_scale) if lora_a is not None else None
            _, head = _chunked_pass(hidden, weight, labels, bias, lora, ignore_index, softcap, chunk_size,
                                    grad_loss.contiguous(), need, vocab_major)
            grads = head.gradients(bias, lora_a, lora_b)
        else:
            # Always scaled by grad_output, never first asked whether it is 1: asking is a host
            # sync (the trainer's is 1/target tokens anyway), which a CUDA graph may not hold.
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        grad_hidden, grad_weight, grad_bias, grad_a, grad_b = grads
        return grad_hidden, grad_weight, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | Int8Rows,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    vocab_major: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` (+ bias, + LoRA, softcapped) against ``labels``.

    Returns (loss, n_target_tokens). ``reduction="sum"`` lets a trainer divide by the target
    count of a whole accumulated batch. ``weight`` may be a frozen ``Int8Rows`` head, computed in
    its ``dtype``; where only the hidden states want a gradient it is walked vocabulary-major
    (``_VocabMajorHead``) unless ``vocab_major`` is False. Triton on CUDA tensors, the reference elsewhere.
    """
    _check(hidden, weight, labels, reduction, lora)
    if not use_triton(hidden):
        return linear_cross_entropy_reference(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                              softcap=softcap, reduction=reduction, chunk_size=chunk_size, lora=lora)
    lora_a, lora_b, lora_scale = lora if lora is not None else (None, None, 0.0)
    loss, n_targets = LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight if isinstance(weight, Int8Rows) else weight.contiguous(),
        labels.reshape(-1).contiguous(),
        bias, lora_a, lora_b, float(lora_scale), ignore_index, softcap, reduction, chunk_size, vocab_major,
    )
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss, n_targets


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor | Int8Rows,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path, as transformers runs it: full logits in the compute dtype, upcast to fp32
    (fp64 stays fp64), softcap, F.cross_entropy. ``chunk_size`` is accepted and ignored.
    A mean over zero target tokens is 0, not NaN. An ``Int8Rows`` head is dequantized whole first."""
    _check(hidden, weight, labels, reduction, lora)
    if isinstance(weight, Int8Rows):
        weight = weight.dequantize()
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    y = labels.reshape(-1)
    logits = h @ weight.t()
    if lora is not None:
        lora_a, lora_b, lora_scale = lora
        logits = logits + lora_scale * ((h @ lora_a.to(weight.dtype).t()) @ lora_b.to(weight.dtype).t())
    if bias is not None:
        logits = logits + bias.to(weight.dtype)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")
    n_targets = (y != ignore_index).sum()
    if reduction == "none":
        return losses.reshape(labels.shape), n_targets
    total = losses.sum()
    if reduction == "mean":
        total = total / n_targets.clamp(min=1)
    return total, n_targets
