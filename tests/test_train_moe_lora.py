"""LoRA on the routed experts (plan targets ``experts.gate_up_proj`` / ``experts.down_proj``): the
base stays NF4 and frozen, each expert gets PEFT ParamWrapper's pair, gradients match autograd
through a plain reference, the loss falls, and the saved adapter loads in PEFT with the same logits."""

import json

import pytest
import torch

from test_train_moe import gemma4_moe_config, hf_experts, qwen3_moe_config
from train_fixtures import build_model
from vramplan.arch import from_config
from vramplan.errors import VramplanError
from vramplan.memory.adapters import expert_lora_param_count, lora_param_count
from vramplan.memory.towers import lora_targets_from
from vramplan.plan import EXPERT_TARGETS, Plan
from vramplan.train import adapter, ops
from vramplan.train.experts import NF4Experts, peft_delta
from vramplan.train.loss import summed_loss
from vramplan.train.model import load_base_model, load_for_training, lora_parameters

CONFIGS = {"qwen3_moe": qwen3_moe_config, "gemma4": gemma4_moe_config}
ATTENTION = ("q_proj", "v_proj")


def adapted_experts(family: str, rank: int = 3, device: str = "cpu"):
    """NF4 experts with random nonzero adapters on both fused matrices (B starts at zero otherwise)."""
    experts = NF4Experts.from_hf(hf_experts(family).to(device), torch.device(device))
    experts.add_lora(EXPERT_TARGETS, rank, 2 * rank, torch.float32)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in experts.loras().values():
            for p in (lora.A, lora.B):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return experts


