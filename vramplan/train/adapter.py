"""The finished adapter in PEFT's format, so ``PeftModel.from_pretrained(base, folder)`` loads it.

PEFT names a LoRA weight ``base_model.model.<module path>.lora_A.weight`` (the adapter name
``default`` is left out on save) and reads r, lora_alpha and target_modules from
``adapter_config.json``; with ``lora_alpha / r`` as its scale it computes the same
``x·Aᵀ·Bᵀ·scale`` as ``QLoRALinear``.

LoRA on the routed experts is saved as PEFT's ``target_parameters`` (``ParamWrapper``) saves it:
one pair per fused parameter, ``lora_A`` [E·r, in] and ``lora_B`` [out, r·E], under the experts
module's path, with one ``.base_layer`` per wrapper PEFT nests outside it (``NF4Experts.peft_key_prefixes``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vramplan.plan import EXPERT_TARGETS, Plan
from vramplan.train.experts import ExpertLoRA, is_fused_experts, peft_delta
from vramplan.train.model import expert_lora_modules, lora_modules, lora_parameters

PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as whole CPU tensors; under FSDP each is gathered from its shards (every rank must call this)."""
    from vramplan.train.distributed import full

    state = {}
    for path, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = full(module.lora_A.weight.detach()).to("cpu").contiguous()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = full(module.lora_B.weight.detach()).to("cpu").contiguous()
    for key, lora in expert_adapters(model).items():
        a, b = lora.to_peft()
        state[f"{key}.lora_A.weight"] = full(a.detach()).to("cpu").contiguous()
        state[f"{key}.lora_B.weight"] = full(b.detach()).to("cpu").contiguous()
    for name, param in trained_in_full(model).items():  # e.g. Gemma 4's projectors: PEFT's modules_to_save keys
        state[f"{PEFT_PREFIX}{name}"] = full(param.detach()).to("cpu").contiguous()
    return state


def expert_adapters(model: nn.Module) -> dict[str, ExpertLoRA]:
    """PEFT's key prefix (``base_model.model.<experts path>[.base_layer…]``) -> the experts' LoRA pair."""
    adapters = {}
    for path, experts in expert_lora_modules(model).items():
        for name, suffix in experts.peft_key_prefixes().items():
            adapters[f"{PEFT_PREFIX}{path}{suffix}"] = experts.loras()[name]
    return adapters


def trained_in_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters trained whole rather than through LoRA (the multimodal projectors when asked)."""
    lora = {id(p) for m in lora_modules(model).values() for p in m.parameters()} | {id(p) for p in lora_parameters(model)}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in lora}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    modules, experts = lora_modules(model), expert_adapters(model)
    expected = {f"{PEFT_PREFIX}{p}.lora_{ab}.weight" for p in modules for ab in "AB"} \
        | {f"{key}.lora_{ab}.weight" for key in experts for ab in "AB"}
    whole = {k: v for k, v in state.items() if ".lora_" not in k}
    state = {k: v for k, v in state.items() if ".lora_" in k}
    with torch.no_grad():
        for key, value in whole.items():
            try:
                model.get_parameter(key[len(PEFT_PREFIX):]).copy_(value)
            except AttributeError:
                raise ValueError(f"the adapter holds {key}, which the model does not have") from None
    if set(state) != expected:
        missing = sorted(expected - set(state))[:1] or sorted(set(state) - expected)[:1]
        raise ValueError(f"the adapter does not match the model's LoRA layers (e.g. {missing[0]})")
    from vramplan.train.distributed import like

    with torch.no_grad():
        for path, module in modules.items():
            for param, key in ((module.lora_A.weight, "lora_A"), (module.lora_B.weight, "lora_B")):
                param.copy_(like(param, state[f"{PEFT_PREFIX}{path}.{key}.weight"]))
    for key, lora in experts.items():
        lora.from_peft(state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"])


def adapter_config(model: nn.Module, plan: Plan, base_model: str) -> dict:
    paths = sorted(lora_modules(model))
    # a multimodal model has towers with the same leaf names (q_proj …): there PEFT gets the full paths
    multimodal = any(".language_model." in f".{p}" for p in paths)
    targets = paths if multimodal else sorted({path.rpartition(".")[2] for path in paths})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": plan.lora_rank,
        "lora_alpha": plan.alpha,
        "target_modules": targets or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.split(".")[1] for n in trained_in_full(model) if n.startswith("model.")}) or None,
    }
    adapted = {name for experts in expert_lora_modules(model).values() for name in experts.loras()}
    if adapted:  # PEFT matches each name as the end of a parameter's path (experts.gate_up_proj …)
        config["target_parameters"] = sorted(t for t in EXPERT_TARGETS if t.rpartition(".")[2] in adapted)
    return config


def write_adapter(folder: str | Path, model: nn.Module, plan: Plan, base_model: str,
                  weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the two PEFT files into ``folder`` (the caller makes the folder's appearance atomic);
    ``weights``: the LoRA state dict already gathered (on several ranks every rank gathers, rank 0 writes)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = lora_state_dict(model) if weights is None else weights
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(model, plan, base_model), indent=2) + "\n")


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def merge_into_base(base: nn.Module, adapter: dict[str, torch.Tensor], scale: float) -> None:
    """Add scale·B·A to each adapted base weight (the ``--merge`` export), in the base's dtype."""
    with torch.no_grad():
        for key, a in adapter.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b = adapter[key.replace(".lora_A.weight", ".lora_B.weight")]
            module = base.get_submodule(path.replace(".base_layer", ""))
            if is_fused_experts(module):  # the fused parameter of this shape ([E, out, in]: gate_up and down differ)
                param = next(p for p in (module.gate_up_proj, module.down_proj) if p.shape[1:] == (b.shape[0], a.shape[1]))
                param += peft_delta(a, b, param.shape[0], scale).to(param.dtype)
                continue
            module.weight += (scale * (b.float() @ a.float())).to(module.weight.dtype)
