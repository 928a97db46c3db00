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


#: One fp32 chunk of logits is kept under this size: small enough to vanish beside the
#: weights, large enough (≥16 rows) that the LM-head matmul stays efficient.
CHUNK_BUDGET_BYTES = 64 * 2**20


def loss_chunk_tokens(tokens: int, vocab: int) -> int:
    """Rows per chunk of the chunked linear cross-entropy: a power of two, 16 to 4096, ≤ the tokens."""
    chunk = 4096
    while chunk > 16 and chunk * vocab * FP32 > CHUNK_BUDGET_BYTES:
        chunk //= 2
    return max(1, min(chunk, tokens))


def chunked_logits_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """Chunked linear cross-entropy (Liger's fused linear CE, Apple's cut cross-entropy).

    Never builds the b·s·V logits: a chunk of rows is multiplied by the LM head (bf16
    output), softmaxed in fp32 and turned into its gradient in place, and the hidden
    states' gradient (fp32, b·s·h) is accumulated as chunks go by.
    """
    chunk = loss_chunk_tokens(tokens, vocab)
    return chunk * vocab * (2 + FP32) + tokens * hidden * FP32
