"""vramplan's own trainer, as it is being built.

- Base linears NF4 (double quant by default) or int8/bf16, dequantized tile by tile inside
  fused Triton kernels: no full bf16 copy of a weight is ever materialised.
- The LM head in bf16 on the GPU, or (``head_quant="int8"``) int8 with one scale per vocabulary
  row, dequantized a slice at a time by the fused loss (a tied table: one int8 copy serves the
  lookup and the head); an untied token embedding and Gemma 4's per-layer embedding
  tables stay in CPU memory and only the looked-up rows travel to the GPU. (A tied table is
  the LM head's weight, so it stays.)
- An MoE layer's routed experts (fused 3-D tensors in transformers) NF4 one expert matrix at a
  time under NF4, frozen, adapted (one LoRA pair per expert) only when the targets name them;
  each routed expert is decoded in turn into one pair of bf16 buffers shared by all layers
  (bf16 as transformers holds them otherwise).
- LoRA adapters in fp32 (or bf16 with an fp32 master copy in the optimizer), bf16 compute.
- bf16 activations, flash attention through SDPA (O(s)), a fused GLU that recomputes the
  activation instead of saving it and writes its backward over the saved gate and up.
- Kept from a step's first matmul on: the cuBLAS workspaces of the forward's and the backward's
  threads (torch's allocations) and, for NF4, one bf16 buffer the size of the largest linear
  that every base matmul dequantizes into.
- Chunked linear cross-entropy: logits exist one chunk of rows at a time.
- Gradient checkpointing of every decoder layer's bf16 input, optionally offloaded to CPU
  memory (two layers' worth stay on the GPU: the one in use and the one being prefetched).
- Fixed shapes every step: the caching allocator reuses its blocks, little fragmentation.
"""

from __future__ import annotations

from vramplan.memory.activations import (CHUNKED_ATTENTION_SCORE_BYTES, FLASH_MAX_HEAD_DIM, ActivationRecipe,
                                         activation_bytes, band_pays, captured_prologue_bytes, model_level_activations,
                                         sliding_window_of)
from vramplan.memory.adapters import (adapter_copy_bytes, lora_grad_bytes, lora_param_bytes, paged_params,
                                      small_pool_gradient_bytes, trainable_params)
from vramplan.memory.logits import chunked_logits_bytes, full_logits_forward_bytes, full_logits_peak_bytes, held_logits_bytes
from vramplan.memory.optimizer import (FUSED_8BIT, PAGED, managed_state_bytes, managed_state_note, optimizer_state_bytes,
                                        resident_paged_state_bytes)
from vramplan.memory.overhead import (CAPTURED_FRAGMENTATION_FLOOR_BYTES, cublas_workspace_bytes, cuda_graph_bytes,
                                       cuda_library_bytes, flat_optimizer_bytes, pooled_fragmentation_bytes,
                                       small_gradients_after_peak)
from vramplan.memory.weights import (dense_bytes, dequant_buffer_bytes, expert_dequant_buffer_bytes, head_weight_bytes,
                                     linear_weight_bytes, nf4_expert_bytes)
from vramplan.memory import towers as mm
from vramplan.stacks import StepMemory
from vramplan.train import switches

WIDE_HEADS_NOTE = ("{n} attention layers with {width}-wide heads run vramplan's chunked attention (SDPA has no flash "
                   "kernel that wide): a few {chunk_mib} MiB score chunks in the layer's working set and one more of "
                   "allocator slack; VRAMPLAN_DISABLE=wide_head_attention runs SDPA's slower memory-efficient kernels "
                   "instead")
PROLOGUE_NOTE = ("a replayed step looks up its embeddings{per_layer} eagerly: {gb:.2f} GB of blocks the allocator keeps "
                 "cached outside the graph's pool, counted in fragmentation")
SLIDING_BAND_NOTE = ("{n} sliding-window layers run vramplan's chunked attention over their {window}-key band (SDPA "
                     "computes the whole masked square): score chunks of at most {chunk_mib} MiB in the layer's working "
                     "set; VRAMPLAN_DISABLE=sliding_band_attention runs SDPA instead")
