"""MoE models train with the experts frozen as transformers holds them (fused 3-D tensors, not
linears): LoRA on attention, the experts neither quantized nor adapted, and the planner prices
them that way."""

import torch

from train_fixtures import build_model, llama_config
from vramplan.catalog import resolve_model
from vramplan.estimate import architecture, estimate_plan
from vramplan.plan import Plan
from vramplan.train.loss import summed_loss
from vramplan.train.model import load_for_training, lora_modules


def test_a_tiny_qwen3_moe_trains_its_attention_adapters_with_experts_frozen(tmp_path):
    config = dict(llama_config(), model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
    folder = build_model(config, tmp_path / "moe")
    model, adapted = load_for_training(folder, Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24),
                                       torch.device("cpu"))
    assert adapted and all(".self_attn." in path for path in adapted)
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert experts and all(not p.requires_grad for p in experts)
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(24)[None]}
    loss, n_targets = summed_loss(model, batch)
    (loss / n_targets).backward()
    assert torch.isfinite(loss)
    assert all(m.lora_A.weight.grad is not None for m in lora_modules(model).values())


def test_the_planner_prices_the_experts_as_the_trainer_holds_them():
    profile = resolve_model("qwen3-30b-a3b")
    arch = architecture(profile)
    est = estimate_plan(Plan(model="qwen3-30b-a3b", quant="nf4"), profile)
    assert est.components["experts"] == 2 * arch.expert_params
    assert any("MoE experts" in note for note in est.notes)
