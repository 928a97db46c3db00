"""LoRA adapters: their parameters and gradients, the only trainable state."""

from __future__ import annotations


def lora_param_count(arch, rank: int, targets: tuple[str, ...]) -> int:
    """r·(d_in + d_out) for every targeted linear of every layer (A is r×d_in, B is d_out×r).

    Expert weights of MoE layers are fused 3-D tensors in transformers 5, not nn.Linear,
    so PEFT's module-name targets do not reach them; shared experts' linears they do.
    """
    wanted = set(targets)
    return sum(rank * (lin.d_in + lin.d_out) for layer in arch.layers for lin in layer.linears if lin.name in wanted)


def lora_param_bytes(trainable: int, dtype_bytes: int) -> int:
    """The adapter weights themselves (fp32 by PEFT's default, or bf16)."""
    return trainable * dtype_bytes


def lora_grad_bytes(trainable: int, dtype_bytes: int) -> int:
    """One gradient per adapter weight, in the weight's dtype; freed by zero_grad(set_to_none)."""
    return trainable * dtype_bytes
