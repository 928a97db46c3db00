"""The finished adapter in PEFT's format, so ``PeftModel.from_pretrained(base, folder)`` loads it.

PEFT names a LoRA weight ``base_model.model.<module path>.lora_A.weight`` (the adapter name
``default`` is left out on save) and reads r, lora_alpha and target_modules from
``adapter_config.json``; with ``lora_alpha / r`` as its scale it computes the same
``x·Aᵀ·Bᵀ·scale`` as ``QLoRALinear``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vramplan.plan import Plan
from vramplan.train.model import lora_modules

PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for path, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.lora_A.weight.detach().to("cpu").contiguous()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.lora_B.weight.detach().to("cpu").contiguous()
    for name, param in trained_in_full(model).items():  # e.g. Gemma 4's projectors: PEFT's modules_to_save keys
        state[f"{PEFT_PREFIX}{name}"] = param.detach().to("cpu").contiguous()
    return state


def trained_in_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters trained whole rather than through LoRA (the multimodal projectors when asked)."""
    lora = {id(p) for m in lora_modules(model).values() for p in m.parameters()}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in lora}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{p}.lora_{ab}.weight" for p in modules for ab in "AB"}
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
    with torch.no_grad():
        for path, module in modules.items():
            module.lora_A.weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_A.weight"])
            module.lora_B.weight.copy_(state[f"{PEFT_PREFIX}{path}.lora_B.weight"])


def adapter_config(model: nn.Module, plan: Plan, base_model: str) -> dict:
    paths = sorted(lora_modules(model))
    # a multimodal model has towers with the same leaf names (q_proj …): there PEFT gets the full paths
    multimodal = any(".language_model." in f".{p}" for p in paths)
    targets = paths if multimodal else sorted({path.rpartition(".")[2] for path in paths})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": plan.lora_rank,
        "lora_alpha": plan.alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.split(".")[1] for n in trained_in_full(model) if n.startswith("model.")}) or None,
    }


def write_adapter(folder: str | Path, model: nn.Module, plan: Plan, base_model: str) -> None:
    """Write the two PEFT files into ``folder`` (the caller makes the folder's appearance atomic)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
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
            linear = base.get_submodule(path)
            linear.weight += (scale * (b.float() @ a.float())).to(linear.weight.dtype)
