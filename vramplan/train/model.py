"""Load a local Hugging Face model for QLoRA training: quantize layer by layer, add LoRA, freeze the rest.

The bf16 model is read into CPU memory; then one decoder layer at a time moves to the training
device and its target linears are quantized there, so the GPU never holds the whole bf16 model
(a 8 B model would need 16 GB for a moment that NF4 brings down to ~5 GB).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vramplan.errors import VramplanError
from vramplan.gpu import has_bf16_arithmetic
from vramplan.plan import Plan
from vramplan.train import patching
from vramplan.train.experts import NF4Experts, is_fused_experts
from vramplan.train.graphs import steps_will_replay
from vramplan.train.ops import QLoRALinear

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(plan: Plan, device: torch.device) -> torch.dtype:
    """bf16/fp16 on a GPU as planned; fp32 on the CPU, where half-precision matmuls are slow and only tests run."""
    if device.type != "cuda":
        return torch.float32
    check_arithmetic(plan, torch.cuda.get_device_capability(device)[0])
    return DTYPES[plan.compute_dtype]


def check_arithmetic(plan: Plan, capability_major: int) -> None:
    """Refuse a bf16 plan on a GPU without bf16 arithmetic, where it would crawl through torch's emulation or fail to
    compile in Triton (plans written for another GPU, or by hand; `fit` picks fp16 on such GPUs)."""
    if plan.compute_dtype == "bf16" and not has_bf16_arithmetic(capability_major):
        raise VramplanError(f"this GPU (compute capability {capability_major}.x) has no bf16 arithmetic and the plan "
                            'computes in bf16: set "compute_dtype": "fp16" in the plan, or re-plan with '
                            "`vramplan fit MODEL --gpu auto`, which computes in fp16 here")


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise VramplanError(f"--model {model_dir} has no config.json; pass a local Hugging Face model folder")
    return json.loads(path.read_text())


def load_base_model(model_dir: str | Path, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    """The causal LM on the CPU. A multimodal Gemma 4 checkpoint loads as its text model only:
    the vision and audio towers are never built, let alone moved to the GPU."""
    from transformers import AutoModelForCausalLM

    config = read_config(model_dir)
    if config.get("model_type") == "gemma4":
        return _load_gemma4_text(model_dir, dtype, attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    return model


def _load_gemma4_text(model_dir: str | Path, dtype: torch.dtype, attention: str) -> nn.Module:
    from transformers import AutoConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    from transformers.utils import logging as hf_logging

    # the checkpoint's text weights live under model.language_model.*; the towers' weights are read past,
    # and the report listing them as unexpected (hundreds of lines for E2B) is silenced
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return Gemma4ForCausalLM.from_pretrained(model_dir, config=text_config, dtype=dtype, attn_implementation=attention,
                                                 key_mapping={r"^model\.language_model\.": "model."})
    finally:
        hf_logging.set_verbosity(verbosity)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise VramplanError(f"{type(model).__name__} has no decoder layer list; vramplan train supports decoder-only LMs")
    return layers


def random_model_from_config(model_dir: str | Path, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    """The causal LM of ``model_dir/config.json`` built on the ``meta`` device: no weights anywhere yet.

    ``prepare_for_qlora`` materialises it one decoder layer at a time on the training device with
    seeded random weights, so a 70 B model (140 GB in bf16) trains, for benchmarks, without ever
    existing whole in host or GPU memory, and without a checkpoint on disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type == "gemma4":
        config = config.get_text_config()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def materialise_random(module: nn.Module, device: torch.device, seed: int, std: float, recurse: bool = True,
                       init_module=None) -> None:
    """Give a ``meta`` module real, seeded random storage on ``device``: matrices N(0, std), vectors
    (norm scales) 1, and the rotary tables recomputed (they are buffers computed at init).

    ``init_module`` (the model's ``_init_weights``) first sets what the architecture computes at
    init (Gemma's embedding scale and layer scalars, which ``to_empty`` leaves as garbage)."""
    module.to_empty(device=device, recurse=recurse)
    generator = torch.Generator(device=device).manual_seed(seed)
    subs = list(module.modules()) if recurse else [module]
    with torch.no_grad():
        if init_module is not None:
            for sub in subs:
                init_module(sub)
        for param in module.parameters(recurse=recurse):
            if param.dim() >= 2:
                param.normal_(0.0, std, generator=generator)
            else:
                param.fill_(1.0)
        for sub in subs:
            if any("inv_freq" in name for name in sub._buffers) and hasattr(sub, "config"):  # rotary: built again
                fresh = type(sub)(sub.config).to(device)
                for name, buffer in fresh._buffers.items():
                    sub._buffers[name] = buffer


def _init_of(model: nn.Module):
    """The model's own per-module initialiser (transformers' ``_init_weights``), if it has one."""
    return getattr(model, "_init_weights", None)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters())


