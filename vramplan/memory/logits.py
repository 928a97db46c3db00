"""Logits and the loss: b·s·V values, the largest tensors of a step on a big vocabulary."""

from __future__ import annotations

FP32 = 4


def full_logits_peak_bytes(tokens: int, vocab: int, logits_bytes: int, softcap: bool) -> int:
    """The loss computed on materialised logits (transformers' ``ForCausalLMLoss``), at its peak.

    The peak is the backward of ``cross_entropy``: the logits the model returned (the
    output object holds them through backward), tanh's saved output when the model soft-caps
    (Gemma: divide, tanh, multiply, each full size; tanh's result is saved), the fp32
    log-softmax saved by ``cross_entropy``, its gradient, and the fp32 gradient of the logits.
    ``logits.float()`` is a copy only when the logits are 16-bit, and it is freed once
    log-softmax has run, so it does not reach this peak.
    """
    one = tokens * vocab
    held = one * logits_bytes
    capped = one * logits_bytes if softcap else 0
    return held + capped + 3 * one * FP32


def full_logits_forward_bytes(tokens: int, vocab: int, logits_bytes: int, softcap: bool) -> int:
    """The same loss during the forward: logits, tanh's output, the fp32 upcast (16-bit logits only), the log-softmax."""
    one = tokens * vocab
    upcast = one * FP32 if logits_bytes < FP32 else 0
    return one * logits_bytes * (2 if softcap else 1) + upcast + one * FP32


def held_logits_bytes(tokens: int, vocab: int, logits_bytes: int) -> int:
    """The logits the model's output object keeps alive until the caller drops it (after the optimizer step)."""
    return tokens * vocab * logits_bytes


#: The fused loss keeps one chunk of logits, in the LM head's dtype, under this size; it must
#: equal ``vramplan_kernels.linear_cross_entropy.LOGITS_CHUNK_BYTES`` (a test checks): the planner
#: does not import the kernels (they import torch).
CHUNK_BUDGET_BYTES = 128 * 2**20


def loss_chunk_tokens(tokens: int, vocab: int, logits_bytes: int = 2, budget: int | None = None) -> int:
    """Rows per chunk, as the kernel picks them: as many as fit ``budget`` (default CHUNK_BUDGET_BYTES;
    a plan's ``loss_chunk_mb``), a multiple of 128 once ≥ 256."""
    chunk = max(1, (budget or CHUNK_BUDGET_BYTES) // (vocab * logits_bytes))
    if chunk >= 256:
        chunk -= chunk % 128
    return max(1, min(chunk, tokens))


#: One dequantized slice of an int8 head's rows; must equal
#: ``vramplan_kernels.int8_rows.DEQUANT_SLICE_BYTES`` (a test checks).
DEQUANT_SLICE_BUDGET_BYTES = 32 * 2**20


def dequant_slice_rows(vocab: int, hidden: int, act_bytes: int = 2) -> int:
    """Rows of an int8 head dequantized at once, as the kernel picks them (``int8_rows.slice_rows``)."""
    rows = max(1, DEQUANT_SLICE_BUDGET_BYTES // (hidden * act_bytes))
    if rows >= 256:
        rows -= rows % 128
    return min(rows, vocab)


def int8_head_block(tokens: int, vocab: int, hidden: int, act_bytes: int = 2, budget: int | None = None) -> tuple[int, int]:
    """(tokens, head rows) of one block of an int8 head's vocabulary-major loss pass, as the kernel
    picks them (``linear_cross_entropy.vocab_major_shape``): no more logits than a token-major chunk
    holds, at most one dequantized slice of rows, and as many tokens as leave a full slice."""
    cells = loss_chunk_tokens(tokens, vocab, act_bytes, budget) * vocab
    widest = dequant_slice_rows(vocab, hidden, act_bytes)
    block = max(1, min(tokens, cells // widest))
    rows = max(1, min(widest, cells // block))
    if rows >= 256:
        rows -= rows % 128
    return block, rows


def chunked_logits_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int = 2, int8_head: bool = False,
                         budget: int | None = None, vocab_major: bool = True) -> int:
    """Chunked linear cross-entropy (kernels/linear_cross_entropy.py; Liger's fused linear CE).

    Never builds the b·s·V logits: one chunk of rows is multiplied by the LM head into a
    reused buffer (the head's dtype), a Triton kernel overwrites it with d loss / d logits
    in place, and that is multiplied into the hidden states' gradient (b·s·h, the hidden
    dtype) before the next chunk. Plus the per-token fp32 losses.

    An int8 head (``head_quant="int8"``) is walked vocabulary-major instead (``int8_head_block``): one
    block of logits [block tokens, rows], one dequantized slice of rows, and per block grad_hidden
    summed in fp32 beside each slice's product in the compute dtype. Token-major (``vocab_major``
    off) it adds the slice and, per chunk, the same fp32 sum and product to the chunk's logits.
    """
    if int8_head and vocab_major:
        block, rows = int8_head_block(tokens, vocab, hidden, act_bytes, budget)
        return (block * rows * act_bytes + rows * hidden * act_bytes + block * hidden * (FP32 + act_bytes)
                + tokens * hidden * act_bytes + tokens * FP32)
    chunk = loss_chunk_tokens(tokens, vocab, act_bytes, budget)
    total = chunk * vocab * act_bytes + tokens * hidden * act_bytes + tokens * FP32
    if int8_head:
        total += dequant_slice_rows(vocab, hidden, act_bytes) * hidden * act_bytes + chunk * hidden * (FP32 + act_bytes)
    return total
