"""Training data with images and audio: chat messages whose content holds image / audio parts.

A line looks like ``{"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
{"type": "text", "text": "What is this?"}]}, {"role": "assistant", "content": "A cat."}]}``; paths
are relative to the JSONL file. Every image and clip is opened while the data is read, so a missing
or unreadable file is reported with its line number before any model loads.

Rendering follows Gemma 4's processor (transformers ``processing_gemma4.py``): the chat template
writes one placeholder token per image / clip; each becomes ``<boi>`` + n × ``<image>`` + ``<eoi>``
(``<boa>`` … ``<eoa>`` for audio), n being the soft tokens the image processor / the feature
extractor's mask give. The processor's own class is not needed, only its parts (tokenizer, image
processor, feature extractor): ``Gemma4Processor`` also wants the video processor, which needs
torchvision. Loss falls on the assistant text only (``data._tokenize_messages``).

Examples are not packed: each row is one example, so the row's pixel values and audio features
line up with its placeholder tokens in order.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vramplan.errors import VramplanError
from vramplan.train import data

MEDIA = ("image", "audio")


@dataclass
class MMExample(data.Example):
    images: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)


@dataclass
class MMProcessor:
    """The parts of a Gemma 4 processor that training needs, loaded from the model folder."""

    tokenizer: object
    image_processor: object | None
    feature_extractor: object | None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MMProcessor":
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

        def optional(loader):
            try:
                return loader.from_pretrained(folder)
            except (OSError, ValueError):
                return None

        return cls(AutoTokenizer.from_pretrained(folder), optional(AutoImageProcessor), optional(AutoFeatureExtractor))

    def token_id(self, name: str) -> int:
        token = getattr(self.tokenizer, name, None)
        if token is None:
            raise VramplanError(f"the model's tokenizer has no {name}; a Gemma 4 multimodal tokenizer names it")
        return self.tokenizer.convert_tokens_to_ids(token)


def media_parts(record: dict) -> list[dict]:
    parts = []
    for message in record.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") in MEDIA]
    return parts


def read_audio(path: Path, sampling_rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file as mono float32 in [-1, 1] (stdlib ``wave``; soundfile is not needed)."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2:
            raise ValueError("only 16-bit PCM WAV is read; convert it (e.g. ffmpeg -acodec pcm_s16le)")
        if handle.getframerate() != sampling_rate:
            raise ValueError(f"it is {handle.getframerate()} Hz; resample it to {sampling_rate} Hz")
        frames = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
        channels = handle.getnchannels()
    samples = frames.reshape(-1, channels).mean(axis=1) if channels > 1 else frames
    return (samples.astype(np.float32) / 32768.0)


def read_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def image_soft_tokens(processor: MMProcessor, images: list) -> list[int]:
    out = processor.image_processor(images, return_tensors="np")
    return [int(n) for n in out["num_soft_tokens_per_image"]]


def audio_soft_tokens(processor: MMProcessor, clips: list[np.ndarray]) -> list[int]:
    """Soft tokens per clip: the feature mask subsampled by the tower's two stride-2 convolutions."""
    out = processor.feature_extractor(clips, return_tensors="np")
    counts = []
    for mask in out["input_features_mask"]:
        for _ in range(2):
            mask = mask[::2][: (len(mask) - 1) // 2 + 1]
        counts.append(int(mask.sum()))
    return counts


def _load_media(record: dict, base: Path, where: str, processor: MMProcessor) -> tuple[list[Path], list[Path], list, list]:
    image_paths, audio_paths, images, clips = [], [], [], []
    for part in media_parts(record):
        kind, raw = part["type"], part.get("path")
        if not isinstance(raw, str) or not raw:
            raise VramplanError(f"{where}: an {kind} part needs a 'path' (relative to the JSONL file)")
        path = base / raw
        if not path.is_file():
            raise VramplanError(f"{where}: {kind} file {path} does not exist; fix the path (relative to the JSONL file)")
        try:
            if kind == "image":
                if processor.image_processor is None:
                    raise ValueError("the model folder has no image processor")
                images.append(read_image(path))
                image_paths.append(path)
            else:
                if processor.feature_extractor is None:
                    raise ValueError("the model folder has no audio feature extractor")
                clips.append(read_audio(path, processor.feature_extractor.sampling_rate))
                audio_paths.append(path)
        except Exception as err:  # PIL, wave and numpy each raise their own types for a bad file
            raise VramplanError(f"{where}: {kind} file {path} cannot be read ({err})") from None
    return image_paths, audio_paths, images, clips


def expand_placeholders(ids: list[int], train: list[bool], placeholder: int, begin: int, end: int,
                        counts: list[int], kind: str, where: str) -> tuple[list[int], list[bool]]:
    """Each placeholder token -> begin + n × placeholder + end (never trained on)."""
    found = ids.count(placeholder)
    if found != len(counts):
        raise VramplanError(f"{where}: the chat template wrote {found} {kind} placeholder(s) for {len(counts)} {kind} part(s); "
                            "the model's chat template must render each part")
    out_ids, out_train, k = [], [], 0
    for tok, keep in zip(ids, train):
        if tok == placeholder:
            block = [begin] + [placeholder] * counts[k] + [end]
            out_ids += block
            out_train += [False] * len(block)
            k += 1
        else:
            out_ids.append(tok)
            out_train.append(keep)
    return out_ids, out_train


def build_dataset(path: str | Path, processor: MMProcessor, seq_len: int, overlong: str = "truncate",
                  records: list[dict] | None = None) -> data.Dataset:
    """Read, open every image and clip, render, expand the soft tokens; one example per row."""
    path = Path(path)
    records = records if records is not None else data.read_jsonl(path)
    tok = processor.tokenizer
    examples, truncated, dropped = [], 0, 0
    for number, record in enumerate(records, start=1):
        where = f"{path}:{number}"
        image_paths, audio_paths, images, clips = _load_media(record, path.parent, where, processor)
        if "messages" not in record:
            ids, train = data.tokenize(record, tok)
        else:
            ids, train = data._tokenize_messages(record["messages"], tok)
        if images or getattr(tok, "image_token", None) is not None and processor.token_id("image_token") in ids:
            ids, train = expand_placeholders(ids, train, processor.token_id("image_token"), processor.token_id("boi_token"),
                                             processor.token_id("eoi_token"),
                                             image_soft_tokens(processor, images) if images else [], "image", where)
        if clips or getattr(tok, "audio_token", None) is not None and processor.token_id("audio_token") in ids:
            ids, train = expand_placeholders(ids, train, processor.token_id("audio_token"), processor.token_id("boa_token"),
                                             processor.token_id("eoa_token"),
                                             audio_soft_tokens(processor, clips) if clips else [], "audio", where)
        if len(ids) > seq_len:
            media_end = _last_media_token(ids, processor) + 1
            if overlong == "drop" or media_end > seq_len:
                dropped += 1  # a cut through an image's soft tokens would leave the tower's output nowhere to go
                continue
            ids, train = ids[:seq_len], train[:seq_len]
            truncated += 1
        base = data.to_example(ids, train)
        example = MMExample(input_ids=base.input_ids, labels=base.labels, images=image_paths, audio=audio_paths)
        if any(label != data.IGNORE for label in example.labels):
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        raise VramplanError(f"{path}: no example has a target token left at {seq_len} tokens; raise --seq")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return data.Dataset(rows=[[e] for e in examples], seq_len=seq_len, pad_token_id=pad, n_examples=len(examples),
                        n_truncated=truncated, n_dropped=dropped,
                        n_target_tokens=sum(data.count_targets(e) for e in examples))


def _last_media_token(ids: list[int], processor: MMProcessor) -> int:
    media = set()
    for name in ("eoi_token", "eoa_token"):
        if getattr(processor.tokenizer, name, None) is not None:
            media.add(processor.token_id(name))
    return max((i for i, t in enumerate(ids) if t in media), default=-1)


def collate(rows: list[list[MMExample]], pad_token_id: int, processor: MMProcessor) -> dict[str, torch.Tensor]:
    """Token tensors as for text, plus the rows' pixel values and audio features, in placeholder order."""
    batch = data.collate(rows, pad_token_id)
    images = [read_image(p) for row in rows for e in row for p in getattr(e, "images", [])]
    clips = [read_audio(p, processor.feature_extractor.sampling_rate)
             for row in rows for e in row for p in getattr(e, "audio", [])]
    if images:
        out = processor.image_processor(images, return_tensors="pt")
        batch["pixel_values"] = out["pixel_values"]
        batch["image_position_ids"] = out["image_position_ids"]
    if clips:
        out = processor.feature_extractor(clips, return_tensors="pt")
        batch["input_features"] = out["input_features"]
        batch["input_features_mask"] = out["input_features_mask"]
    return batch


def gemma4_image_processor(**settings):
    """Gemma 4's image processor: the PIL one (no torchvision needed) where this transformers has it."""
    try:
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil as cls
    except ImportError:
        from transformers.models.gemma4 import Gemma4ImageProcessor as cls
    return cls(**settings)


def media_token_count(example: data.Example, processor: MMProcessor) -> int:
    """Tokens of an example that the towers fill in or that frame them (soft tokens, begin/end markers)."""
    names = ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token")
    ids = {processor.token_id(n) for n in names if getattr(processor.tokenizer, n, None) is not None}
    return sum(t in ids for t in example.input_ids)
