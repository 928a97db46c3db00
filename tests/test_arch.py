"""Architecture accounting against transformers' own parameter count on the meta device."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config, Qwen3MoeConfig

from vramplan.arch import from_config
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError

DATA = Path(__file__).parent / "data"
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000)


def _meta_params(config: dict) -> int:
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _configs():
    yield "gemma-4-e2b-text", resolve_model("gemma-4-e2b-text").config
    yield "llama-3.2-1b", resolve_model("llama-3.2-1b").config
    yield "llama-3.1-8b", json.loads((DATA / "llama-3.1-8b.json").read_text())
    yield "gemma-4-e4b-text", json.loads((DATA / "gemma-4-e4b-text.json").read_text())
    yield "qwen3", Qwen3Config(**SMALL, head_dim=64).to_dict()
    yield "qwen3-moe", Qwen3MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                      mlp_only_layers=[1], head_dim=32).to_dict()
    yield "gemma3", Gemma3TextConfig(**SMALL, head_dim=64).to_dict()
    yield "mistral", MistralConfig(**SMALL).to_dict()
    yield "llama-untied", LlamaConfig(**SMALL, tie_word_embeddings=False).to_dict()


@pytest.mark.parametrize("name,config", list(_configs()), ids=[n for n, _ in _configs()])
def test_total_matches_transformers_exactly(name, config):
    assert from_config(config).total_params == _meta_params(config)


def test_gemma4_e2b_breakdown_matches_field_notes():
    arch = from_config(resolve_model("gemma-4-e2b-text").config)
    assert arch.per_layer_embedding_params == 35 * 262144 * 256
    assert arch.embedding_params == 262144 * 1536 and arch.lm_head_params == 0
    shared = [layer for layer in arch.layers if not layer.has_kv]
    assert len(shared) == 20 and all(layer.mlp_intermediate == 12288 for layer in shared)
    full = [layer for layer in arch.layers if layer.attention == "full"]
    assert {layer.head_dim for layer in full} == {512}
    assert {layer.head_dim for layer in arch.layers if layer.attention == "sliding"} == {256}
    assert arch.final_logit_softcapping == 30.0


def test_zero_shared_kv_layers_means_every_layer_has_kv():
    config = dict(resolve_model("gemma-4-e2b-text").config, num_kv_shared_layers=0)
    arch = from_config(config)
    assert all(layer.has_kv for layer in arch.layers)
    assert all(layer.mlp_intermediate == 6144 for layer in arch.layers)


def test_multimodal_config_reads_text_config_and_counts_towers():
    text = resolve_model("gemma-4-e2b-text").config
    nested = {"model_type": "gemma4", "text_config": text, "tie_word_embeddings": True,
              "vision_config": {"model_type": "gemma4_vision", "hidden_size": 768, "num_hidden_layers": 16,
                                "intermediate_size": 3072},
              "audio_config": {"model_type": "gemma4_audio", "hidden_size": 1024, "num_hidden_layers": 12}}
    arch = from_config(nested)
    assert arch.text_params == from_config(text).text_params
    assert set(arch.tower_params) == {"vision", "audio"} and arch.total_params > arch.text_params


def test_missing_field_names_it():
    with pytest.raises(VramplanError, match="hidden_size"):
        from_config({"model_type": "llama", "num_hidden_layers": 2})


def _gemma4_moe_config() -> dict:
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=128, num_kv_shared_layers=0,
        hidden_size_per_layer_input=0, vocab_size=1000, layer_types=["sliding_attention"] * 5 + ["full_attention"],
    ).to_dict()


def test_gemma4_moe_with_k_eq_v_matches_transformers():
    config = _gemma4_moe_config()
    arch = from_config(config)
    full = arch.layers[-1]
    assert full.head_dim == 128 and full.kv_heads == 1 and "v_proj" not in {lin.name for lin in full.linears}
    assert arch.expert_params > 0 and all(layer.experts == 4 for layer in arch.layers)
    assert arch.total_params == _meta_params(config)


def test_gemma4_multimodal_towers_within_one_percent():
    from transformers import AutoModel, Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    text = resolve_model("gemma-4-e2b-text").config
    config = Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig().to_dict(),
                          audio_config=Gemma4AudioConfig().to_dict()).to_dict()
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(**config))
    towers = {"vision": 0, "audio": 0}
    for name, p in model.named_parameters():
        for tower in towers:
            if tower in name.split(".")[0]:
                towers[tower] += p.numel()
    arch = from_config(config)
    assert arch.text_params == from_config(text).text_params
    for tower, count in towers.items():
        assert arch.tower_params[tower] == pytest.approx(count, rel=0.01)
    assert arch.total_params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=0.001)
