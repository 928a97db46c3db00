"""Multimodal training, measured: Gemma 4 E2B / E4B with their towers, images and audio, next to the planner.

Random weights from the published configs (profiles/models/gemma-4-e2b.json, gemma-4-e4b.json),
synthetic images (the real Gemma 4 image processor, 280 soft tokens) and sine-wave audio (the real
feature extractor), the same preparation and loss as ``vramplan train`` (train/multimodal.py,
train/loss.py). Per config one JSON line: process memory above the CUDA context (NVML, as in
FIELD_NOTES), peak allocated, tokens/s, and the planner's predicted peak for the same plan.

    python benchmarks/multimodal.py --out results/multimodal.jsonl                 # GPU: E2B and E4B
    python benchmarks/multimodal.py --tiny --steps 2 --out /tmp/mm.jsonl          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramplan.catalog import resolve_model  # noqa: E402
from vramplan.estimate import estimate_plan  # noqa: E402
from vramplan.memory.towers import decoder_seq_len, image_soft_tokens  # noqa: E402
from vramplan.plan import Plan  # noqa: E402

#: (profile, modalities, images per example, audio seconds, train parts)
CONFIGS = [
    ("gemma-4-e2b", ("text", "image"), 1, 0.0, ("language",)),
    ("gemma-4-e2b", ("text", "image"), 1, 0.0, ("language", "vision")),
    ("gemma-4-e2b", ("text", "audio"), 0, 10.0, ("language",)),
    ("gemma-4-e4b", ("text", "image"), 1, 0.0, ("language",)),
]


def tiny_config() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from mm_fixtures import make_processor, mm_config

    return mm_config(make_processor().tokenizer)


def build_model(config_dict: dict, dtype: torch.dtype):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from vramplan.train.multimodal import fp16_safe_audio

    config = Gemma4Config(**{k: v for k, v in config_dict.items() if k not in ("model_type", "_vramplan")})
    fp16_safe_audio(config, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in 16 bits: half the host memory and time
    try:
        if torch.cuda.is_available():  # random init on the GPU is minutes faster for billions of weights
            with torch.device("cuda"):
                model = Gemma4ForConditionalGeneration(config)
            model = model.to("cpu")  # the trainer's starting point: the whole model in host memory
            torch.cuda.empty_cache()
        else:
            model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def processor_parts(tiny: bool):
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor

    from vramplan.train.mm_data import gemma4_image_processor

    if tiny:
        return gemma4_image_processor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3), Gemma4AudioFeatureExtractor(feature_size=16)
    return gemma4_image_processor(), Gemma4AudioFeatureExtractor()


def synthetic_batch(config: dict, plan: Plan, arch, tiny: bool, seed: int) -> dict:
    """Text ids around one block of soft tokens per image / clip, loss on the last quarter of the text."""
    from PIL import Image

    image_processor, features = processor_parts(tiny)
    rng = np.random.default_rng(seed)
    vocab = config["text_config"]["vocab_size"]
    low, high = (16, vocab) if tiny else (10, 250_000)  # below every image/audio special token id
    text = rng.integers(low, high, plan.seq_len).tolist()
    blocks, batch = [], {}
    if plan.images_per_example:
        # 672 x 960 px: 42 x 60 patches of 16 px, pooled 3 x 3 into exactly 14 x 20 = 280 soft tokens
        height, width = (64, 64) if tiny else (672, 960)
        images = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(plan.images_per_example)]
        out = image_processor(images, return_tensors="pt")
        batch["pixel_values"], batch["image_position_ids"] = out["pixel_values"], out["image_position_ids"]
        blocks += [[config["boi_token_id"]] + [config["image_token_id"]] * int(n) + [config["eoi_token_id"]]
                   for n in out["num_soft_tokens_per_image"]]
    if plan.audio_seconds_per_example:
        t = np.arange(int(plan.audio_seconds_per_example * 16000)) / 16000
        out = features([np.sin(2 * np.pi * 440 * t).astype(np.float32)], return_tensors="pt")
        batch["input_features"], batch["input_features_mask"] = out["input_features"], out["input_features_mask"]
        mask = out["input_features_mask"][0].numpy()
        for _ in range(2):
            mask = mask[::2][: (len(mask) - 1) // 2 + 1]
        blocks.append([config["boa_token_id"]] + [config["audio_token_id"]] * int(mask.sum()) + [config.get("eoa_token_id", config.get("eoa_token_index"))])
    ids = [2] + [tok for block in blocks for tok in block] + text
    labels = [-100] * len(ids)
    start = len(ids) - plan.seq_len // 4
    labels[start - 1:-1] = ids[start:]
    batch["input_ids"] = torch.tensor([ids] * plan.micro_batch)
    batch["labels"] = torch.tensor([labels] * plan.micro_batch)
    batch["position_ids"] = torch.arange(len(ids)).expand(plan.micro_batch, -1).clone()
    for key in ("pixel_values", "image_position_ids", "input_features", "input_features_mask"):
        if key in batch:
            batch[key] = torch.cat([batch[key]] * plan.micro_batch)
    return batch


def run(name: str, modalities, images: int, seconds: float, parts, args) -> dict:
    from vramplan.estimate import architecture
    from vramplan.train import multimodal
    from vramplan.train.loss import accumulate_gradients
    from vramplan.train.model import enable_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.tiny:
        config = tiny_config()
        profile = _profile_of(config, "tiny-gemma4-mm")
    else:
        profile = resolve_model(name)
        config = profile.config
    plan = Plan(model=profile.name, quant="nf4", lora_rank=args.rank, seq_len=args.seq, modalities=tuple(modalities),
                images_per_example=images, audio_seconds_per_example=seconds, train_parts=tuple(parts),
                optimizer="paged_adamw8bit" if on_gpu else "adamw", checkpointing="full")
    arch = architecture(profile)
    predicted = estimate_plan(plan, profile)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    from vramplan.gpu import used_memory_bytes

    torch.manual_seed(0)
    model = build_model(config, dtype)
    if on_gpu:
        torch.zeros(1, device=device)  # the CUDA context, before the baseline
        torch.cuda.synchronize()
    baseline = used_memory_bytes() if on_gpu else 0
    multimodal.prepare_multimodal(model, plan, device)
    params = multimodal.trainable_parameters(model, plan)
    for p in params:
        p.requires_grad_(True)
    enable_checkpointing(model)
    model.train()
    if on_gpu:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = {k: v.to(device) for k, v in synthetic_batch(config, plan, arch, args.tiny, 0).items()}
    times, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        loss, _ = accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss)
    measured_times = times[min(2, len(times) - 1):]
    tokens = int(batch["input_ids"].numel())
    record = {
        "model": "tiny-gemma4-mm" if args.tiny else name, "modalities": list(modalities), "images_per_example": images, "audio_seconds": seconds,
        "train_parts": list(parts), "seq_text": plan.seq_len, "seq_decoder": int(batch["input_ids"].shape[1]),
        "seq_planned": decoder_seq_len(arch, plan), "image_tokens_planned": image_soft_tokens(arch) if images else 0,
        "rank": plan.lora_rank, "steps": args.steps,
        "loss_first": losses[0], "loss_last": losses[-1], "tokens_per_s": tokens / (sum(measured_times) / len(measured_times)),
        "predicted_peak_bytes": predicted.peak_bytes, "predicted_components": predicted.components,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
    }
    if on_gpu:
        record["process_bytes"] = used_memory_bytes() - baseline
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        # the planner's peak includes the CUDA context; the process figure is above it (FIELD_NOTES convention)
        from vramplan.memory.overhead import cuda_context_bytes

        record["predicted_above_context_bytes"] = predicted.peak_bytes - cuda_context_bytes()
        record["prediction_error"] = record["predicted_above_context_bytes"] / record["process_bytes"] - 1
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return record


def _profile_of(config: dict, name: str):
    from vramplan.catalog import ModelProfile

    return ModelProfile(name=name, config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSONL file to append one line per config to")
    parser.add_argument("--seq", type=int, default=2048, help="text tokens per example (soft tokens come on top)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default=None, help="run only configs whose model name contains this")
    parser.add_argument("--config", type=int, action="append", help="run only CONFIGS[N] (repeatable): 0 E2B image, "
                        "1 E2B image + vision LoRA, 2 E2B 10 s audio, 3 E4B image")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (CPU smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 48)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = [("gemma-4-e2b", ("text", "image", "audio"), 1, 0.5, ("language", "vision", "audio"))] if args.tiny else CONFIGS
    for index, (name, modalities, images, seconds, parts) in enumerate(configs):
        if (args.only and args.only not in name) or (args.config and not args.tiny and index not in args.config):
            continue
        record = run(name, modalities, images, seconds, parts, args)
        with open(out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "predicted_components"}), flush=True)


if __name__ == "__main__":
    main()
