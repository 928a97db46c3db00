"""The standard QLoRA recipe, as most tutorials give it, runnable for a plan.

transformers + PEFT + bitsandbytes: ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16
compute)``, ``prepare_model_for_kbit_training`` (which upcasts every non-4-bit parameter to fp32),
LoRA on the plan's targets, SDPA, non-reentrant gradient checkpointing, bitsandbytes' (paged)
8-bit AdamW. This is what ``--stack hf`` models; running it lets ``calibrate --stack hf`` and the
accuracy benchmark measure the same recipe the estimate describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramplan.plan import Plan

_OPTIMIZERS = {"paged_adamw8bit": "PagedAdamW8bit", "adamw8bit": "AdamW8bit"}


@dataclass
class HfRecipe:
    model: Any
    optimizer: Any
    vocab_size: int
    trainable_params: int


def load_hf_recipe(model_dir: str, plan: Plan, device: str = "cuda", dtype=None,
                   keep_unquantized: list[str] | None = None) -> HfRecipe:
    """Load ``model_dir`` the way the standard recipe does, for ``plan``'s settings.

    For comparisons with vramplan's trainer: ``dtype`` overrides the plan's compute dtype (fp32 on
    the CPU, as the trainer runs there) and ``keep_unquantized`` names linears bitsandbytes should
    leave alone (the recipe quantizes every linear but the LM head; the trainer only the planned
    targets, so Gemma 4's per-layer projections stay bf16 there)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if dtype is None:
        dtype = torch.bfloat16 if plan.compute_dtype == "bf16" else torch.float16
    kwargs: dict[str, Any] = {}
    if plan.quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=plan.double_quant,
            llm_int8_skip_modules=["lm_head", *keep_unquantized] if keep_unquantized else None)
    elif plan.quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device},
                                                 attn_implementation=plan.attention, **kwargs)
    checkpointing = plan.checkpointing != "none"
    if plan.quant in ("nf4", "int8"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=plan.lora_rank, lora_alpha=plan.alpha, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", target_modules=list(plan.lora_targets))
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    else:
        import bitsandbytes as bnb

        optimizer = getattr(bnb.optim, _OPTIMIZERS[plan.optimizer])(params, lr=2e-4)
    model.train()
    vocab = model.config.get_text_config().vocab_size
    return HfRecipe(model=model, optimizer=optimizer, vocab_size=vocab, trainable_params=sum(p.numel() for p in params))
