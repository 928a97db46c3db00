"""Multimodal training on a tiny random Gemma4ForConditionalGeneration: images and audio, CPU."""

from __future__ import annotations

import json

import pytest
import torch

from mm_fixtures import build_mm_model, make_processor, vqa_records, write_png
from train_fixtures import write_jsonl
from vramplan.errors import VramplanError
from vramplan.plan import Plan
from vramplan.train import mm_data


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    """One short run shared by the tests: vision + audio + language LoRA, projectors trained."""
    from vramplan.train.recipe import TrainConfig, train

    root = tmp_path_factory.mktemp("mm")
    model_dir = build_mm_model(root / "model")
    data_file = write_jsonl(root / "vqa.jsonl", vqa_records(root))
    plan = Plan(model=str(model_dir), quant="bf16", lora_rank=8, seq_len=64, optimizer="adamw", modalities=("text", "image", "audio"),
                images_per_example=1, audio_seconds_per_example=0.5, train_parts=("language", "vision", "audio"), train_projectors=True)
    cfg = TrainConfig(plan=plan, model_dir=str(model_dir), data=str(data_file), output=str(root / "run"), steps=30, lr=3e-3,
                      schedule="constant", progress=False, device="cpu")
    summary = train(cfg)
    losses = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, model_dir, data_file, plan, summary, losses


@pytest.mark.slow
def test_loss_falls_on_images_and_audio(mm_run):
    _, _, _, _, summary, losses = mm_run
    assert summary["steps"] == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_adapter_loads_with_peft_and_gives_the_trainers_logits(mm_run):
    from peft import PeftModel
    from transformers import Gemma4ForConditionalGeneration

    from vramplan.train import adapter, multimodal
    from vramplan.train.loss import hidden_states, lm_head_of

    root, model_dir, data_file, plan, _, _ = mm_run
    config = json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())
    assert any("vision_tower" in t for t in config["target_modules"])
    assert any("audio_tower" in t for t in config["target_modules"])
    assert config["modules_to_save"] == ["embed_audio", "embed_vision"]

    processor = mm_data.MMProcessor.from_pretrained(model_dir)
    dataset = mm_data.build_dataset(data_file, processor, 200)
    batch = mm_data.collate([dataset.rows[0], dataset.rows[-1]], dataset.pad_token_id, processor)
    assert "pixel_values" in batch and "input_features" in batch

    ours = multimodal.load_multimodal(model_dir, torch.float32, "sdpa")
    multimodal.prepare_multimodal(ours, plan, torch.device("cpu"))
    adapter.load_lora_state_dict(ours, adapter.read_adapter_weights(root / "run" / "adapter"))
    ours.eval()
    peft_model = PeftModel.from_pretrained(Gemma4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32),
                                           str(root / "run" / "adapter")).eval()
    with torch.no_grad():
        expected = lm_head_of(ours)(hidden_states(ours, batch))
        got = peft_model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    softcap = ours.config.get_text_config().final_logit_softcapping
    expected = torch.tanh(expected / softcap) * softcap
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


def test_missing_image_is_reported_with_its_line(tmp_path):
    records = vqa_records(tmp_path)
    records[2]["messages"][0]["content"][0]["path"] = "nowhere.png"
    data_file = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(VramplanError, match=r"bad\.jsonl:3: image file .*nowhere\.png does not exist"):
        mm_data.build_dataset(data_file, make_processor(), 200)


def test_unreadable_audio_is_reported_with_its_line(tmp_path):
    records = vqa_records(tmp_path)
    (tmp_path / "tone1.wav").write_bytes(b"not a wav file")
    data_file = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(VramplanError, match=r"bad\.jsonl:6: audio file .*tone1\.wav cannot be read"):
        mm_data.build_dataset(data_file, make_processor(), 200)


