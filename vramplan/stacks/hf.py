"""The standard recipe: transformers + PEFT + bitsandbytes, as tutorials give it.

Modelled from what its code does (see /work/shared/reference-stacks/hf_baseline.py):

- ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)`` quantizes every
  nn.Linear but the LM head; embeddings, norms, per-layer embeddings and fused expert
  tensors stay bf16 on the GPU.
- ``prepare_model_for_kbit_training`` then upcasts every remaining bf16 parameter to
  fp32. The token embedding is fp32, so the residual stream is fp32, and since bnb's
  Linear4bit returns its input's dtype, nearly every activation is fp32.
- fp32 q/k/v rule out flash attention; with grouped-query attention and no mask SDPA
  falls back to its math kernel (memory-efficient attention does not take GQA), which
  builds b·heads·s² scores. Sliding-window layers pass a mask, get K/V repeated and run
  memory-efficient attention.
- PEFT creates fp32 adapters (``autocast_adapter_dtype``) and, on a 16-bit base, casts
  each LoRA layer's input to fp32.
- ``ForCausalLMLoss`` upcasts logits with ``.float()``; ``cross_entropy`` keeps an fp32
  log-softmax; the returned ``out`` holds the logits until the script drops it.
- Checkpointing is ``use_reentrant=False`` on each decoder layer; no CPU offload and no
  chunked loss exist in this recipe.
"""

from __future__ import annotations

from vramplan.memory.activations import ActivationRecipe, activation_bytes, model_level_activations
from vramplan.memory.adapters import lora_grad_bytes, lora_param_bytes, paged_params, trainable_params
from vramplan.memory.logits import full_logits_forward_bytes, full_logits_peak_bytes, held_logits_bytes
from vramplan.memory.optimizer import (managed_state_bytes, managed_state_note, optimizer_state_bytes,
                                        resident_paged_state_bytes)
from vramplan.memory.overhead import cuda_library_bytes, unreused_segment_bytes
from vramplan.memory.weights import dense_bytes, linear_weight_bytes
from vramplan.memory import towers as mm
from vramplan.stacks import StepMemory


def attention_kernel(layer, act_bytes: int, attention: str) -> str:
    """Which SDPA backend PyTorch picks for this layer in this recipe."""
    if attention == "eager":
        return "eager"
    if act_bytes == 4:  # fp32: no flash
        gqa = layer.kv_heads < layer.heads
        return "math" if (gqa and layer.attention == "full") else "efficient"
    return "flash" if layer.attention == "full" else "efficient"


def step_memory(arch, plan) -> StepMemory:
    notes = []
    kbit = plan.quant in ("nf4", "int8")
    up = 4 if kbit else 2  # prepare_model_for_kbit_training upcasts what bnb left in bf16
    b, s = plan.micro_batch, mm.decoder_seq_len(arch, plan)  # images' and audio's soft tokens included
    tokens = b * s

    weights = {
        "weights_quantized" if kbit else "weights": linear_weight_bytes(arch, plan.quant, plan.double_quant),
        "embeddings": dense_bytes(arch.embedding_params + arch.lm_head_params, up),
        "norms": dense_bytes(arch.norm_params, up),
    }
    if arch.per_layer_embedding_params:
        weights["per_layer_embeddings"] = dense_bytes(arch.per_layer_embedding_params, up)
    if arch.expert_params:
        weights["experts"] = dense_bytes(arch.expert_params, up)
        notes.append("bitsandbytes quantizes nn.Linear only: the fused expert tensors stay 16-bit"
                     + (" and prepare_model_for_kbit_training upcasts them to fp32" if kbit else ""))
    towers = mm.tower_weight_params(arch, plan)
    if towers:
        weights["towers"] = dense_bytes(towers, up)
    if plan.head_quant != "bf16":
        notes.append("the hf recipe keeps the token embedding and LM head in 16 bits; head_quant=int8 ignored on the hf stack")
    if plan.lora_dtype != "fp32":
        notes.append("PEFT keeps LoRA adapters in fp32 (autocast_adapter_dtype); lora_dtype=bf16 ignored on the hf stack")
    trainable = trainable_params(arch, plan)
    adapters = {"lora_params": lora_param_bytes(trainable, 4)}
    grads = {"lora_grads": lora_grad_bytes(trainable, 4)}
    managed = managed_state_bytes(paged_params(arch, plan), plan.optimizer)
    optim = {"optimizer_states": optimizer_state_bytes(trainable, plan.optimizer) - managed}
    notes.extend(managed_state_note(managed, plan.optimizer))

    # activations
    checkpointing = plan.checkpointing
    if checkpointing == "offload":
        notes.append("the hf recipe has no CPU offload of checkpoints; modelled as full checkpointing")
        checkpointing = "full"
    if plan.loss == "chunked":
        notes.append("the hf recipe computes the loss on full logits (no chunked loss); modelled as full")
    recipe = ActivationRecipe(
        act_bytes=up, kernel=lambda layer: attention_kernel(layer, up, plan.attention),
        lora_input_copy_bytes=4 if up == 2 else 0, lora_rank=plan.lora_rank, lora_targets=plan.lora_targets,
        lora_inner_bytes=4, four_norms=arch.model_type.startswith("gemma"))
    persistent, layer_set = activation_bytes(arch, b, s, checkpointing, recipe)
    model_level = model_level_activations(arch, tokens, up, per_layer_copies=3)
    tower_kept, tower_working = mm.tower_activation_bytes(arch, plan, up)
    if tower_kept:
        model_level["tower_activations"] = tower_kept

    softcap = arch.final_logit_softcapping is not None
    logits_set = full_logits_peak_bytes(tokens, arch.vocab_size, up, softcap)
    held = held_logits_bytes(tokens, arch.vocab_size, up)

    static = {**weights, **adapters, **optim}
    held_through_step = sum(static.values()) + grads["lora_grads"] + persistent + sum(model_level.values())
    if logits_set >= held + layer_set:
        backward = {**static, **grads, **model_level, "activations": persistent, "logits_loss": logits_set}
    else:
        backward = {**static, **grads, **model_level, "activations": persistent + layer_set, "logits_loss": held}
    fragmentation = unreused_segment_bytes(held_through_step, logits_set, layer_set, sum(backward.values()))

    # upcasting a table to fp32 holds its bf16 original and the fp32 copy at once: +2 bytes/param
    upcast_transient = 2 * max(arch.per_layer_embedding_params, arch.embedding_params) if kbit else 0
    phases = {
        "load": {**weights, **adapters, "load_transient": upcast_transient},
        "forward": {**static, **model_level, "activations": persistent,
                    "logits_loss": full_logits_forward_bytes(tokens, arch.vocab_size, up, softcap)},
        "backward": backward,
        "optimizer_step": {**static, **grads, "logits_loss": held},
    }
    if tower_working:  # a frozen tower's layers exist one at a time, in the forward only
        for phase in ("forward", "backward") if set(plan.train_parts) - {"language"} else ("forward",):
            phases[phase]["tower_working_set"] = tower_working
    return StepMemory(phases=phases, fragmentation=fragmentation, library_bytes=cuda_library_bytes("hf"),
                      resident_paged=resident_paged_state_bytes(managed), notes=tuple(notes))
