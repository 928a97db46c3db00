"""Optimizer states of the trainable (LoRA) parameters."""

from __future__ import annotations

import math

from vramplan.errors import VramplanError
from vramplan.memory.adapters import PAGED_MIN_NUMEL

_STATE_BYTES = {
    "adamw": 8,  # exp_avg and exp_avg_sq in fp32
    "adamw8bit": 2,  # both moments blockwise-quantized to 8 bits (bitsandbytes), block absmax negligible
    "paged_adamw8bit": 2,  # the same states in CUDA managed memory (see managed_state_bytes)
}

#: Optimizers whose moments bitsandbytes allocates with cudaMallocManaged (``get_paged``).
PAGED = ("paged_adamw8bit",)
#: Optimizers bitsandbytes' 8-bit kernels step.
BITSANDBYTES_8BIT = ("adamw8bit", "paged_adamw8bit")

#: The fused 8-bit AdamW on FSDP2 shards (``vramplan.train.optim.FusedShardedAdamW8bit``), priced
#: with its absmax: per moment one uint8 code a value and one fp32 absmax per 256 values.
FUSED_8BIT = "fused_adamw8bit"
ABSMAX_BLOCK = 256


def optimizer_state_bytes(trainable: int, optimizer: str, master_weights: bool = False) -> int:
    """AdamW moments per trainable parameter, plus a 4-byte fp32 master copy when params are 16-bit.

    Master weights apply when the trainer keeps LoRA params in bf16 but updates an fp32
    copy (vramplan's ``lora_dtype=bf16``); PEFT keeps fp32 adapters, so none there.
    """
    if optimizer == FUSED_8BIT:  # fp32 adapters only: no master copy
        return 2 * (trainable + 4 * -(-trainable // ABSMAX_BLOCK))
    if optimizer not in _STATE_BYTES:
        raise VramplanError(f"unknown optimizer '{optimizer}'; choose one of {', '.join(_STATE_BYTES)}")
    return trainable * (_STATE_BYTES[optimizer] + (4 if master_weights else 0))


def managed_state_bytes(paged: int, optimizer: str) -> int:
    """The part of ``optimizer_state_bytes`` a paged optimizer keeps in CUDA managed memory, outside the GPU
    peak: the states of the ``paged`` parameters (``memory.adapters.paged_params``: bitsandbytes pages only
    tensors of 100,000 elements and more; the smaller ones' states are ordinary device tensors).

    bitsandbytes' paged optimizers allocate their moments with cudaMallocManaged: never from
    torch's caching allocator, and the driver moves the pages to host memory under pressure
    instead of failing, so they cannot make a step run out of memory. Without pressure the driver keeps
    them on the GPU, and NVML counts them there in 128 MiB chunks (``resident_paged_state_bytes``,
    priced as its own component beyond the first chunk). An fp32 master copy
    (``master_weights``) is the trainer's own tensor and stays resident.
    """
    return paged * _STATE_BYTES[optimizer] if optimizer in PAGED else 0


#: NVML counts a paged optimizer's states on the GPU in whole 128 MiB chunks: every process that pages maps
#: ceil(states / 128 MiB) of them, the first of which ``overhead.MANAGED_FIRST_ALLOCATION_BYTES`` prices. Read off the
#: driver's own readings (NVML's used memory less torch's reserved pool, before and after the first step) of session
#: 12's rank sweep and eager fitting runs: 10 of 13 grew by their regime's constant plus exactly that many chunks (the
#: other 3 started on a baseline holding a previous process's chunk, and read one less). The planner until session 21
#: took them as none up to 0.22 GB and every byte beyond, fitted on NVML less torch's *peak* reserved, which the
#: captured slack of those runs (released after the capture) had lowered; with compact captures the peak is the pool
#: at the end, and the chunks show (Qwen3-1.7B at rank 128, 0.28 GB of states: 0.40 GB of chunks).
MANAGED_CHUNK_BYTES = 128 * 2**20


def resident_paged_state_bytes(managed: int) -> int:
    """The part of the managed (paged) states NVML counts in the process once the driver has moved them to the GPU:
    without memory pressure the driver keeps them there, so they hold GPU memory a long run has to leave free."""
    if not managed:
        return 0
    return (math.ceil(managed / MANAGED_CHUNK_BYTES) - 1) * MANAGED_CHUNK_BYTES  # the first is in the libraries


def managed_state_note(managed: int, optimizer: str = "") -> tuple[str, ...]:
    """What an estimate says about states it leaves out of the peak; for a paged optimizer that pages
    nothing (every adapter under bitsandbytes' paging size), that its states stay on the GPU."""
    if not managed:
        return (f"{optimizer} pages none of these adapters' states (bitsandbytes pages parameters of "
                f"{PAGED_MIN_NUMEL:,} elements and more): they are priced on the GPU",) if optimizer in PAGED else ()
    resident = resident_paged_state_bytes(managed)
    return (f"paged optimizer states: {managed / 1e9:.2f} GB in CUDA managed memory, outside torch's pool "
            "(the driver pages them to host memory under pressure)"
            + (f"; {resident / 1e9:.2f} GB of them counted on the GPU, where the driver keeps them without pressure"
               if resident else ""),)
