"""One rank's share of a stack's step memory when the plan spans several GPUs (DDP or FSDP2).

The stack (vramplan's trainer or the hf recipe) says what a single GPU holds in each phase;
this module says what each of the ``plan.gpus`` ranks holds instead. Every rank is its own
process on its own GPU, so a rank carries exactly one CUDA context and one set of library
workspaces (``estimate_plan`` adds those as for one GPU). The bytes themselves come from
:mod:`vramplan.memory.distributed`.

Components a multi-GPU estimate adds or renames (per rank):

- ``sharded_weights`` (FSDP2): every frozen weight (NF4 packed bytes with absmax and quant
  state, norms, embedding, LM head) split N ways; it replaces the stack's weight components.
  Absent with CPU offload: the shards live in host memory.
- ``all_gathered_layers`` (FSDP2): unsharded decoder layers in flight (computing, prefetched,
  the all-gather staging buffer) in forward and backward.
- ``all_gathered_head`` (FSDP2): the unsharded LM head (or embedding) while the loss runs,
  when it outweighs the layers in flight.
- ``grad_reduce_buffers`` (FSDP2): LoRA gradients awaiting their reduce-scatter.
- ``ddp_grad_buckets`` (DDP): the reducer's copy of the LoRA gradients.
- ``nccl_buffers`` (both): the communicator's buffers and library memory.
- ``lora_params``, ``lora_grads``, ``optimizer_states`` keep their names: whole on a DDP rank,
  a 1/N shard on an FSDP2 rank, absent from the GPU with CPU offload.
"""

from __future__ import annotations

import dataclasses

from vramplan.memory.distributed import (
    ddp_bucket_bytes, fsdp_gathered_layer_bytes, fsdp_reduce_scatter_bytes, nccl_buffer_bytes, shard_bytes)
from vramplan.stacks import StepMemory

#: The stacks' names for frozen weights: what FSDP2 shards.
WEIGHT_COMPONENTS = ("weights_quantized", "weights", "embeddings", "norms", "experts", "towers", "per_layer_embeddings")
#: The trainable state: whole per DDP rank, sharded per FSDP2 rank.
TRAINABLE_COMPONENTS = ("lora_params", "lora_grads", "optimizer_states")


def per_rank(arch, plan, step: StepMemory) -> StepMemory:
    """``step`` (one GPU's memory) as one rank of ``plan.gpus`` holds it under ``plan.parallel``."""
    if plan.parallel == "none":
        return step
    notes = [f"memory per rank: each of the {plan.gpus} GPUs runs its own process, with its own CUDA context"
             if plan.gpus > 1 else "FSDP2 on one GPU: its CPU offload keeps the frozen weights in host memory"]
    if plan.parallel == "ddp":
        phases = {name: _ddp_phase(name, parts) for name, parts in step.phases.items()}
    else:
        phases, more = _fsdp_phases(arch, plan, step)
        notes += more
    return dataclasses.replace(step, phases=phases, notes=tuple(step.notes) + tuple(notes))


def _ddp_phase(name: str, parts: dict[str, int]) -> dict[str, int]:
    out = dict(parts)
    if name != "load":
        out["nccl_buffers"] = nccl_buffer_bytes()
    if "lora_grads" in parts:
        out["ddp_grad_buckets"] = ddp_bucket_bytes(parts["lora_grads"])
    return out


_SHARES: dict[tuple[int, tuple[str, ...]], tuple[object, list]] = {}


def _layer_shares(arch, plan) -> list[tuple[float, float, float, float]]:
    """Per decoder layer: its fraction of the decoder linears, experts, norms and LoRA parameters
    (remembered per architecture object: fit prices thousands of plans of one model)."""
    key = (id(arch), tuple(plan.lora_targets))
    cached = _SHARES.get(key)
    if cached is None or cached[0] is not arch:
        if len(_SHARES) > 256:
            _SHARES.clear()
        cached = _SHARES[key] = (arch, _compute_layer_shares(arch, plan.lora_targets))
    return cached[1]