def prepare_for_qlora(model: nn.Module, plan: Plan, device: torch.device, host_per_layer_embeddings: bool | None = None,
                      after_layer=None, seed: int = 0) -> list[str]:
    """Quantize + add LoRA layer by layer on ``device``, then move the rest; return the adapted module paths.

    ``after_layer(layer)`` runs on each layer once it is adapted (FSDP2 shards it there). A model
    built on the ``meta`` device gets seeded random weights, one layer at a time."""
    random_init = _on_meta(model)
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02) or 0.02
    if random_init:  # everything but the layers first (embeddings, norm, head, rotary tables), seeded
        # on the host, where a checkpoint's load leaves them until ``move_outside_layers``: made on the
        # GPU, a large vocabulary's transient bf16 table (2.8 GB for Gemma-4-31B, quantized to an int8
        # head or moved to the host) left a hole that the layers' NF4 blocks then scattered into: 20.1 GB
        # stayed reserved whatever the step needed. Built here, the load peaks at what it keeps (16.8 GB)
        # and offloaded checkpoints take the run from 20.53 to 19.21 GB (H100, results/session7)
        in_layers = {id(m) for m in decoder_layers(model).modules()}
        for module in model.modules():
            if id(module) not in in_layers \
                    and any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                materialise_random(module, torch.device("cpu"), seed, std, recurse=False, init_module=_init_of(model))
                model.tie_weights()  # to_empty gave the embedding new storage: a tied head shares it, never gets its own
    freeze(model, plan, device, host_per_layer_embeddings)
    adapted = add_decoder_lora(model, plan, device, after_layer, (seed, std, _init_of(model)) if random_init else None)
    if not adapted:
        raise VramplanError(f"none of the LoRA targets {', '.join(plan.lora_targets)} is a linear layer of this model; "
                            "set lora_targets to its projection names")
    move_outside_layers(model, device)  # the rest: embeddings, norms, LM head (host-resident tables stay put)
    patching.apply_kernel_patches(model, steps_will_replay(model, plan))  # the rest: the final norm
    model.config.use_cache = False
    if device.type == "cuda":  # the load's transient bf16 tables: their cached blocks go back before training
        torch.cuda.empty_cache()
    return adapted


