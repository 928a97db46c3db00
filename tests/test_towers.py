"""The planner's towers: soft tokens in the sequence, tower weights / LoRA / activations, plan fields, check."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, estimate_plan
from vramplan.memory import towers
from vramplan.plan import Plan


@pytest.fixture(scope="module")
def e2b():
    return resolve_model("gemma-4-e2b")


def test_soft_tokens_follow_gemma4s_processor(e2b):
    arch = architecture(e2b)
    assert towers.image_soft_tokens(arch) == 282  # 280 + <boi>, <eoi>
    assert towers.vision_patches_per_image(arch) == 2520  # 3 x 3 pooled 16-px patches
    assert towers.audio_soft_tokens(10) == 252  # one per 40 ms, + <boa>, <eoa>
    assert towers.audio_soft_tokens(45) == 1125 + 4  # two clips of at most 30 s
    plan = Plan(model="gemma-4-e2b", modalities=("text", "image", "audio"), images_per_example=2, audio_seconds_per_example=10)
    assert towers.decoder_seq_len(arch, plan) == 2048 + 2 * 282 + 252


def test_text_plans_keep_the_towers_off(e2b):
    est = estimate_plan(Plan(model="gemma-4-e2b"), e2b)
    assert "towers" not in est.components and "tower_activations" not in est.components


def test_images_cost_weights_tokens_and_activations(e2b):
    text = estimate_plan(Plan(model="gemma-4-e2b"), e2b)
    one = estimate_plan(Plan(model="gemma-4-e2b", modalities=("text", "image"), images_per_example=1), e2b)
    four = estimate_plan(Plan(model="gemma-4-e2b", modalities=("text", "image"), images_per_example=4), e2b)
    trained = estimate_plan(Plan(model="gemma-4-e2b", modalities=("text", "image"), images_per_example=1,
                                 train_parts=("language", "vision")), e2b)
    assert one.components["towers"] == 2 * architecture(e2b).tower_params["vision"]
    assert text.peak_bytes < one.peak_bytes < four.peak_bytes < estimate_plan(
        Plan(model="gemma-4-e2b", modalities=("text", "image"), images_per_example=4, train_parts=("language", "vision")), e2b).peak_bytes
    assert trained.components["lora_params"] > one.components["lora_params"]  # the vision tower's adapters
    assert trained.components["tower_activations"] > one.components["tower_activations"]
    assert one.phases["forward"] > text.phases["forward"]  # 282 more decoder tokens' activations


def test_tower_lora_counts_the_chosen_kinds(e2b):
    arch = architecture(e2b)
    base = dict(model="gemma-4-e2b", modalities=("text", "image"), images_per_example=1, train_parts=("vision",))
    attn = towers.tower_lora_params(arch, Plan(**base, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    both = towers.tower_lora_params(arch, Plan(**base))
    # 16 layers x r16 x (4 x (768 + 768)) for attention
    assert attn == 16 * 16 * 4 * (768 + 768)
    assert both == attn + 16 * 16 * 3 * (768 + 3072)


@pytest.mark.parametrize("fields, message", [
    ({"images_per_example": 1}, "no 'image' modality"),
    ({"modalities": ("text", "video")}, "modalities"),
    ({"modalities": ("text", "image"), "train_parts": ("audio",)}, "--train audio needs the audio tower"),
    ({"modalities": ("text", "audio"), "audio_seconds_per_example": -1}, "audio_seconds_per_example"),
    ({"train_projectors": True}, "projectors"),
])
def test_plan_validates_multimodal_fields(fields, message):
    with pytest.raises(VramplanError, match=message):
        Plan(model="m", **fields)


def test_plan_round_trips_and_reads_vision_as_image():
    plan = Plan(model="m", modalities=("text", "vision"), images_per_example=2, train_parts=("language", "vision"))
    assert plan.modalities == ("text", "image") and plan.multimodal
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_fit_cli_plans_images(tmp_path):
    from vramplan.cli import main

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["fit", "gemma-4-e2b", "--gpu", "rtx-4060", "--modalities", "text,image",
                                       "--images-per-example", "1", "--seq", "2048", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "+ 282 soft tokens" in result.output
    plan = json.loads(out.read_text())["plan"]
    assert plan["modalities"] == ["text", "image"] and plan["images_per_example"] == 1


def test_check_counts_each_examples_real_soft_tokens(tmp_path):
    from mm_fixtures import build_mm_model, vqa_records

    from vramplan.check import check_plan
    from vramplan.train.mm_data import MMProcessor

    model_dir = build_mm_model(tmp_path / "model")
    records = vqa_records(tmp_path)
    profile = resolve_model(str(model_dir))
    plan = Plan(model=str(model_dir), seq_len=32, modalities=("text", "image", "audio"), images_per_example=1,
                audio_seconds_per_example=0.5)
    processor = MMProcessor.from_pretrained(model_dir)
    result = check_plan(plan, profile, records, processor, None, 10**12, data_path=str(tmp_path / "d.jsonl"))
    # an image example: its rendered text with one placeholder, which becomes <boi> + n soft tokens + <eoi>
    from PIL import Image

    from vramplan.train import data

    text_ids, _ = data._tokenize_messages(records[0]["messages"], processor.tokenizer)
    with Image.open(tmp_path / "img0.png") as image:
        n = processor.image_processor([image.convert("RGB")], return_tensors="np")["num_soft_tokens_per_image"][0]
    assert n > 0
    assert result.worst.width == len(text_ids) - 1 + n + 2
    shaped = result.estimate.plan  # priced as that example: its text tokens and its one image
    assert (shaped.seq_len, shaped.images_per_example, shaped.audio_seconds_per_example) == (len(text_ids) - 1, 1, 0.0)


def test_targets_in_unsloths_words():
    assert towers.lora_targets_from("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert towers.lora_targets_from("mlp,q_proj") == ("gate_proj", "up_proj", "down_proj", "q_proj")
    assert towers.target_kinds(towers.lora_targets_from("attention,mlp")) == ("attention", "mlp")
