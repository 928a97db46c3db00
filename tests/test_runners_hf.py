"""The runnable standard recipe (what `--stack hf` models) on a tiny random Llama, on the CPU."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vramplan.plan import Plan
from vramplan.runners.hf import load_hf_recipe


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.for_model(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def test_nf4_recipe_upcasts_everything_but_the_4bit_weights_as_the_planner_assumes(tiny_llama):
    recipe = load_hf_recipe(tiny_llama, Plan(model="tiny", quant="nf4", optimizer="adamw", lora_rank=4), device="cpu")
    dtypes = {name: p.dtype for name, p in recipe.model.named_parameters()}
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or "lora_" in n)
    assert all(d == torch.uint8 for n, d in dtypes.items() if n.endswith("q_proj.base_layer.weight"))
    # 2 layers x 7 targets, r=4: r * (in + out) each
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert recipe.trainable_params == 2 * per_layer


def test_recipe_trains(tiny_llama):
    recipe = load_hf_recipe(tiny_llama, Plan(model="tiny", quant="bf16", optimizer="adamw", lora_rank=8,
                                             checkpointing="none"), device="cpu")
    ids = torch.randint(0, recipe.vocab_size, (2, 12))
    losses = []
    for _ in range(5):
        out = recipe.model(input_ids=ids, labels=ids)
        out.loss.backward()
        recipe.optimizer.step()
        recipe.optimizer.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