def move_except(model: nn.Module, device: torch.device, left: list[nn.Module]) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` but those inside ``left``."""
    skipped = {id(m) for part in left for m in part.modules()}
    for module in model.modules():
        if id(module) not in skipped:
            module._apply(lambda t: t.to(device), recurse=False)


def move_outside_layers(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer outside the decoder layers to ``device``.

    The layers are where ``add_decoder_lora`` put them, and under FSDP2 they are sharded, their
    shards possibly offloaded to host memory: ``model.to(device)`` would pull those back.
    """
    move_except(model, device, [decoder_layers(model)])


def freeze(model: nn.Module, plan: Plan, device: torch.device, host_per_layer_embeddings: bool | None = None) -> None:
    """Freeze every weight; Gemma 4's per-layer tables and an untied token embedding go to host memory
    (by default when training on a GPU); with ``head_quant="int8"`` the LM head (and a tied table) becomes int8."""
    model.requires_grad_(False)
    if plan.quant == "int8":
        raise VramplanError("plan quant 'int8' is not supported by vramplan train yet; use nf4 or bf16")
    if host_per_layer_embeddings is None:
        host_per_layer_embeddings = device.type == "cuda"
    if host_per_layer_embeddings:
        patching.keep_per_layer_embeddings_on_host(model)
        patching.keep_input_embeddings_on_host(model)
    if plan.head_quant == "int8":  # where the head lives now: the CPU for a checkpoint, the device when random
        patching.quantize_token_head(model)


def add_decoder_lora(model: nn.Module, plan: Plan, device: torch.device, after_layer=None,
                     random_init: tuple | None = None) -> list[str]:
    """Move each decoder layer to ``device``, quantize its linears there and add LoRA; return the adapted paths.

    ``after_layer(layer)`` runs on each adapted layer (FSDP2 shards it there); ``random_init``
    (seed, std, init_module): the layers are on the meta device and get seeded random weights one at a time."""
    quant = "nf4" if plan.quant == "nf4" else "bf16"
    replays = steps_will_replay(model, plan)  # decided for the whole model: the RoPE patch is module-wide
    adapted = []
    prefix = _layers_path(model)
    arena = adapter_arena(model, plan, device) if after_layer is None else None
    for index, layer in enumerate(decoder_layers(model)):
        if random_init is not None:
            materialise_random(layer, device, random_init[0] + 1 + index, random_init[1], init_module=random_init[2])
        if quant == "nf4":  # expert by expert, before the layer's fused bf16 experts could reach the device
            patching.quantize_experts(layer, device, plan.double_quant)
        layer.to(device)
        names = patching.add_lora(layer, plan.lora_targets, plan.lora_rank, plan.alpha, quant, plan.double_quant,
                                  DTYPES[plan.lora_dtype], storage=None if arena is None else arena.take)
        names += patching.add_expert_lora(layer, plan.lora_targets, plan.lora_rank, plan.alpha, DTYPES[plan.lora_dtype])
        adapted += [f"{prefix}.{index}.{name}" for name in names]
        patching.apply_kernel_patches(layer, replays)  # before after_layer: FSDP2 must see the modules that run
        if after_layer is not None:
            after_layer(layer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return adapted


def adapter_arena(model: nn.Module, plan: Plan, device: torch.device):
    """The buffer the adapters are made in (``optim.AdapterArena``) where the trainer will step them as one
    flat tensor (the fused 8-bit AdamW, or the flat step) on one process; None elsewhere (sharded or
    expert-routed models, bf16 adapters, per-tensor steps)."""
    from vramplan.train.optim import AdapterArena, flat_update_pays, fused_update_applies

    if plan.lora_dtype != "fp32" or plan.parallel != "none" or plan.gpus != 1 \
            or not (fused_update_applies(plan) or flat_update_pays(model, plan)):
        return None
    shapes = []
    for layer in decoder_layers(model):
        if any(is_fused_experts(m) for m in layer.modules()):
            return None
        for path, module in layer.named_modules():
            if patching.is_lora_target(path, module, plan.lora_targets):
                shapes += [(plan.lora_rank, module.in_features), (module.out_features, plan.lora_rank)]
    return AdapterArena(shapes, device) if shapes else None


def _layers_path(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for path, module in model.named_modules():
        if module is layers:
            return path
    raise AssertionError("decoder layers not found by identity")


def lora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, QLoRALinear)}


def expert_lora_modules(model: nn.Module) -> dict[str, NF4Experts]:
    """The NF4 routed experts carrying LoRA, by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, NF4Experts) and m.loras()}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in lora_modules(model).values():
        params += [module.lora_A.weight, module.lora_B.weight]
    for experts in expert_lora_modules(model).values():
        params += [p for lora in experts.loras().values() for p in (lora.A, lora.B)]
    return params


def enable_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so no input needs requires_grad).

    Non-reentrant, not reentrant: Gemma 4's shared-KV layers use K/V computed inside earlier
    layers, and only the non-reentrant form keeps the gradient flowing back into those layers.
    With ``offload`` each layer's input also waits for the backward pass in host memory.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.17 knows only this one
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    drop_input_grad_hooks(model)
    if offload:
        for layer in decoder_layers(model):
            layer._gradient_checkpointing_func = checkpoint_with_input_on_host


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Undo the hook transformers' checkpointing sets on the input embeddings (``enable_input_require_grads``, which
    reentrant checkpoints need to see a gradient). The trainer's checkpoints are non-reentrant; with the hook, autograd
    recorded the frozen path from the embeddings on. On Gemma 4 that path is the per-layer inputs' projection and norm:
    the norm kept its input, b·s·layers·d_pl values, to the end of the backward, and each layer's backward made a
    gradient of the whole per-layer tensor to accumulate, 36.7 MB each on Gemma-4-E2B at 2,048 tokens (session 25's
    allocator history). The backward also ran through that projection for nothing."""
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def checkpoint_with_input_on_host(fn, hidden, *args):
    """Non-reentrant checkpoint of ``fn(hidden, *args)`` that keeps ``hidden`` in (pinned) host memory.

    A checkpointed layer still holds its input until backward: b·s·h values per layer (1 GB
    for an 8 B model at 4,096 tokens). Recompute only has to reproduce the saved values, not
    the graph, so it may start from a copy brought back from the host: the forward graph,
    built from the real input, is what the gradient flows through.
    """
    if not isinstance(hidden, torch.Tensor) or not torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, hidden, *args, use_reentrant=False)
    device, requires_grad = hidden.device, hidden.requires_grad
    box = {"input": hidden}

    def run(*rest):
        layer_input = box.pop("input", None)
        if layer_input is None:  # the recompute in backward
            layer_input = box["host"].to(device, non_blocking=True).requires_grad_(requires_grad)
        return fn(layer_input, *rest)

    out = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    pin = device.type == "cuda"
    host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=pin)
    host.copy_(hidden.detach(), non_blocking=pin)
    box["host"] = host
    return out


def load_for_training(model_dir: str | Path, plan: Plan, device: torch.device,
                      host_per_layer_embeddings: bool | None = None, after_layer=None,
                      random_init_from_config: bool = False, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The model ready to train; ``host_per_layer_embeddings`` None means: on the host when training on a GPU.

    ``random_init_from_config``: seeded random weights from ``model_dir/config.json`` alone, built
    layer by layer on ``device`` (benchmarks of models that cannot be written or held whole)."""
    dtype = compute_dtype(plan, device)
    if random_init_from_config:
        model = random_model_from_config(model_dir, dtype, plan.attention)
    else:
        model = load_base_model(model_dir, dtype, plan.attention)
    adapted = prepare_for_qlora(model, plan, device, host_per_layer_embeddings, after_layer=after_layer, seed=seed)
    model.loss_chunk_bytes = plan.loss_chunk_mb * 2**20  # what loss.summed_loss hands the fused loss
    patching.tile_mlps(model, plan.mlp_tiles)
    for param in lora_parameters(model):
        param.requires_grad_(True)
    if plan.checkpointing != "none":
        enable_checkpointing(model, offload=plan.checkpointing == "offload")
    model.train()
    return model, adapted