EXPERTS_NOTE = {
    "nf4": ("MoE experts: quantized to NF4 one expert matrix at a time and frozen, not adapted (each routed "
            "expert is decoded into one shared buffer; FSDP2 does not shard them); LoRA goes on attention and any "
            "shared MLP",),
    "nf4+lora": ("MoE experts: quantized to NF4 one expert matrix at a time and frozen, with one LoRA pair per "
                 "expert on the targeted fused matrices (counted with the adapters; each routed expert is decoded "
                 "into one shared buffer)",),
    "bf16": ("MoE experts: frozen in bf16 as transformers holds them (fused 3-D tensors), not adapted; "
             "LoRA goes on attention and any shared MLP",),
}

ACT = 2  # bf16 activations
OFFLOAD_LAYERS_ON_GPU = 2


def on_gpu_embedding_params(arch) -> int:
    """The LM head; the token table too only when tied to it (untied, it is a host-side lookup)."""
    return arch.embedding_params if arch.tied_embeddings else arch.lm_head_params


def step_memory(arch, plan) -> StepMemory:
    b, s = plan.micro_batch, mm.decoder_seq_len(arch, plan)  # images' and audio's soft tokens included
    tokens = b * s
    h = arch.hidden_size
    lora_bytes = 4 if plan.lora_dtype == "fp32" else 2

    weights = {
        "weights_quantized" if plan.quant != "bf16" else "weights": linear_weight_bytes(arch, plan.quant, plan.double_quant),
        "embeddings": head_weight_bytes(on_gpu_embedding_params(arch), arch.vocab_size, plan.head_quant),
        "norms": dense_bytes(arch.norm_params, 2),
    }
    experts_quant = "nf4" if plan.quant == "nf4" else "bf16"  # int8 is refused by the trainer
    experts_note = "nf4+lora" if experts_quant == "nf4" and plan.adapts_experts else experts_quant
    if arch.expert_params:
        # transformers holds an MoE layer's experts as fused 3-D tensors, not linears: under NF4 the
        # trainer swaps them for per-expert NF4 tensors (vramplan/train/experts.py), else keeps them
        # bf16. The NF4 ones are plain tensors that FSDP2 cannot see: not a sharded weight
        # component ("experts"), every rank holds them whole ("experts_nf4")
        if experts_quant == "nf4":
            weights["experts_nf4"] = nf4_expert_bytes(arch, plan.double_quant)
        else:
            weights["experts"] = dense_bytes(arch.expert_params, 2)
    towers = mm.tower_weight_params(arch, plan)
    if towers:
        weights["towers"] = dense_bytes(towers, 2)
    trainable = trainable_params(arch, plan)
    adapters = {"lora_params": lora_param_bytes(trainable, lora_bytes)}
    grads = {"lora_grads": lora_grad_bytes(trainable, lora_bytes)}
    optimizer, optimizer_notes = stepped_optimizer(plan)
    managed = managed_optimizer_bytes(arch, plan)
    optim = {"optimizer_states": optimizer_state_bytes(trainable, optimizer, master_weights=lora_bytes == 2) - managed}

    captured = graphs_apply(arch, plan)
    recipe = ActivationRecipe(
        act_bytes=ACT, kernel=lambda layer: attention_kernel_of(layer, plan), fused_glu=True, inplace_glu_backward=True, lora_rank=plan.lora_rank,
        lora_targets=plan.lora_targets, lora_inner_bytes=ACT, four_norms=arch.model_type.startswith("gemma"),
        mlp_tiles=plan.mlp_tiles, band_window=lambda layer: band_window_of(layer, plan))
    kept = OFFLOAD_LAYERS_ON_GPU if plan.checkpointing == "offload" else None
    persistent, layer_set = activation_bytes(arch, b, s, plan.checkpointing, recipe, layers_kept=kept)
    model_level = model_level_activations(arch, tokens, ACT, per_layer_copies=2)
    tower_kept, tower_working = mm.tower_activation_bytes(arch, plan, ACT)
    if tower_kept:
        model_level["tower_activations"] = tower_kept

    grads_made_in_backward = gradients_made_in_backward(arch, plan)
    softcap = arch.final_logit_softcapping is not None
    if plan.loss == "chunked":
        # the chunked loss computes its gradient during the forward: its buffers peak there, not in backward
        forward_loss = loss = chunked_logits_bytes(tokens, arch.vocab_size, h, int8_head=plan.head_quant == "int8",
                                                   budget=plan.loss_chunk_mb * 2**20, vocab_major=int8_vocab_major())
        # made in the backward, each layer's gradients come as its checkpoints go: it peaks at its start or its end
        kept = max(persistent - grads["lora_grads"], 0) if grads_made_in_backward else persistent
        backward_parts = {"activations": kept + layer_set}
    else:
        forward_loss = full_logits_forward_bytes(tokens, arch.vocab_size, ACT, softcap)
        loss = full_logits_peak_bytes(tokens, arch.vocab_size, ACT, softcap)
        held = held_logits_bytes(tokens, arch.vocab_size, ACT)
        backward_parts = ({"activations": persistent, "logits_loss": loss} if loss >= held + layer_set
                          else {"activations": persistent + layer_set, "logits_loss": held})

    # buffers made on a step's first matmuls and kept: cuBLAS workspaces, the NF4 dequantization buffer
    step_buffers = {"cublas_workspaces": cublas_workspace_bytes()}
    if captured:
        step_buffers["cuda_graphs"] = cuda_graph_bytes()
    if lora_bytes == 4:  # each module keeps its last copies (under FSDP2 too: of the gathered adapters)
        step_buffers["lora_compute_copies"] = adapter_copy_bytes(trainable)
    if flat_step_applies(arch, plan):
        step_buffers["flat_optimizer"] = flat_optimizer_bytes(trainable)
    if dequant := dequant_buffer_bytes(arch, plan.quant, tokens):
        step_buffers["dequant_buffer"] = dequant
    if arch.expert_params and experts_quant == "nf4":
        step_buffers["expert_dequant_buffers"] = expert_dequant_buffer_bytes(arch)
    static = {**weights, **adapters, **optim, **step_buffers}
    prologue = captured_prologue_bytes(arch, tokens, ACT) if captured else 0
    compact = switches.enabled("compact_captures")  # retired: off only where a benchmark prices a line of its day
    # the eager slack's line was fitted on one process with expandable segments; elsewhere its older constant
    fitted_eager = plan.gpus == 1 and switches.enabled("expandable_segments")
    # gradients that exist before the backward (accumulated, one flat buffer) come after no peak of it: all count
    small = small_pool_gradient_bytes(arch, plan) if fitted_eager else None
    after_peak = (small_gradients_after_peak(small, persistent, layer_set, forward_loss, grads["lora_grads"])
                  if small is not None and grads_made_in_backward else small)
    fragmentation = pooled_fragmentation_bytes(persistent + sum(model_level.values()) + max(layer_set, loss),
                                               trainable, captured=captured, prologue=prologue, compact=compact,
                                               small_gradients=after_peak)
    prologue_notes = ((PROLOGUE_NOTE.format(per_layer=" and per-layer rows" if arch.per_layer_dim else "",
                                            gb=prologue / 1e9),) if prologue > CAPTURED_FRAGMENTATION_FLOOR_BYTES else ())
    chunked = [layer for layer in arch.layers if attention_kernel_of(layer, plan).startswith("chunked")]
    wide = [layer for layer in chunked if layer.head_dim > FLASH_MAX_HEAD_DIM]
    banded = [layer for layer in chunked if band_window_of(layer, plan)]
    if chunked:
        # its chunks' score buffers come in as many sizes as chunks (each reads the keys up to its last query): the
        # allocator keeps them apart, about one chunk's budget beyond the peak (session 13's A/B on the H100:
        # reserved - allocated grew 49-73 MB on Gemma-4-E2B and E4B, benchmarks/results/session13/ab-wide-heads.jsonl)
        fragmentation += CHUNKED_ATTENTION_SCORE_BYTES
    phases = {
        # quantizing at load holds one layer's bf16 weight beside its packed copy
        "load": {**weights, **adapters, "load_transient": 2 * arch.largest_linear_params},
        "forward": {**static, **model_level, "activations": persistent, "logits_loss": forward_loss},
        "backward": {**static, **grads, **model_level, **backward_parts},
        "optimizer_step": {**static, **grads},
    }
    if tower_working:  # a frozen tower's layers exist one at a time, in the forward only
        for phase in ("forward", "backward") if set(plan.train_parts) - {"language"} else ("forward",):
            phases[phase]["tower_working_set"] = tower_working
    return StepMemory(phases=phases, fragmentation=fragmentation, small_gradients_after_peak=after_peak,
                      library_bytes=cuda_library_bytes("vramplan", managed_allocation=managed > 0),
                      resident_paged=resident_paged_state_bytes(managed),
                      notes=managed_state_note(managed, optimizer) + optimizer_notes + (EXPERTS_NOTE[experts_note] if arch.expert_params else ())
                      + ((WIDE_HEADS_NOTE.format(n=len(wide), width=wide[0].head_dim,
                                                      chunk_mib=CHUNKED_ATTENTION_SCORE_BYTES // 2**20),) if wide else ())
                      + ((SLIDING_BAND_NOTE.format(n=len(banded), window=banded[0].sliding_window,
                                                   chunk_mib=CHUNKED_ATTENTION_SCORE_BYTES // 2**20),) if banded else ())
                      + prologue_notes)


#: Model families the trainer does not step flat: on Gemma-4-E2B it was 18% slower in an eager A/B
#: (4,820 -> 3,962 tok/s at 2,048 tokens on the H100), not yet measured under CUDA graphs.
FLAT_DECLINED = ("gemma4", "gemma4_text")


def int8_vocab_major() -> bool:
    """Whether the trainer walks an int8 head's loss vocabulary-major (``switches``: ``int8_vocab_major``)."""
    return switches.enabled("int8_vocab_major")


def steps_fused(plan) -> bool:
    """Whether the trainer steps this plan's 8-bit AdamW with the fused kernel: switched on
    (``VRAMPLAN_ENABLE=fused_optimizer``, off by default: ``train.switches``), fp32 adapters (the kernel's
    type), on one process (``vramplan.train.optim.FusedAdamW8bit``) or on each rank's FSDP2 shards
    (``FusedShardedAdamW8bit``) kept on the GPUs: CPU offload steps on the host, where the kernel's
    PyTorch reference would be slow, and DDP's reducer owns the gradients (DDP keeps bitsandbytes)."""
    if plan.stack != "vramplan" or plan.optimizer == "adamw" or plan.lora_dtype != "fp32" \
            or not switches.enabled("fused_optimizer"):
        return False
    return not plan.cpu_offload if plan.parallel == "fsdp" else plan.gpus == 1


def fsdp_steps_fused(plan) -> bool:
    """:func:`steps_fused` for an FSDP2 plan (other FSDP2 plans step torch AdamW: bitsandbytes takes no DTensor)."""
    return plan.parallel == "fsdp" and steps_fused(plan)


def managed_optimizer_bytes(arch, plan) -> int:
    """The optimizer states the trainer keeps in CUDA managed memory for ``plan``: the paged adapters' states of the
    optimizer it steps (:func:`stepped_optimizer`), outside torch's pool."""
    paged = paged_params(arch, plan, flat=flat_step_applies(arch, plan))
    return managed_state_bytes(paged, stepped_optimizer(plan)[0])


def stepped_optimizer(plan) -> tuple[str, tuple[str, ...]]:
    """(the optimizer whose states the trainer keeps for ``plan``, notes): the plan's, but the fused
    kernel's states (never paged) where :func:`steps_fused`, and torch AdamW's for other FSDP2 8-bit plans."""
    if plan.optimizer == "adamw":
        return plan.optimizer, ()
    if steps_fused(plan):
        where = " under FSDP2" if plan.parallel == "fsdp" else ""
        paged = (f"{plan.optimizer}{where} steps the fused 8-bit AdamW, whose states are not paged: "
                 f"priced on the GPU{'s' if plan.parallel == 'fsdp' else ''}",) if plan.optimizer in PAGED else ()
        return FUSED_8BIT, paged
    if plan.parallel != "fsdp":
        return plan.optimizer, ()
    return "adamw", (f"{plan.optimizer} under FSDP2: the trainer steps torch AdamW (fp32 states) "
                     f"{fsdp_torch_adamw_reason(plan)}; priced as that",)


def fsdp_torch_adamw_reason(plan) -> str:
    """Why an 8-bit FSDP2 plan steps torch AdamW instead of the fused kernel on its shards
    (:func:`fsdp_steps_fused` says no): the planner's note and the trainer's say the same."""
    if plan.cpu_offload:
        return "with CPU offload (it steps on the host)"
    if plan.lora_dtype != "fp32":
        return "with bf16 adapters"
    return "unless VRAMPLAN_ENABLE=fused_optimizer"


def flat_step_applies(arch, plan) -> bool:
    """Whether the trainer steps this plan's adapters as one flat tensor: ``Plan.steps_flat`` on a
    model family that does not decline it (:data:`FLAT_DECLINED`)."""
    return plan.steps_flat and arch.model_type not in FLAT_DECLINED


def gradients_made_in_backward(arch, plan) -> bool:
    """Whether a step's adapter gradients come into being layer by layer through its backward, each layer's as its
    checkpoints are let go: an eager step of one micro-batch on one GPU, its adapters stepped apart. A capture makes
    them one buffer first (``compact_captures``), so does the flat step, and accumulation keeps them from the first
    micro-batch on. FSDP2 and DDP ranks (their reducers' buffers, ``stacks.distributed``) are priced as before."""
    return (not graphs_apply(arch, plan) and not flat_step_applies(arch, plan) and plan.grad_accum == 1
            and plan.gpus == 1 and plan.parallel == "none")


def graphs_apply(arch, plan) -> bool:
    """Whether the trainer replays this plan's micro-batch steps as CUDA graphs: ``Plan.captures_steps``
    on a model without routed experts. An MoE layer's forward reads the router's choice on the host
    (which experts got tokens), a sync no capture may hold, so the trainer runs such a model eagerly
    whatever the plan asks (``vramplan.train.graphs.StepGraphs.available``): no graphs' memory, no
    replay's speed."""
    return plan.captures_steps and not arch.routes_experts


def wide_heads_chunked(plan: Plan) -> bool:
    """Whether vramplan's trainer runs heads wider than the flash kernels through its chunked attention
    (``vramplan.train.attention``, switch ``wide_head_attention``); SDPA's memory-efficient kernels otherwise."""
    return plan.stack == "vramplan" and plan.attention != "eager" and switches.enabled("wide_head_attention")


def band_window_of(layer, plan: Plan) -> int:
    """The sliding window a layer's chunked attention bands in vramplan's trainer (switch ``sliding_band_attention``),
    else 0: where the row is long enough for the band to pay (vramplan.memory.activations.band_pays). What the
    planner's memory, speed and notes all read. Its steps leave transformers' sliding mask out of unpadded, unpacked
    rows (vramplan.train.attention.sliding_masks_left_out, and vramplan.train.graphs.packing_decided for captured
    steps); padded or packed rows keep it and run SDPA."""
    window = sliding_window_of(layer, plan.seq_len)
    applies = (plan.stack == "vramplan" and plan.attention != "eager" and switches.enabled("sliding_band_attention")
               and band_pays(window, plan.seq_len))
    return window if applies else 0


def attention_kernel_of(layer, plan: Plan) -> str:
    """The attention kernel a layer runs on in vramplan's trainer (``memory.activations.KERNELS``)."""
    if plan.attention == "eager":
        return "eager"
    wide = layer.head_dim > FLASH_MAX_HEAD_DIM and wide_heads_chunked(plan)
    if not (wide or band_window_of(layer, plan)):
        return "flash"
    return "chunked_fused" if switches.enabled("wide_head_fused_rows") else "chunked"
