"""LoRA adapters: their parameters and gradients, the only trainable state."""

from __future__ import annotations

from vramplan.plan import EXPERT_TARGETS


def lora_param_count(arch, rank: int, targets: tuple[str, ...]) -> int:
    """r·(d_in + d_out) for every targeted linear of every layer (A is r×d_in, B is d_out×r).

    Expert weights of MoE layers are fused 3-D tensors in transformers 5, not nn.Linear,
    so PEFT's module-name targets do not reach them; shared experts' linears they do. The
    experts' own matrices are adapted only when named (``EXPERT_TARGETS``): ``expert_lora_param_count``.
    """
    wanted = set(targets)
    linears = sum(rank * (lin.d_in + lin.d_out) for layer in arch.layers for lin in layer.linears if lin.name in wanted)
    return linears + expert_lora_param_count(arch, rank, targets)


def expert_lora_param_count(arch, rank: int, targets: tuple[str, ...]) -> int:
    """One LoRA pair per routed expert and targeted fused matrix: gate_up [2I, H] takes r·(H + 2I),
    down [H, I] takes r·(I + H) (PEFT's ``lora_A`` [E·r, in] and ``lora_B`` [out, r·E])."""
    gate_up, down = EXPERT_TARGETS
    h = arch.hidden_size
    total = 0
    for layer in arch.layers:
        if layer.experts and layer.expert_params:
            inter = layer.expert_intermediate
            total += layer.experts * rank * ((h + 2 * inter) * (gate_up in targets) + (inter + h) * (down in targets))
    return total


def lora_param_bytes(trainable: int, dtype_bytes: int) -> int:
    """The adapter weights themselves (fp32 by PEFT's default, or bf16)."""
    return trainable * dtype_bytes


def lora_grad_bytes(trainable: int, dtype_bytes: int) -> int:
    """One gradient per adapter weight, in the weight's dtype; freed by zero_grad(set_to_none)."""
    return trainable * dtype_bytes
