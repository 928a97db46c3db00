"""MoE models train with the routed experts frozen in NF4 (one NF4 tensor per expert matrix, not
adapted): LoRA on attention, and the planner prices the experts as the trainer holds them."""

import pytest
import torch

from train_fixtures import build_model, gemma4_config, llama_config
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, estimate_plan
from vramplan.memory.weights import dense_bytes
from vramplan.plan import Plan
from vramplan.train.experts import NF4Experts, check_layout
from vramplan.train.loss import summed_loss
from vramplan.train.model import load_for_training, lora_parameters, lora_modules
from vramplan.train.ops import dequantize_nf4


def qwen3_moe_config() -> dict:
    return dict(llama_config(), model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])


def gemma4_moe_config() -> dict:
    """Gemma 4 26B-A4B's layer shrunk: a routed expert block beside the dense MLP."""
    return dict(gemma4_config(num_kv_shared_layers=0), enable_moe_block=True, num_experts=4, top_k_experts=2,
                moe_intermediate_size=24, hidden_size_per_layer_input=0, use_double_wide_mlp=False)


def hf_experts(family: str, experts: int = 6):
    """A transformers fused experts module with random weights (std 0.2: products well above rounding)."""
    from transformers import AutoConfig

    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
        config = AutoConfig.for_model(**dict(qwen3_moe_config(), num_experts=experts))
    else:
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts as Experts
        config = AutoConfig.for_model(**dict(gemma4_moe_config(), num_experts=experts))
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    module = Experts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.2)
        module.down_proj.normal_(0, 0.2)
    return module


def reference_skips_the_elsewhere_slot(family: str) -> bool:
    """Whether transformers' own experts accept the index ``num_experts`` (asked on the CPU, where a
    bad index raises instead of poisoning the CUDA context)."""
    experts = hf_experts(family)
    index = torch.full((1, 1), experts.num_experts)
    try:
        experts(torch.zeros(1, experts.hidden_dim), index, torch.ones(1, 1))
    except (RuntimeError, IndexError):
        return False
    return True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", ["qwen3_moe", "gemma4"])
def test_nf4_experts_compute_what_transformers_computes_with_the_dequantized_weights(family, device):
    """On the GPU too (the Triton decode, and the installed transformers' experts module: 5.17 there)."""
    original = hf_experts(family).to(device)
    quantized = NF4Experts.from_hf(original, torch.device(device))
    assert quantized.nbytes() < original.gate_up_proj.numel() + original.down_proj.numel()  # ~4.1 bits a weight
    with torch.no_grad():  # the reference: the original module holding exactly the NF4-decoded weights
        for e in range(quantized.num_experts):
            original.gate_up_proj[e] = dequantize_nf4(quantized.gate_up[e])
            original.down_proj[e] = dequantize_nf4(quantized.down[e])
    generator = torch.Generator().manual_seed(1)
    tokens, k = 20, 2
    # experts 0..4 routed, 5 never (it is skipped), and one slot sent to expert parallelism's "elsewhere" (6)
    # where the installed transformers knows that slot (5.17's experts index past their end with it)
    index = torch.stack([torch.randperm(5, generator=generator)[:k] for _ in range(tokens)])
    if reference_skips_the_elsewhere_slot(family):
        index[3, 1] = quantized.num_experts
    weights = torch.rand(tokens, k, generator=generator).to(device).requires_grad_()
    hidden = torch.randn(tokens, original.hidden_dim, generator=generator).to(device).requires_grad_()
    index = index.to(device)
    expected, got = original(hidden, index, weights), quantized(hidden, index, weights)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=generator).to(device)
    expected_grads = torch.autograd.grad(expected, (hidden, weights), grad)
    got_grads = torch.autograd.grad(got, (hidden, weights), grad)
    for g, e in zip(got_grads, expected_grads):
        assert e.abs().max() > 0.1
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_an_experts_module_laid_out_otherwise_is_refused_with_the_fix():
    experts = hf_experts("qwen3_moe")
    experts.is_transposed = True
    with pytest.raises(VramplanError, match="quant to bf16"):
        check_layout(experts)


def train_steps(folder, steps: int = 6) -> tuple[torch.nn.Module, list[str], list[float]]:
    model, adapted = load_for_training(folder, Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24),
                                       torch.device("cpu"))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(24).expand(2, -1)}
    losses = []
    for _ in range(steps):
        loss, n_targets = summed_loss(model, batch)
        (loss / n_targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss / n_targets).item())
    return model, adapted, losses


@pytest.mark.parametrize("config", [qwen3_moe_config, gemma4_moe_config], ids=["qwen3_moe", "gemma4"])
def test_a_tiny_moe_trains_its_attention_adapters_with_the_experts_frozen_in_nf4(config, tmp_path):
    model, adapted, losses = train_steps(build_model(config(), tmp_path / "moe"))
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    assert len(experts) == model.config.num_hidden_layers
    assert not [name for name, _ in model.named_parameters() if "gate_up_proj" in name]
    assert adapted and not [path for path in adapted if "experts" in path]
    assert all(m.lora_A.weight.grad is None for m in lora_modules(model).values())  # zeroed by the loop
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_plans_keep_the_experts_as_transformers_holds_them(tmp_path):
    folder = build_model(qwen3_moe_config(), tmp_path / "moe")
    model, _ = load_for_training(folder, Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=24), torch.device("cpu"))
    assert not [m for m in model.modules() if isinstance(m, NF4Experts)]
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert experts and all(not p.requires_grad for p in experts)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gemma-4-26b-a4b"])
def test_the_planner_prices_the_experts_as_the_trainer_holds_them(model):
    profile = resolve_model(model)
    arch = architecture(profile)
    nf4 = estimate_plan(Plan(model=model, quant="nf4"), profile)
    bf16 = estimate_plan(Plan(model=model, quant="bf16"), profile)
    assert bf16.components["experts"] == dense_bytes(arch.expert_params, 2)
    # NF4: ~4.13 bits a weight for the expert matrices, the router in bf16
    assert 0.25 < nf4.components["experts_nf4"] / bf16.components["experts"] < 0.27
    assert any("experts" in note and "NF4" in note for note in nf4.notes)
    # the routed expert's pair of decode buffers, kept from the first step
    largest = max(3 * arch.hidden_size * layer.expert_intermediate for layer in arch.layers)
    assert nf4.components["expert_dequant_buffers"] == 2 * largest
    assert "expert_dequant_buffers" not in bf16.components and "experts" not in nf4.components


def test_fsdp_shards_bf16_experts_but_every_rank_holds_the_nf4_ones_whole():
    profile = resolve_model("qwen3-30b-a3b")
    one = estimate_plan(Plan(model="qwen3-30b-a3b", quant="nf4"), profile)
    fsdp = estimate_plan(Plan(model="qwen3-30b-a3b", quant="nf4", parallel="fsdp", gpus=2), profile)
    assert fsdp.components["experts_nf4"] == one.components["experts_nf4"]
    bf16 = estimate_plan(Plan(model="qwen3-30b-a3b", quant="bf16", parallel="fsdp", gpus=2), profile)
    assert "experts" not in bf16.components  # inside sharded_weights
