"""Gemma 4 with its towers (Gemma4ForConditionalGeneration) made ready for LoRA training.

A plan whose modalities include image or audio loads the whole model; a text plan keeps
using ``model._load_gemma4_text``, which never builds the towers. Where LoRA goes is chosen
per part (``plan.train_parts``: language / vision / audio) and per kind (the attention and/or
MLP names among ``plan.lora_targets``, mapped to each tower's own names by
``vramplan.memory.towers.TOWER_TARGETS``). The towers stay frozen in the compute dtype unless
trained; the language model's linears are quantized as the plan says; the projectors
(``embed_vision`` / ``embed_audio``) are trained in full when ``plan.train_projectors``.

The decoder is the same Gemma4TextModel as in the text path: its forward loop and shared-K/V
hand-over are untouched (the cached and uncached logits stay equal, see tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vramplan.errors import VramplanError
from vramplan.memory.towers import TOWER_TARGETS, target_kinds
from vramplan.plan import Plan
from vramplan.train import ops, patching
from vramplan.train.model import (DTYPES, add_decoder_lora, compute_dtype, enable_checkpointing, freeze, move_except,
                                  lora_parameters)

#: The submodule of Gemma4Model holding each tower's encoder layers, and each projector.
TOWER_LAYERS = {"vision": "model.vision_tower.encoder.layers", "audio": "model.audio_tower.layers"}
PROJECTORS = {"image": "model.embed_vision", "audio": "model.embed_audio"}


def fp16_safe_audio(config, dtype: torch.dtype) -> bool:
    """Clamp the audio tower's mask fill value (-1e9) and its clipping bound (1e10) to ``dtype``'s range.

    ``masked_fill(mask, -1e9)`` on a float16 tensor raises "value cannot be converted to type
    c10::Half without overflow" (T4-class GPUs train in fp16). The dtype's own minimum masks just as
    well: after the logit soft cap (±50) exp(min - 50) is 0 in any dtype. Returns whether it changed.
    """
    audio = getattr(config, "audio_config", None)
    if audio is None:
        return False
    info = torch.finfo(dtype)
    changed = False
    value = getattr(audio, "attention_invalid_logits_value", None)
    if value is not None and value < info.min:
        audio.attention_invalid_logits_value = float(info.min)
        changed = True
    clip = getattr(audio, "gradient_clipping", None)
    if clip is not None and clip > info.max:
        audio.gradient_clipping = float(info.max)
        changed = True
    return changed


def load_multimodal(model_dir: str | Path, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    """The full Gemma 4 model (text decoder, vision and audio towers, projectors) on the CPU."""
    from transformers import AutoConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "gemma4":
        raise VramplanError(f"images and audio are trained on Gemma 4 (E2B, E4B) so far; {model_dir} is {config.model_type}")
    fp16_safe_audio(config, dtype)
    # the audio tower has eager attention only: asking the whole model for sdpa fails, the default picks per tower
    chosen = {} if attention == "sdpa" else {"attn_implementation": attention}
    return Gemma4ForConditionalGeneration.from_pretrained(model_dir, config=config, dtype=dtype, **chosen)


def add_tower_lora(model: nn.Module, tower: str, kinds: tuple[str, ...], plan: Plan) -> list[str]:
    """LoRA on one tower's linears of the chosen kinds (bf16 base: the towers are not quantized)."""
    names = {name for kind in kinds for name in TOWER_TARGETS[tower][kind]}
    try:
        layers = model.get_submodule(TOWER_LAYERS[tower])
    except AttributeError:
        raise VramplanError(f"the model has no {tower} tower; drop {tower} from --train") from None

    def choose(path: str, module: nn.Module):
        # the towers' projections are nn.Linear inside Gemma4ClippableLinear (".../q_proj.linear") or plain
        parent, _, leaf = path.rpartition(".")
        name = parent.rpartition(".")[2] if leaf == "linear" else leaf
        if isinstance(module, nn.Linear) and name in names:
            return ops.QLoRALinear.from_linear(module, rank=plan.lora_rank, alpha=plan.alpha, quant="bf16",
                                               double_quant=False, lora_dtype=DTYPES[plan.lora_dtype])
        return None

    return [f"{TOWER_LAYERS[tower]}.{p}" for p in patching.replace_modules(layers, choose)]


def projector_parameters(model: nn.Module, plan: Plan) -> list[nn.Parameter]:
    if not plan.train_projectors:
        return []
    params = []
    for modality, path in PROJECTORS.items():
        if modality in plan.modalities:
            params += list(model.get_submodule(path).parameters())
    return params


def prepare_multimodal(model: nn.Module, plan: Plan, device: torch.device, host_per_layer_embeddings: bool | None = None) -> list[str]:
    """LoRA where the plan says, quantize the decoder's linears, move to ``device``; return the adapted paths."""
    freeze(model, plan, device, host_per_layer_embeddings)
    kinds = target_kinds(plan.lora_targets)
    adapted = add_decoder_lora(model, plan, device) if "language" in plan.train_parts else []
    for tower in ("vision", "audio"):
        if tower in plan.train_parts:
            adapted += add_tower_lora(model, tower, kinds, plan)
    if not adapted and not plan.train_projectors:
        raise VramplanError("nothing to train: --train names no part with a LoRA target and the projectors are frozen")
    move_except(model, device, unused_towers(model, plan))  # the towers of modalities the data lacks stay
    patching.apply_kernel_patches(model.get_decoder())  # the decoder only: the towers' norms differ
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    return adapted


#: The modules each modality brings: its tower and the projector into the text width.
TOWER_MODULES = {"image": ("vision_tower", "embed_vision"), "audio": ("audio_tower", "embed_audio")}


def unused_towers(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The towers (and projectors) of modalities the plan's data does not have: they stay in host
    memory, as the planner assumes (E2B's audio tower is 0.6 GB in bf16 that an image run never calls)."""
    inner = model.model
    return [module for modality, names in TOWER_MODULES.items() if modality not in plan.modalities
            for name in names if (module := getattr(inner, name, None)) is not None]


def trainable_parameters(model: nn.Module, plan: Plan) -> list[nn.Parameter]:
    return lora_parameters(model) + projector_parameters(model, plan)


def load_for_training(model_dir: str | Path, plan: Plan, device: torch.device,
                      host_per_layer_embeddings: bool | None = None) -> tuple[nn.Module, list[str]]:
    """Like ``model.load_for_training``, for a plan with images or audio."""
    dtype = compute_dtype(plan, device)
    model = load_multimodal(model_dir, dtype, plan.attention)
    adapted = prepare_multimodal(model, plan, device, host_per_layer_embeddings)
    model.loss_chunk_bytes = plan.loss_chunk_mb * 2**20  # as model.load_for_training
    patching.tile_mlps(model, plan.mlp_tiles)
    for param in trainable_parameters(model, plan):
        param.requires_grad_(True)
    if plan.checkpointing != "none":
        enable_checkpointing(model, offload=plan.checkpointing == "offload")
    model.train()
    return model, adapted
