"""The trainer on a GPU (skipped without CUDA): layer-by-layer quantized load, host-resident Gemma 4
per-layer embeddings, bf16 training with a falling loss, and memory metrics in metrics.jsonl."""

import json

import pytest
import torch

from train_fixtures import (build_model, chat_records, gemma4_config, llama_config, unpacked_and_packed_steps,
                            write_jsonl)
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


def _train_steps(model, params, batches, graphs, flat=False):
    from vramplan.train.loss import accumulate_gradients
    from vramplan.train.recipe import make_optimizer

    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    optimizer, _ = make_optimizer(params, plan, 1e-3, 0.0, torch.device("cuda"), flat=flat)
    losses = []
    for micro_batches in batches:
        loss, _ = accumulate_gradients(model, micro_batches, graphs=graphs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)
        losses.append(loss)
    return losses


@pytest.mark.parametrize("arch,flat", [("llama", False), ("gemma4", False), ("llama", True)])
def test_cuda_graph_steps_train_like_eager_steps(tmp_path, arch, flat):
    """Same model, same data, eager and through captured graphs (two shapes, one packed, two
    micro-batches a step): the losses and the adapters after six optimizer steps agree. ``flat``:
    the adapters stepped as one flat tensor, their gradients summed into it by the backward."""
    from vramplan.train.graphs import StepGraphs
    from vramplan.train.model import lora_parameters

    folder = build_model(llama_config() if arch == "llama" else gemma4_config(), tmp_path / arch)
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    batches = unpacked_and_packed_steps()  # the same data each step: the loss must fall
    results = []
    for use_graphs in (False, True):
        torch.manual_seed(0)  # the same random adapters (A) in both runs
        model, _ = load_for_training(folder, plan, torch.device("cuda"))
        params = lora_parameters(model)
        graphs = StepGraphs(model, params) if use_graphs else None
        losses = _train_steps(model, params, batches, graphs, flat)
        results.append((losses, [p.detach().float().cpu() for p in params], graphs))
    (eager_losses, eager_params, _), (graph_losses, graph_params, graphs) = results
    assert graphs.notes == []
    assert sum(g is not None for g in graphs.graphs.values()) == 2
    # each shape's first pass is eager, every later one a replay
    assert (graphs.eager_runs, graphs.replays) == (2, 10)
    assert graphs.summary().startswith("CUDA graphs: 2 shapes captured; 10 of 12")
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=2e-3, atol=2e-3)
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    assert graph_losses[-1] < graph_losses[0]


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_graph_body_makes_no_host_sync(tmp_path, arch):
    """A CUDA graph capture may hold no host sync: the body runs once with torch's sync debugger
    set to raise, which names the first synchronizing call if one creeps in."""
    from vramplan.train.graphs import StaticInputs, StepGraphs, graph_safe_checkpoints, packing_decided
    from vramplan.train.model import lora_parameters

    folder = build_model(llama_config() if arch == "llama" else gemma4_config(), tmp_path / arch)
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    model, _ = load_for_training(folder, plan, torch.device("cuda"))
    params = lora_parameters(model)
    ids = torch.randint(4, 300, (2, 24), device="cuda")
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1), "position_ids": torch.arange(24, device="cuda").expand(2, -1)}
    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    static.fill(embeds, per_layer, batch, torch.tensor(40.0, device="cuda"))
    graphs._grads_in_place()
    with packing_decided(False), graph_safe_checkpoints(model):
        graphs.body(static)  # warm: compiles and autotunes outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphs.body(static)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_fp16_steps_scale_their_loss_and_train_like_bf16_steps(tmp_path, arch):
    """fp16 arithmetic, which fit plans on GPUs without bf16 (T4, V100): the same run as bf16 (CUDA graphs on) with the
    trainer's dynamic loss scaling. Its losses stay finite and fall as bf16's do; every step updates (a backward
    whose gradients overflowed runs again at half the scale), and the scale and the overflows are logged each step."""
    import math

    folder = build_model(llama_config() if arch == "llama" else gemma4_config(), tmp_path / arch)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(24))
    runs = {}
    for dtype in ("bf16", "fp16"):
        plan = Plan(model="t", lora_rank=8, seq_len=64, micro_batch=2, checkpointing="full", compute_dtype=dtype)
        summary = train(TrainConfig(plan=plan, model_dir=str(folder), data=str(data), output=str(tmp_path / dtype),
                                    steps=24, lr=1e-2, warmup_steps=2, progress=False))
        assert summary["steps"] == 24
        runs[dtype] = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    fp16, bf16 = runs["fp16"], runs["bf16"]
    assert all("loss_scale" not in r for r in bf16) and all(r["loss_scale"] >= 1 for r in fp16)
    assert all(math.isfinite(r["loss"]) for r in fp16)
    assert all(math.isfinite(r["grad_norm"]) for r in fp16)
    assert fp16[-1]["loss_scale_overflows"] <= 16  # 2^16 down to 1 at the most (session 19, skipping: 8 steps)
    mean = lambda records: sum(r["loss"] for r in records) / len(records)  # noqa: E731
    assert mean(fp16[-3:]) < 0.8 * mean(fp16[:3])
    assert mean(fp16[-3:]) == pytest.approx(mean(bf16[-3:]), rel=0.15)
