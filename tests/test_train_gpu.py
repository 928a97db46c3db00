"""The trainer on a GPU (skipped without CUDA): layer-by-layer quantized load, host-resident Gemma 4
per-layer embeddings, bf16 training with a falling loss, and memory metrics in metrics.jsonl."""

import json

import pytest
import torch

from train_fixtures import build_model, chat_records, gemma4_config, llama_config, write_jsonl
from vramplan.plan import Plan
from vramplan.train import patching
from vramplan.train.model import load_for_training
from vramplan.train.recipe import TrainConfig, train

pytestmark = pytest.mark.gpu


def test_load_quantizes_layer_by_layer_without_the_bf16_model_on_the_gpu(tmp_path):
    config = dict(llama_config(), hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4)
    folder = build_model(config, tmp_path / "m")
    linear_params = 8 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 4096)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, adapted = load_for_training(folder, Plan(model="t", seq_len=256), torch.device("cuda"))
    assert len(adapted) == 8 * 7
    peak = torch.cuda.max_memory_allocated() - before
    # all linears in bf16 would be 2 bytes/param at once; NF4 is ~0.52, plus one layer in bf16 at a time
    assert peak < 0.6 * 2 * linear_params, peak


def test_gemma4_per_layer_embeddings_stay_on_the_host_and_training_runs(tmp_path):
    folder = build_model(gemma4_config(), tmp_path / "gemma4")
    model, _ = load_for_training(folder, Plan(model="t", seq_len=64), torch.device("cuda"))
    table = model.model.embed_tokens_per_layer
    assert isinstance(table, patching.HostResidentEmbedding) and table.table.device.type == "cpu"
    assert model.model.embed_tokens.weight.device.type == "cuda"

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(24))
    plan = Plan(model="t", lora_rank=8, seq_len=64, micro_batch=2, checkpointing="offload")
    summary = train(TrainConfig(plan=plan, model_dir=str(folder), data=str(data), output=str(tmp_path / "run"),
                                steps=24, lr=1e-2, warmup_steps=2, progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 24
    assert records[0]["peak_allocated"] > 0 and records[0]["peak_reserved"] >= records[0]["peak_allocated"]
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.8 * first, (first, last)
