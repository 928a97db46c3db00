"""The CPU launch counter (benchmarks/launch_count.py) on one step of the trainer on tiny models:
it sees every phase, attributes ops to their source, and shows the reductions this branch made
(one optimizer op, RoPE as Triton launches, a bounded LoRA backward)."""

import pytest
import torch

# A CPU tool: importing it sets TRITON_INTERPRET=1 for the whole process, which on a GPU machine
# would turn every later kernel test into an interpreter run. So: imported inside the tests only,
# and skipped where CUDA is.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts launches on the CPU (Triton interpreter)")


def count_step(*args, **kwargs):
    from benchmarks.launch_count import count_step as count

    return count(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("family, layers", [("llama", 1), ("gemma4", 4)])
def test_one_step_counted_by_phase_and_component(family, layers, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_ENABLE", "flat_optimizer")  # counted with the opt-in flat step
    result = count_step(family, layers=layers, seq=8)
    table, linears = result["table"], result["lora_linears"]
    assert set(result["per_phase"]) >= {"forward", "recompute", "backward", "grad_clip", "optimizer"}
    assert result["launches"] == sum(result["per_phase"].values())
    if family == "gemma4":  # measured slower fused on the GPU: per-tensor steps and transformers' RoPE
        assert table["optimizer"]["step"].get("bnb") > 1
        assert all(table[phase]["rope"].get("triton", 0) == 0 for phase in ("forward", "recompute", "backward"))
        return
    # the 8-bit AdamW steps one flat tensor: one bitsandbytes op (+ the one foreach copy of the gradients)
    assert table["optimizer"]["step"].get("bnb") == 1 and table["optimizer"]["step"].get("launch", 0) <= 1
    # RoPE is one Triton launch per call in forward, recompute and backward, and no aten op launches
    for phase in ("forward", "recompute", "backward"):
        rope = table[phase]["rope"]
        assert rope.get("triton", 0) >= layers and (phase == "forward" or rope.get("launch", 0) == 0)
    # per LoRA linear: dequant (Triton) + 3 aten launches in the recompute; in the backward dequant + 5
    # (dX, the gradient at x·Aᵀ, dA and dB into the flat buffer, the LoRA part of dX), plus a copy where
    # a gradient arrives non-contiguous
    assert table["recompute"]["qlora_linear"]["launch"] == 3 * linears
    assert table["backward"]["qlora_linear"]["launch"] <= 6 * linears
    assert table["backward"]["qlora_linear"]["triton"] == linears


@pytest.mark.slow
def test_the_throughput_models_host_ops_per_layer_match_the_counted_ones():
    """vramplan.throughput counts host ops from the architecture alone; the counter sees them. Per
    decoder layer of Llama (default switches: per-tensor 8-bit AdamW, Triton RoPE), by phase, the
    two agree within 20%."""
    from benchmarks.launch_count import tiny_config
    from vramplan.arch import from_config
    from vramplan.plan import Plan
    from vramplan.throughput import step_host_ops

    counted = {n: count_step("llama", layers=n, seq=8)["per_phase"] for n in (1, 3)}
    ops = {n: step_host_ops(from_config(tiny_config("llama", n)), Plan(model="llama")) for n in (1, 3)}
    for phase in ("forward", "recompute", "backward"):
        seen = (counted[3][phase] - counted[1][phase]) / 2
        modelled = (ops[3][phase] - ops[1][phase]) / 2
        assert modelled == pytest.approx(seen, rel=0.2), phase
    # the optimizer: one bitsandbytes update per LoRA tensor, 7 linears x (A, B) a layer
    assert counted[3]["optimizer"] - counted[1]["optimizer"] == 2 * 14