def reference(experts: NF4Experts, hidden, index, weights, factors):
    """Token by token: the dequantized weights plus each expert's explicit scale·B_e·A_e."""
    (ga, gb), (da, db) = factors
    gate_up = torch.stack([ops.dequantize_nf4(q) for q in experts.gate_up])
    down = torch.stack([ops.dequantize_nf4(q) for q in experts.down])
    rows = []
    for t in range(hidden.shape[0]):
        row = torch.zeros_like(hidden[t])
        for j in range(index.shape[1]):
            e = index[t, j]
            gate, up = ((gate_up[e] + experts.scaling * gb[e] @ ga[e]) @ hidden[t]).chunk(2)
            row = row + weights[t, j] * ((down[e] + experts.scaling * db[e] @ da[e]) @ (experts.act_fn(gate) * up))
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", CONFIGS)
def test_expert_lora_gradients_equal_autograd_through_the_plain_reference(family, device):
    """On the GPU too (the Triton NF4 decode into the shared buffers), in fp32."""
    experts = adapted_experts(family, device=device)
    generator = torch.Generator().manual_seed(1)
    tokens, k = 16, 2
    # expert 5: never routed
    index = torch.stack([torch.randperm(5, generator=generator)[:k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, k, generator=generator).to(device).requires_grad_()
    hidden = torch.randn(tokens, experts.hidden_dim, generator=generator).to(device).requires_grad_()
    ours = [hidden, weights] + [p for lora in experts.loras().values() for p in (lora.A, lora.B)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    got = experts(hidden, index, weights)
    expected = reference(experts, theirs[0], index, theirs[1], [theirs[2:4], theirs[4:6]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=generator).to(device)
    for name, g, e in zip(("hidden", "weights", "gate_up A", "gate_up B", "down A", "down B"),
                          torch.autograd.grad(got, ours, grad), torch.autograd.grad(expected, theirs, grad)):
        assert e.abs().max() > 0.1, name
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4 * e.abs().max().item(), msg=name)
    # expert 5, never routed, gets a zero gradient (as through PEFT's delta)
    assert (torch.autograd.grad(experts(hidden, index, weights), experts.down_lora.B, grad)[0][5] == 0).all()


def test_the_stored_pair_is_peft_paramwrappers_layout():
    """PEFT's own ParamWrapper on the transformers experts, given our pair in its layout, adds our delta."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import ParamWrapper

    experts = adapted_experts("qwen3_moe")
    hf = hf_experts("qwen3_moe")
    config = LoraConfig(r=3, lora_alpha=6, target_parameters=["gate_up_proj"])
    wrapper = ParamWrapper(hf, "default", parameter_name="gate_up_proj", config=config, r=3, lora_alpha=6)
    a, b = experts.gate_up_lora.to_peft()
    assert wrapper.lora_A["default"].weight.shape == a.shape and wrapper.lora_B["default"].weight.shape == b.shape
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(a)
        wrapper.lora_B["default"].weight.copy_(b)
    ours = experts.scaling * torch.bmm(experts.gate_up_lora.B, experts.gate_up_lora.A)
    torch.testing.assert_close(wrapper.get_delta_weight("default"), ours)
    torch.testing.assert_close(peft_delta(a, b, experts.num_experts, experts.scaling), ours)


def plan(**changes):
    return Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, lora_targets=ATTENTION + EXPERT_TARGETS, **changes)


def batch():
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(24).expand(2, -1)}


def dequantized_base(folder, model, quantized=ATTENTION):
    """The plain fp32 transformers model holding the weights our model trained over (NF4 decoded;
    ``quantized``: the linears our model holds in NF4, its LoRA targets)."""
    base = load_base_model(folder, torch.float32).eval()
    with torch.no_grad():
        for path, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and path.rpartition(".")[2] in quantized:
                module.weight.copy_(ops.dequantize_nf4(ops.quantize_nf4(module.weight), torch.float32))
        for path, module in model.named_modules():
            if isinstance(module, NF4Experts):
                fused = base.get_submodule(path)
                fused.gate_up_proj.copy_(torch.stack([ops.dequantize_nf4(q) for q in module.gate_up]))
                fused.down_proj.copy_(torch.stack([ops.dequantize_nf4(q) for q in module.down]))
    return base


@pytest.mark.parametrize("family", CONFIGS)
def test_a_tiny_moe_trains_its_expert_adapters_and_peft_loads_them(family, tmp_path):
    folder = build_model(CONFIGS[family](), tmp_path / "moe")
    model, adapted = load_for_training(folder, plan(), torch.device("cpu"))
    layers = model.config.num_hidden_layers
    assert len([p for p in adapted if p.endswith("experts.gate_up_proj")]) == layers
    expert_params = [p for m in model.modules() if isinstance(m, NF4Experts) for p in m.parameters()]
    assert len(expert_params) == 4 * layers and all(p.requires_grad for p in expert_params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(model))
    # the planner's count: the same number, from the config alone
    arch = from_config(json.loads((folder / "config.json").read_text()))
    assert lora_param_count(arch, 4, plan().lora_targets) == trainable
    assert expert_lora_param_count(arch, 4, plan().lora_targets) == sum(p.numel() for p in expert_params) > 0

    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        loss, n = summed_loss(model, batch())
        (loss / n).backward()
        if not losses:  # B is zero at init: A's gradient is zero then, B's is not
            assert all(m.down_lora.B.grad.abs().max() > 0 for m in model.modules() if isinstance(m, NF4Experts))
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss / n).item())
    assert losses[-1] < losses[0] - 0.1, losses

    adapter.write_adapter(tmp_path / "adapter", model, plan(), str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(EXPERT_TARGETS) and config["target_modules"] == sorted(ATTENTION)
    from peft import PeftModel

    model.eval()
    ids = batch()["input_ids"][:1]
    peft = PeftModel.from_pretrained(dequantized_base(folder, model), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    assert ours.abs().max() > 1
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()

    # a resumed run reads the same file back; the --merge export adds the same deltas into the fused weights
    weights = adapter.read_adapter_weights(tmp_path / "adapter")
    fresh, _ = load_for_training(folder, plan(), torch.device("cpu"))
    adapter.load_lora_state_dict(fresh, weights)
    merged = dequantized_base(folder, model)
    adapter.merge_into_base(merged, weights, plan().alpha / plan().lora_rank)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)
        assert (merged(input_ids=ids).logits - ours).abs().max() < 1e-4 * ours.abs().max()


@pytest.mark.parametrize("target", EXPERT_TARGETS)
def test_one_adapted_expert_matrix_is_saved_where_peft_looks_for_it(target, tmp_path):
    """One targeted parameter: PEFT's single ParamWrapper, keys without ``base_layer`` (Gemma 4's layout)."""
    from peft import PeftModel

    folder = build_model(gemma4_moe_config(), tmp_path / "moe")
    only = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, lora_targets=(target,))
    model, adapted = load_for_training(folder, only, torch.device("cpu"))
    assert adapted and all(path.endswith(target) for path in adapted)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    adapter.write_adapter(tmp_path / "adapter", model, only, str(folder))
    assert "base_model.model.model.layers.0.experts.lora_B.weight" in adapter.read_adapter_weights(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [target] and config["target_modules"] is None
    ids = batch()["input_ids"][:1]
    peft = PeftModel.from_pretrained(dequantized_base(folder, model, ()), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, peft(input_ids=ids).logits
        plain = dequantized_base(folder, model, ())(input_ids=ids).logits
    assert (ours - plain).abs().max() > 0.1  # the adapter changes the logits, and PEFT's the same way
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()


def test_expert_targets_are_asked_for_by_name_and_refused_where_they_cannot_run():
    assert not set(Plan(model="m").lora_targets) & set(EXPERT_TARGETS)  # the default adapts no expert
    assert lora_targets_from("attention,experts") == ("q_proj", "k_proj", "v_proj", "o_proj") + EXPERT_TARGETS
    with pytest.raises(VramplanError, match="set quant to nf4"):
        Plan(model="m", quant="bf16", lora_targets=EXPERT_TARGETS)
    with pytest.raises(VramplanError, match="set parallel to ddp"):
        Plan(model="m", lora_targets=EXPERT_TARGETS, parallel="fsdp", gpus=2)
    with pytest.raises(VramplanError, match="set stack to vramplan"):
        Plan(model="m", lora_targets=EXPERT_TARGETS, stack="hf")


def test_the_planner_adds_the_expert_adapters_their_grads_and_optimizer_states():
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture, estimate_plan

    profile = resolve_model("qwen3-30b-a3b")
    arch = architecture(profile)
    base = estimate_plan(Plan(model="qwen3-30b-a3b", optimizer="adamw"), profile)
    both = Plan(model="qwen3-30b-a3b", optimizer="adamw", lora_targets=Plan(model="m").lora_targets + EXPERT_TARGETS)
    more = estimate_plan(both, profile)
    extra = expert_lora_param_count(arch, 16, EXPERT_TARGETS)
    assert extra == 48 * 128 * 16 * (2 * 2048 + 3 * 768)  # 48 layers, 128 experts, r(H + 2I) + r(I + H)
    assert more.components["lora_params"] - base.components["lora_params"] == 4 * extra
    assert more.components["lora_grads"] - base.components["lora_grads"] == 4 * extra
    assert more.components["optimizer_states"] - base.components["optimizer_states"] == 8 * extra
    assert any("LoRA pair per expert" in note for note in more.notes)
    # throughput: a token runs its top-k experts' adapters (forward 2·T·r·width, ×3 with the backward)
    from vramplan.throughput import step_flops

    tokens = both.micro_batch * both.seq_len
    lora_flops = step_flops(arch, both)["lora"] - step_flops(arch, Plan(model="qwen3-30b-a3b"))["lora"]
    assert lora_flops == 3 * 2.0 * tokens * 16 * 48 * 8 * (2 * 2048 + 3 * 768)  # top-8 of 128


def test_fit_searches_only_nf4_and_no_fsdp_when_the_experts_are_adapted():
    from vramplan.catalog import resolve_gpu, resolve_model
    from vramplan.fit import fit_plan

    profile = resolve_model("qwen3-30b-a3b")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj") + EXPERT_TARGETS
    assert fit_plan(profile, resolve_gpu("h200"), base=Plan(model="qwen3-30b-a3b")).plan.quant == "bf16"
    one = fit_plan(profile, resolve_gpu("h200"), base=Plan(model="qwen3-30b-a3b", lora_targets=targets))
    assert one.plan.quant == "nf4" and one.plan.adapts_experts
    two = fit_plan(profile, resolve_gpu("2xh100"), base=Plan(model="qwen3-30b-a3b", lora_targets=targets))
    assert two.plan.gpus == 2 and two.plan.parallel == "ddp" and two.plan.quant == "nf4"
