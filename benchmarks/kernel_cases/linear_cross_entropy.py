"""Fused LM head + cross-entropy (forward and backward) against the paths a trainer would otherwise take.

Shapes are (tokens, hidden, vocab) of real heads at 8,192 tokens, where the unfused logits set the
peak. The head is frozen (a LoRA run's LM head, often tied to the embedding) except in the
"trainable head" case (grad_W too) and the "LoRA head" case (a rank-16 adapter on the frozen head,
fp32 as the trainer keeps adapters; only the unfused path has that op). Variants: vramplan's chunked
kernel, the unfused path transformers runs (bf16 logits -> float -> F.cross_entropy), Liger's fused
linear cross-entropy when installed, and torch.compile of the same chunked algorithm in plain
PyTorch, at vramplan's chunk size. With a trainable head vramplan's chunks are 4x larger (each
chunk reads and writes all of grad_W); "vramplan chunk N" times smaller chunks beside it, and a frozen head's
2x and 4x larger ones (what the trainer's 128 MB logits budget costs in time). The
"int8 head" case is the trainer's ``head_quant="int8"`` (frozen ``Int8Rows``): the vocabulary-major
pass (the default) against the token-major one it replaced, the bf16 head's chunked pass and the
unfused path on the dequantized head.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.harness import Case
from vramplan_kernels.int8_rows import Int8Rows
from vramplan_kernels.linear_cross_entropy import (
    TRAINABLE_HEAD_CHUNK_FACTOR,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

SHAPES = {
    "gemma-4-e2b": (8192, 1536, 262144),
    "gemma-4-e4b": (8192, 2560, 262144),
    "llama-3.1-8b": (8192, 4096, 128256),
}


LORA_RANK = 16


def _forward_backward(loss_fn: Callable, hidden, weight, labels, lora=None) -> Callable[[], object]:
    inputs = [hidden, weight] if weight.requires_grad else [hidden]
    if lora is not None:
        inputs += list(lora[:2])

    def run():
        loss = loss_fn(hidden, weight, labels)
        return torch.autograd.grad(loss, inputs)

    return run


def _liger_loss() -> Callable | None:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    module = LigerFusedLinearCrossEntropyLoss()

    def loss(hidden, weight, labels):
        out = module(weight, hidden, labels)
        if isinstance(out, tuple):
            out = out[0]
        return getattr(out, "loss", out)

    return loss


def compiled_chunked_reference(chunk_size: int) -> Callable:
    """The chunked algorithm in plain PyTorch under torch.compile: per chunk, logits in fp32,
    loss and d loss / d logits in one fused graph, then the matmuls back. Returns a function
    (hidden, weight, labels) -> (loss, grad_hidden, grad_weight or None), mean over targets."""

    @torch.compile(dynamic=False)
    def chunk_step(h, w, y, scale):
        logits = (h @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != -100
        safe_y = torch.where(valid, y, 0)
        target = logits.gather(1, safe_y[:, None]).squeeze(1)
        loss = torch.where(valid, lse - target, 0.0).sum()
        probs = torch.exp(logits - lse[:, None])
        onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == safe_y[:, None]
        grad = torch.where(onehot, probs - 1.0, probs) * (valid.float() * scale)[:, None]
        return loss, grad.to(h.dtype)

    def run(hidden, weight, labels):
        n_targets = (labels != -100).sum()
        scale = 1.0 / n_targets.clamp(min=1).float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
            loss, grad_logits = chunk_step(h, weight.detach(), y, scale)
            total += loss
            torch.mm(grad_logits, weight.detach(), out=grad_hidden[start:start + chunk_size])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
        return total * scale, grad_hidden, grad_weight

    return run


def _case(name: str, tokens: int, hidden_size: int, vocab: int, device: str, trainable: bool,
          with_compiled: bool, lora_head: bool = False) -> Case:
    dtype = torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * 0.02)
    weight.requires_grad_(trainable)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    labels[::7] = -100  # some prompt tokens carry no loss, as in a real batch
    lora = None
    if lora_head:
        a = torch.randn(LORA_RANK, hidden_size, device=device, generator=generator) * 0.02
        b = torch.randn(vocab, LORA_RANK, device=device, generator=generator) * 0.02
        lora = (a.requires_grad_(), b.requires_grad_(), 2.0)

    def ours(chunk_size=None):
        return _forward_backward(lambda h, w, y: linear_cross_entropy(h, w, y, lora=lora, chunk_size=chunk_size)[0],
                                 hidden, weight, labels, lora)

    variants = {
        "vramplan": ours(),
        "unfused": _forward_backward(lambda h, w, y: linear_cross_entropy_reference(h, w, y, lora=lora)[0],
                                     hidden, weight, labels, lora),
    }
    chunk = default_chunk_size(tokens, vocab, dtype, trainable_head=trainable)
    if trainable:  # the smaller chunks vramplan used before, beside its default
        frozen_chunk = default_chunk_size(tokens, vocab, dtype)
        for smaller in sorted({frozen_chunk, frozen_chunk * TRAINABLE_HEAD_CHUNK_FACTOR // 2} - {chunk}):
            variants[f"vramplan chunk {smaller}"] = ours(smaller)
    elif not lora_head:  # larger chunks than the frozen head's memory budget, to see what the budget costs in time
        for larger in (2 * chunk, 4 * chunk):
            variants[f"vramplan chunk {larger}"] = ours(larger)
    if not lora_head:
        liger = _liger_loss()
        if liger is not None:
            variants["liger"] = _forward_backward(liger, hidden, weight, labels)
        if with_compiled:
            compiled = compiled_chunked_reference(chunk)
            variants["torch.compile chunked"] = lambda: compiled(hidden.detach(), weight, labels)
    matmuls = 3 if trainable else 2
    suffix = " trainable head" if trainable else f" LoRA head r{LORA_RANK}" if lora_head else ""
    return Case(
        op="linear_cross_entropy",
        shape=f"{name} N={tokens} H={hidden_size} V={vocab}" + suffix,
        variants=variants,
        flops=2 * matmuls * tokens * hidden_size * vocab,
        measure_peak_memory=True,
        notes="forward+backward, bf16, mean over target tokens; peak is memory above the inputs",
        extra={"trainable_head": trainable, "lora_head": lora_head, "chunk_tokens": chunk},
    )


def _int8_case(name: str, tokens: int, hidden_size: int, vocab: int, device: str) -> Case:
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
    weight = torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16, generator=generator) * 0.02
    rows = Int8Rows.quantize(weight)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    labels[::7] = -100

    def ours(head, **options):
        return lambda: torch.autograd.grad(linear_cross_entropy(hidden, head, labels, **options)[0], [hidden])

    return Case(
        op="linear_cross_entropy",
        shape=f"{name} N={tokens} H={hidden_size} V={vocab} int8 head",
        variants={"vramplan": ours(rows), "vramplan token-major": ours(rows, vocab_major=False),
                  "unfused": lambda: torch.autograd.grad(linear_cross_entropy_reference(hidden, rows, labels)[0], [hidden]),
                  "vramplan bf16 head": ours(weight)},
        flops=2 * 2 * tokens * hidden_size * vocab,
        measure_peak_memory=True,
        notes="forward+backward, bf16, frozen int8 rows (one scale each); the bf16 head's pass for scale",
        extra={"trainable_head": False, "lora_head": False, "int8_head": True,
               "chunk_tokens": default_chunk_size(tokens, vocab, torch.bfloat16)},
    )


#: The int8 head where the trainer meets it: Llama-3.2-1B's micro-batch of 2,048 tokens (its lean plan).
INT8_SHAPES = {"llama-3.2-1b": (2048, 2048, 128256)}


def cases(device: str, shapes: dict[str, tuple[int, int, int]] | None = None, with_compiled: bool = True,
          int8_shapes: dict[str, tuple[int, int, int]] | None = None) -> list[Case]:
    shapes = SHAPES if shapes is None else shapes
    out = [_case(name, *shape, device, trainable=False, with_compiled=with_compiled) for name, shape in shapes.items()]
    first = next(iter(shapes))
    out.append(_case(first, *shapes[first], device, trainable=True, with_compiled=with_compiled))
    out.append(_case(first, *shapes[first], device, trainable=False, with_compiled=False, lora_head=True))
    out += [_int8_case(name, *shape, device) for name, shape in (INT8_SHAPES if int8_shapes is None else int8_shapes).items()]
    return out
