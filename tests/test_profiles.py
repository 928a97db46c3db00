"""Every architecture profile builds in transformers and has the parameter count its source publishes.

Models are built on the ``meta`` device: shapes only, no memory, so a 70 B model takes well under
a second. A published count that is a rounded headline (``5.1B``) is checked to 1%; one that is
an exact total (a checkpoint's safetensors) must match exactly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from vramplan.catalog import list_models, resolve_model

REFERENCE_STACKS = Path("/work/shared/reference-stacks")
REQUIRED = [
    "gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b",
    "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b",
    "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b",
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b",
    "mistral-7b", "phi-4-mini",
    "phi-4", "mistral-nemo-12b", "qwen2.5-3b", "qwen2.5-14b", "qwen2.5-32b", "gemma-2-27b",
]  # fmt: skip
TEXT_ONLY_WITHOUT_COUNT = {"gemma-4-e4b-text"}  # Google publishes no count for the text tower alone


def build_on_meta(config: dict):
    cfg = AutoConfig.for_model(**config)
    auto = AutoModelForImageTextToText if config.get("vision_config") is not None else AutoModelForCausalLM
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return auto.from_config(cfg)


def counted_params(model, counts: str) -> int:
    """Parameters the way the published number counts them (see ModelProfile.published_counts)."""
    if counts == "language_model":
        return sum(p.numel() for p in model.model.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is one Parameter, counted once
    if counts == "all+untied_lm_head":
        total += model.get_output_embeddings().weight.numel()
    return total


def test_required_profiles_exist():
    assert set(REQUIRED) <= set(list_models())
    assert len(list_models()) >= 31


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_published(name):
    profile = resolve_model(name)
    if profile.published_params is None:
        assert name in TEXT_ONLY_WITHOUT_COUNT
        pytest.skip(f"{name}: no published count")
    model = build_on_meta(profile.config)
    counted = counted_params(model, profile.published_counts)
    published = profile.published_params
    if published % 10_000_000:  # an exact total, not a rounded headline
        assert counted == published, f"{name}: transformers counts {counted:,}, published {published:,}"
    else:
        assert abs(counted / published - 1) < 0.01, f"{name}: transformers counts {counted:,}, published ~{published:,}"


@pytest.mark.parametrize("name", list_models())
def test_profile_metadata_is_complete(name):
    profile = resolve_model(name)
    assert profile.hf_id.count("/") == 1 and profile.family and len(profile.source) > 40
    assert "_vramplan" not in profile.config


@pytest.mark.parametrize("size", ["e2b", "e4b"])
def test_gemma4_text_config_is_the_text_only_profile(size):
    """The multimodal profile's text tower is exactly the text-only one (plus transformers' defaults spelled out)."""
    text_only = resolve_model(f"gemma-4-{size}-text").config
    text_config = resolve_model(f"gemma-4-{size}").config["text_config"]
    assert {k: text_config[k] for k in text_only} == text_only
    multimodal = build_on_meta(resolve_model(f"gemma-4-{size}").config)
    assert build_on_meta(text_only).num_parameters() == sum(p.numel() for p in multimodal.model.language_model.parameters())


@pytest.mark.skipif(not REFERENCE_STACKS.is_dir(), reason="the project's reference configs are not on this machine")
@pytest.mark.parametrize(
    "reference, profile, part",
    [
        ("gemma-4-e2b-text", "gemma-4-e2b", "text_config"),
        ("gemma-4-e4b-text", "gemma-4-e4b", "text_config"),
        ("gemma-4-e2b-text", "gemma-4-e2b-text", None),
        ("gemma-4-e4b-text", "gemma-4-e4b-text", None),
        ("llama-3.2-1b", "llama-3.2-1b", None),
        ("llama-3.1-8b", "llama-3.1-8b", None),
    ],
)
def test_profiles_agree_with_the_reference_measurements(reference, profile, part):
    ref = json.loads((REFERENCE_STACKS / f"{reference}.json").read_text())
    config = resolve_model(profile).config
    config = config[part] if part else config
    # the reference llama-3.2-1b omits rope_scaling; every key it has must agree
    assert {k: config.get(k) for k in ref} == ref
