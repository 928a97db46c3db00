"""A tiny random Gemma4ForConditionalGeneration with a processor of real Gemma 4 parts, plus media files.

Everything is built here: a word-level tokenizer with the image/audio special tokens, the real
Gemma4ImageProcessorPil (4-px patches, 70 soft tokens at most) and Gemma4AudioFeatureExtractor
(16 mel bins: the tower reads as many bins as its first conv has channels), PNGs from numpy and 16 kHz sine waves written with the stdlib ``wave`` module.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import torch

from train_fixtures import INIT, SENTENCES, SPECIALS, gemma4_config

MM_TOKENS = {"image_token": "<|image|>", "boi_token": "<|boi|>", "eoi_token": "<|eoi|>",
             "audio_token": "<|audio|>", "boa_token": "<|boa|>", "eoa_token": "<|eoa|>"}
WORDS = sorted({w for s in SENTENCES for w in s.split()} | {"describe", "listen", "red", "blue", "high", "low", "tone"})
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|image|> {% elif p['type'] == 'audio' %}<|audio|> "
    "{% else %}{{ p['text'] }} {% endif %}{% endfor %}{% endif %}<|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(MM_TOKENS.values()) + ["<|video|>"] + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", extra_special_tokens=MM_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_processor():
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor

    from vramplan.train.mm_data import gemma4_image_processor

    from vramplan.train.mm_data import MMProcessor

    return MMProcessor(make_tokenizer(), gemma4_image_processor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3),
                       Gemma4AudioFeatureExtractor(feature_size=16))


def mm_config(tok) -> dict:
    text = gemma4_config()
    text["vocab_size"] = text["vocab_size_per_layer_input"] = len(tok)
    ids = {name.replace("_token", "_token_id"): tok.convert_tokens_to_ids(t) for name, t in MM_TOKENS.items()}
    ids["eoa_token_index"] = ids["eoa_token_id"]
    return {
        "model_type": "gemma4", "text_config": text, "tie_word_embeddings": True, "initializer_range": INIT,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "pooling_kernel_size": 3,
                          "position_embedding_size": 64, "model_type": "gemma4_vision"},
        "audio_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "model_type": "gemma4_audio",
                         "subsampling_conv_channels": [16, 4], "output_proj_dims": 48},
        "vision_soft_tokens_per_image": 70, "video_token_id": tok.convert_tokens_to_ids("<|video|>"), **ids,
    }


def build_mm_model(folder: Path, seed: int = 0) -> Path:
    """The random model and its processor parts saved as a local Hugging Face folder."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    processor = make_processor()
    config = Gemma4Config(**{k: v for k, v in mm_config(processor.tokenizer).items() if k != "model_type"})
    config.text_config.initializer_range = INIT
    Gemma4ForConditionalGeneration(config).save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    # image processor and feature extractor both write preprocessor_config.json: nest the image one
    image = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": image}))
    (folder / "preprocessor_config.json").unlink()
    processor.feature_extractor.save_pretrained(folder)
    return folder


def write_png(path: Path, color: tuple[int, int, int], seed: int = 0, size=(40, 56)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (*size, 3)), 0, 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def write_wav(path: Path, hz: float, seconds: float = 0.5, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return path


def vqa_records(folder: Path) -> list[dict]:
    """Red / blue images and high / low tones, each with the answer that names it."""
    records = []
    for i, (color, word) in enumerate([((220, 30, 30), "red"), ((30, 30, 220), "blue")] * 2):
        write_png(folder / f"img{i}.png", color, seed=i)
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"img{i}.png"}, {"type": "text", "text": "describe"}]},
            {"role": "assistant", "content": f"{word} the answer"}]})
    for i, (hz, word) in enumerate([(1800, "high"), (200, "low")]):
        write_wav(folder / f"tone{i}.wav", hz)
        records.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "path": f"tone{i}.wav"}, {"type": "text", "text": "listen"}]},
            {"role": "assistant", "content": f"{word} tone"}]})
    return records