def test_soft_tokens_expand_and_only_the_reply_is_trained(tmp_path):
    processor = make_processor()
    write_png(tmp_path / "a.png", (200, 0, 0))
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "describe"}]},
                           {"role": "assistant", "content": "red"}]}
    dataset = mm_data.build_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), processor, 500)
    example = dataset.rows[0][0]
    image_id = processor.token_id("image_token")
    n = example.input_ids.count(image_id)
    assert n == mm_data.image_soft_tokens(processor, [mm_data.read_image(tmp_path / "a.png")])[0] > 0
    trained = [processor.tokenizer.convert_ids_to_tokens(t) for t in example.labels if t != -100]
    assert trained == ["red", "<|end|>"]


def test_audio_mask_fill_is_finite_in_float16():
    """Gemma 4's -1e9 mask value overflows float16; fp16_safe_audio brings it (and the 1e10 clip) into range."""
    from transformers import Gemma4Config
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    from mm_fixtures import mm_config
    from vramplan.train.multimodal import fp16_safe_audio

    raw = mm_config(make_processor().tokenizer)
    config = Gemma4Config(**{k: v for k, v in raw.items() if k != "model_type"})
    scores = torch.zeros(2, 3, dtype=torch.float16)
    mask = torch.tensor([[True, False, False], [False, True, False]])
    with pytest.raises(RuntimeError, match="overflow"):
        scores.masked_fill(mask, config.audio_config.attention_invalid_logits_value)
    assert fp16_safe_audio(config, torch.float16)
    filled = scores.masked_fill(mask, config.audio_config.attention_invalid_logits_value)
    assert torch.isfinite(filled).all() and filled.min() == torch.finfo(torch.float16).min
    torch.manual_seed(0)
    tower = Gemma4AudioModel(config.audio_config).to(torch.float16).eval()
    features = torch.randn(1, 40, 16, dtype=torch.float16)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, 30:] = False  # padding: the mask path is taken
    with torch.no_grad():
        out = tower(features, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_shared_kv_stays_exact_with_checkpointing_and_images(mm_run):
    """The trainer's uncached, checkpointed path gives the cached inference logits on the multimodal model."""
    from vramplan.train import multimodal
    from vramplan.train.loss import hidden_states, lm_head_of
    from vramplan.train.model import enable_checkpointing, lora_parameters

    _, model_dir, data_file, plan, _, _ = mm_run
    processor = mm_data.MMProcessor.from_pretrained(model_dir)
    dataset = mm_data.build_dataset(data_file, processor, 200)
    batch = mm_data.collate([dataset.rows[0]], dataset.pad_token_id, processor)
    model = multimodal.load_multimodal(model_dir, torch.float32)
    multimodal.prepare_multimodal(model, plan, torch.device("cpu"), host_per_layer_embeddings=True)
    enable_checkpointing(model)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_(std=0.2)
    model.train()
    trained = lm_head_of(model)(hidden_states(model, batch))
    softcap = model.config.get_text_config().final_logit_softcapping
    trained = torch.tanh(trained / softcap) * softcap
    trained.float().logsumexp(-1).sum().backward()
    from vramplan.train.model import lora_modules

    reached = [m.lora_A.weight.grad is not None for path, m in lora_modules(model).items() if "audio_tower" not in path]
    assert reached and all(reached)  # an image row: the audio tower does not run
    model.eval()
    with torch.no_grad():
        cached = model(**{k: v for k, v in batch.items() if k not in ("labels", "position_ids")}, use_cache=True).logits
    torch.testing.assert_close(trained.detach(), cached, atol=1e-5, rtol=1e-5)


def test_towers_of_absent_modalities_stay_on_the_host(tmp_path):
    """An image plan never calls the audio tower: it is not moved to the device (the planner does not count it)."""
    from vramplan.train.multimodal import load_multimodal, unused_towers

    model = load_multimodal(build_mm_model(tmp_path / "m"), torch.float32, "sdpa")
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=64, modalities=("text", "image"), images_per_example=1)
    names = {name for name, module in model.model.named_children() if any(module is u for u in unused_towers(model, plan))}
    assert names == {"audio_tower", "embed_audio"}
    both = plan.replace(modalities=("text", "image", "audio"), audio_seconds_per_example=1.0)
    assert unused_towers(model, both) == []