def _compute_layer_shares(arch, targets) -> list[tuple[float, float, float, float]]:
    wanted = set(targets)
    lora = [sum(lin.d_in + lin.d_out for lin in layer.linears if lin.name in wanted) for layer in arch.layers]
    totals = (arch.linear_params or 1, arch.expert_params or 1, arch.norm_params or 1, sum(lora) or 1)
    return [(layer.linear_params / totals[0], layer.expert_params / totals[1], layer.norm_params / totals[2],
             n / totals[3]) for layer, n in zip(arch.layers, lora)]


def unsharded_layer_bytes(arch, plan, weights: dict[str, int], lora_params: int) -> int:
    """The largest decoder layer at full size, as the stack stores it: its share of the stack's
    weight components (so NF4, int8 or bf16 as the plan says) plus its LoRA adapters."""
    linears = weights.get("weights_quantized", weights.get("weights", 0))
    return int(max(lin * linears + exp * weights.get("experts", 0) + norm * weights.get("norms", 0) + ada * lora_params
                   for lin, exp, norm, ada in _layer_shares(arch, plan)))


def largest_layer_lora_fraction(arch, plan) -> float:
    return max(share[3] for share in _layer_shares(arch, plan))


def head_bytes(arch, weights: dict[str, int]) -> int:
    """The unsharded LM head (or the embedding, when larger or tied): all-gathered when used."""
    embedding, head = arch.embedding_params, arch.lm_head_params
    return int(weights.get("embeddings", 0) * max(embedding, head) / max(embedding + head, 1))


def _weight_tensors(arch, plan) -> int:
    """Tensors FSDP2 pads separately: per linear the packed weight and its quant state, per layer its norms."""
    per_linear = 1 if plan.quant == "bf16" else 2
    return sum(len(layer.linears) * per_linear + 2 for layer in arch.layers) + 3


def _fsdp_phases(arch, plan, step: StepMemory) -> tuple[dict[str, dict[str, int]], list[str]]:
    n = plan.gpus
    load = step.phases["load"]
    weights = {k: v for k, v in load.items() if k in WEIGHT_COMPONENTS}
    sharded = shard_bytes(sum(weights.values()), n, _weight_tensors(arch, plan))
    lora_tensors = 2 * sum(1 for layer in arch.layers for lin in layer.linears if lin.name in plan.lora_targets)
    layer = unsharded_layer_bytes(arch, plan, weights, load.get("lora_params", 0))
    head = head_bytes(arch, weights)
    layer_fraction = largest_layer_lora_fraction(arch, plan)
    phases = {}
    for name, parts in step.phases.items():
        out = {k: v for k, v in parts.items() if k not in WEIGHT_COMPONENTS and k not in TRAINABLE_COMPONENTS}
        if not plan.cpu_offload:
            out["sharded_weights"] = sharded
            out.update({k: shard_bytes(v, n, lora_tensors) for k, v in parts.items() if k in TRAINABLE_COMPONENTS})
        if name != "load":
            out["nccl_buffers"] = nccl_buffer_bytes()
        if name in ("forward", "backward"):
            gathered = fsdp_gathered_layer_bytes(layer)
            # the loss needs the LM head: in the forward always, in the backward when the logits' gradient flows there
            head_in_use = name == "forward" or "logits_loss" in parts
            if head_in_use and head + layer > gathered:
                out.update(all_gathered_head=head, all_gathered_layers=layer)
            else:
                out["all_gathered_layers"] = gathered
        if name == "backward" and "lora_grads" in parts:
            out["grad_reduce_buffers"] = fsdp_reduce_scatter_bytes(int(parts["lora_grads"] * layer_fraction))
        phases[name] = out
    notes = []
    if plan.cpu_offload:
        static = step.phases["optimizer_step"]
        host = sharded + sum(shard_bytes(static.get(k, 0), n, lora_tensors) for k in TRAINABLE_COMPONENTS)
        notes.append(f"FSDP2 CPU offload: each rank keeps {host / 1e9:.1f} GB of weight shards and LoRA state in pinned "
                     f"host memory ({n * host / 1e9:.1f} GB for the box) and steps the optimizer on the CPU")
    return phases, notes
