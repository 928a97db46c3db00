"""Optimizer states of the trainable (LoRA) parameters."""

from __future__ import annotations

from vramplan.errors import VramplanError

_STATE_BYTES = {
    "adamw": 8,  # exp_avg and exp_avg_sq in fp32
    "adamw8bit": 2,  # both moments blockwise-quantized to 8 bits (bitsandbytes), block absmax negligible
    "paged_adamw8bit": 2,  # the same states in unified memory; counted as resident (pages out only under pressure)
}


def optimizer_state_bytes(trainable: int, optimizer: str, master_weights: bool = False) -> int:
    """AdamW moments per trainable parameter, plus a 4-byte fp32 master copy when params are 16-bit.

    Master weights apply when the trainer keeps LoRA params in bf16 but updates an fp32
    copy (vramplan's ``lora_dtype=bf16``); PEFT keeps fp32 adapters, so none there.
    """
    if optimizer not in _STATE_BYTES:
        raise VramplanError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(_STATE_BYTES)}")
    return trainable * (_STATE_BYTES[optimizer] + (4 if master_weights else 0))
