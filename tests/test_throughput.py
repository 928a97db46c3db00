"""The throughput model: FLOPs by hand, the directions it must move in, and its error on held-out runs."""


import pytest

from vramplan.arch import from_config
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture
from vramplan.plan import Plan
from vramplan.throughput import calibration, predict_tokens_per_s, step_bytes, step_flops, step_kernels, step_seconds

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
        "tie_word_embeddings": True}


def test_flops_by_hand_for_a_tiny_llama():
    arch = from_config(TINY)
    plan = Plan(model="tiny", seq_len=8, lora_rank=4, checkpointing="full")
    flops = step_flops(arch, plan)
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x128 -> 36,864 weights; 2 layers
    forward = 2 * 8 * 2 * 36_864
    assert flops["linears_forward"] == forward
    assert flops["linears_backward"] == forward  # dX only: frozen weights get no dW
    # LoRA: sum(in + out) = 128 + 96 + 96 + 128 + 192 * 3 = 1,024 per layer; x3 for its backward
    lora_forward = 2 * 8 * 4 * 2 * 1_024
    assert flops["lora"] == 3 * lora_forward
    assert flops["recompute"] == forward + lora_forward
    assert flops["lm_head"] == 2 * 2 * 8 * 100 * 64
    # causal: a query sees (8 + 1) / 2 keys on average; QK^T and PV, q_dim 64, 2 layers
    attention = 4 * 8 * 4.5 * 64 * 2
    assert flops["attention"] == pytest.approx(3.5 * attention + attention)
    no_ckpt = step_flops(arch, plan.replace(checkpointing="none"))
    assert no_ckpt["recompute"] == 0 and no_ckpt["attention"] == pytest.approx(3.5 * attention)


def test_longer_sequences_cost_more_flops_per_token():
    arch = architecture(resolve_model("llama-3.2-1b"))
    per_token = [sum(step_flops(arch, Plan(model="m", seq_len=s)).values()) / s for s in (512, 2048, 8192)]
    assert per_token[0] < per_token[1] < per_token[2]


def test_a_faster_gpu_trains_faster():
    arch = architecture(resolve_model("llama-3.1-8b"))
    plan = Plan(model="llama-3.1-8b", seq_len=4096)
    speeds = [predict_tokens_per_s(arch, plan, resolve_gpu(g)) for g in ("rtx-4060", "rtx-4090", "h100", "b200")]
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1] / 5


def test_checkpointing_offload_and_quantization_slow_a_step():
    arch = architecture(resolve_model("llama-3.2-3b"))
    gpu = resolve_gpu("a100-80gb")
    plan = Plan(model="m", quant="bf16", checkpointing="none", optimizer="adamw")
    speed = lambda **c: predict_tokens_per_s(arch, plan.replace(**c), gpu)  # noqa: E731
    assert speed() > speed(checkpointing="full") > speed(checkpointing="offload")
    assert speed() > speed(quant="nf4")
    assert step_bytes(arch, plan.replace(quant="nf4"))["weights"] > step_bytes(arch, plan)["weights"]
    assert step_kernels(arch, plan.replace(checkpointing="full")) > step_kernels(arch, plan)


def test_more_layers_launch_more_kernels():
    small = from_config(TINY)
    deep = from_config({**TINY, "num_hidden_layers": 8})
    plan = Plan(model="tiny")
    assert step_kernels(deep, plan) > 3.5 * (step_kernels(small, plan) - 200)


def test_a_gpu_without_speed_figures_is_a_clear_error():
    from vramplan.catalog import budget_gpu
    from vramplan.errors import VramplanError

    with pytest.raises(VramplanError, match="no compute rate"):
        step_seconds(from_config(TINY), Plan(model="tiny"), budget_gpu(10**10, "10GB"))


def test_held_out_error_on_the_committed_measurements():
    """The fit never sees the held-out runs. The issue's target is 15% per configuration; not reached.
    On the committed data (H100: 23 hf-stack runs and the trainer's configurations of sessions 1-3, a
    configuration measured twice counted at its latest run, every other run of each stack held out):
    16.8% mean, 14.4% median over 23 held-out runs (13.4% / 8.1% over 17 before session 3's rows). Repeated trainer runs of one configuration differ by up to
    ±15% (host-bound steps), which bounds what any model of them can reach."""
    from benchmarks.throughput import evaluate, split, load_runs

    runs = load_runs()
    fit, held = split(runs)
    assert len(runs) >= 24 and len(held) >= 12 and not set(r.key for r in fit) & set(r.key for r in held)
    result = evaluate(runs)
    assert result["held_out"]["count"] == len(held)
    assert result["held_out"]["mean_abs_error"] < 0.17
    assert result["held_out"]["median_abs_error"] < 0.15
    # the fitted factors are physical: a launch floor of tens of µs, matmul efficiency under 100%
    for factors in result["factors"].values():
        assert 5e-6 < factors["seconds_per_kernel"] < 100e-6 and 0.02 <= factors["matmul_efficiency"] <= 1.0
    committed = calibration()
    for stack, factors in result["factors"].items():
        for name, value in factors.items():
            assert committed["stacks"][stack][name] == pytest.approx(value, rel=1e-6), (stack, name)
    assert committed["date"] and "trainer_h100.jsonl" in committed["source"]
