"""Plan.mlp_tiles: the trainer runs each gated MLP over the tokens in tiles (kernels/glu.py
TiledMLPFunction). On the same weights and batch the loss and every LoRA gradient equal the
untiled run's, with checkpointing (the tiles' inner backwards run inside its recompute); the planner
prices one tile's intermediates instead of the whole sequence's, and the speed model the extra forward."""

import pytest
import torch

from train_fixtures import gemma4_config, llama_config, models_with_data
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, estimate_plan
from vramplan.plan import Plan
from vramplan.throughput import predict_tokens_per_s, step_flops
from vramplan.train import ops
from vramplan.train.loss import summed_loss
from vramplan.train.model import load_for_training, lora_parameters

CONFIGS = {"llama": llama_config, "gemma4": gemma4_config}
IDS = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return models_with_data(tmp_path_factory.mktemp("tiles"), CONFIGS)


def _loss_and_grads(folder, name, tiles):
    plan = Plan(model=name, quant="bf16", lora_rank=4, seq_len=16, mlp_tiles=tiles)
    torch.manual_seed(0)  # the adapters' initial draws
    model, _ = load_for_training(folder, plan, torch.device("cpu"))
    mlps = [m for m in model.modules() if isinstance(m, ops.GatedMLP)]
    assert mlps and all(m.tiles == tiles for m in mlps)
    batch = {"input_ids": IDS, "labels": IDS, "position_ids": torch.arange(IDS.shape[1]).expand_as(IDS)}
    loss, _ = summed_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("name", CONFIGS)
def test_tiled_mlps_train_as_the_untiled_ones(work, name):
    want_loss, want = _loss_and_grads(work / name, name, 1)
    got_loss, got = _loss_and_grads(work / name, name, 5)  # 24 tokens in 5 tiles: uneven
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert len(got) == len(want) and any(g.abs().sum() > 0 for g in want)
    for g, w in zip(got, want):
        # fp32 sums in another order, over bf16 matmuls whose row blocks differ: one element of 128 once strayed
        # 1.3e-5 (0.1%); a lost or misplaced tile moves whole rows by their own size
        # (A's gradients are zero while B sits at its zero init: then both must be)
        assert float((g - w).norm()) <= 1e-4 * float(w.norm())
        torch.testing.assert_close(g, w, rtol=0, atol=1e-3 * float(w.abs().max()))


def test_tiles_are_refused_where_a_reducer_counts_gradients():
    with pytest.raises(VramplanError, match="mlp_tiles"):
        Plan(model="llama-3.2-1b", mlp_tiles=4, gpus=2, parallel="ddp")
    with pytest.raises(VramplanError, match="mlp_tiles"):
        Plan(model="llama-3.2-1b", mlp_tiles=4, stack="hf")
    with pytest.raises(VramplanError, match="positive whole number"):
        Plan(model="llama-3.2-1b", mlp_tiles=0)
    assert "mlp_tiles" not in Plan(model="llama-3.2-1b").to_dict()  # plan files as before the field
    tiled = Plan(model="llama-3.2-1b", mlp_tiles=4)
    assert Plan.from_dict(tiled.to_dict()) == tiled


def test_the_planner_prices_one_tile_and_the_speed_model_one_more_mlp_forward():
    profile = resolve_model("llama-3.2-1b")
    arch = architecture(profile)
    plan = Plan(model="llama-3.2-1b", seq_len=4096, head_quant="int8")
    whole, tiled = (estimate_plan(plan.replace(mlp_tiles=t), profile, resolve_gpu("h100")) for t in (1, 4))
    # Llama-3.2-1B's MLP: gate, up and their product, 3 x 8,192 bf16 values a token, and the one
    # gradient its in-place backward adds: 4 x 16 KiB a token, three quarters of it saved by 4 tiles
    saved = whole.components["activations"] - tiled.components["activations"]
    assert saved == pytest.approx(0.75 * 4096 * 4 * 8192 * 2, rel=0.05)
    assert tiled.peak_bytes < whole.peak_bytes
    extra = step_flops(arch, plan.replace(mlp_tiles=4))["mlp_tiles"]
    assert extra == pytest.approx(2 * 4096 * 16 * 3 * 2048 * 8192)
    assert predict_tokens_per_s(arch, plan.replace(mlp_tiles=4), resolve_gpu("h100")) \
        < predict_tokens_per_s(arch, plan, resolve_gpu("h100"))


def test_fit_tiles_the_mlps_before_it_offloads_the_checkpoints():
    """A budget between the untiled and the 4-tile plan (Llama-3.2-1B, 8,192 tokens, int8 head, rank 64):
    fit keeps the checkpoints on the GPU and its CUDA graphs, tiles the MLPs, and says what fewer tiles need."""
    from vramplan.fit import fit_plan

    profile = resolve_model("llama-3.2-1b")
    base = Plan(model=profile.name, seq_len=8192, head_quant="int8")
    lean = base.replace(quant="nf4", lora_rank=64, optimizer="paged_adamw8bit")
    untiled, tiled = (estimate_plan(lean.replace(mlp_tiles=t), profile).peak_bytes for t in (1, 4))
    budget = int((untiled + tiled) / 2 / (1 - 0.05))
    result = fit_plan(profile, budget=budget, base=base)
    assert result.plan.checkpointing == "full" and result.plan.mlp_tiles in (2, 4) and result.plan.cuda_graphs
    assert any(f"MLPs in {result.plan.mlp_tiles} tiles" in line for line in result.explanation)
    roomy = fit_plan(profile, budget=2 * budget, base=base)
    assert roomy.plan.mlp_tiles == 1
