"""Every kernel the trainer calls, imported through this one module.

The real ops live in ``vramplan_kernels`` (Triton, with PyTorch references on the CPU). Until
they are merged, this file holds small pure-PyTorch stand-ins with exactly their signatures,
so the trainer can be written and tested against the interface; at merge the stand-ins are
replaced by imports and nothing else in ``vramplan.train`` changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class NF4Tensor:
    """A weight in NF4: packed 4-bit codes plus per-block absmax (itself 8-bit with double quant)."""

    packed: torch.Tensor
    quant_state: Any  # bitsandbytes QuantState: absmax, code, nested state
    shape: torch.Size
    dtype: torch.dtype

    @property
    def absmax(self) -> torch.Tensor:
        return self.quant_state.absmax

    def nbytes(self) -> int:
        state = self.quant_state
        total = self.packed.numel() * self.packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if getattr(state, "nested", False):
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return total


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return NF4Tensor(packed=packed, quant_state=state, shape=weight.shape, dtype=weight.dtype)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(q.packed, q.quant_state)
    return weight.to(dtype or q.dtype)


class QLoRALinear(nn.Module):
    """A frozen (NF4 or bf16) linear plus a trainable low-rank update: y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ + b."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, lora_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=lora_dtype)
        # PEFT's init: A Kaiming-uniform, B zero, so the adapted model starts equal to the base
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.weight_nf4: NF4Tensor | None = None
        self.register_buffer("weight", None)
        self.register_buffer("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, quant: str = "nf4", double_quant: bool = True,
                    lora_dtype: torch.dtype = torch.float32) -> "QLoRALinear":
        module = cls(linear.in_features, linear.out_features, rank, alpha, lora_dtype, device=linear.weight.device)
        weight = linear.weight.detach()
        if quant == "nf4":
            module.weight_nf4 = quantize_nf4(weight, double_quant=double_quant)
        else:
            module.weight = weight.clone()
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_nf4 is not None:
            return dequantize_nf4(self.weight_nf4, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        lora_in = x.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(lora_in)) * self.scale).to(x.dtype)


def _chunk_loss(hidden, weight, bias, labels, ignore_index, softcap):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None, reduction="mean",
                         chunk_size=None, lora=None):
    """LM head + cross-entropy in chunks of tokens, so the full fp32 logits never exist.

    Each chunk is checkpointed: its logits are recomputed in backward instead of kept.
    Returns ``(loss, n_target_tokens)``.
    """
    if lora is not None:
        raise NotImplementedError("the stand-in has no LoRA on the LM head")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    n_targets = (flat_labels != ignore_index).sum()
    chunk = chunk_size or 1024
    losses = [
        checkpoint(_chunk_loss, flat_hidden[i:i + chunk], weight, bias, flat_labels[i:i + chunk], ignore_index, softcap,
                   use_reentrant=False)
        for i in range(0, flat_hidden.shape[0], chunk)
    ]
    per_token = torch.cat(losses) if losses else flat_hidden.new_zeros(0, dtype=torch.float32)
    if reduction == "none":
        return per_token.reshape(labels.shape), n_targets
    total = per_token.sum()
    if reduction == "sum":
        return total, n_targets
    return total / n_targets.clamp(min=1), n_targets
