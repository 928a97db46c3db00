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
    if family == "gemma4":  # the flat step measured slower: per-tensor steps; the plan captures its steps, so
        # the Triton RoPE (switch rope_gemma4), one launch per rotated tensor (its shared-KV layers rotate q only)
        assert table["optimizer"]["step"].get("bnb") > 1
        assert all(table[phase]["rope"].get("triton", 0) >= layers for phase in ("forward", "recompute", "backward"))
        return
    # the 8-bit AdamW steps one flat tensor: one bitsandbytes op (+ the one foreach copy of the gradients)
    assert table["optimizer"]["step"].get("bnb") == 1 and table["optimizer"]["step"].get("launch", 0) <= 1
    # RoPE is one Triton launch per call in forward, recompute and backward, and no aten op launches
    for phase in ("forward", "recompute", "backward"):
        rope = table[phase]["rope"]
        assert rope.get("triton", 0) >= layers and (phase == "forward" or rope.get("launch", 0) == 0)
    # per LoRA linear: dequant (Triton) + 3 aten launches in the recompute; in the backward dequant + 5
    # (dX, the gradient at x·Aᵀ, dA and dB into the flat buffer, the LoRA part of dX), plus a copy where
    # a gradient arrives non-contiguous; but the first layer's q, k and v, whose input comes from the frozen
    # embeddings and needs no gradient (the trainer drops transformers' hook that asked for one), skip the
    # dequantization and dX
    assert table["recompute"]["qlora_linear"]["launch"] == 3 * linears
    assert table["backward"]["qlora_linear"]["launch"] <= 6 * linears
    assert table["backward"]["qlora_linear"]["triton"] == linears - 3


def _per_layer(counts: dict, ops: dict, layers: tuple[int, int], phase: str) -> tuple[float, float]:
    """(counted, modelled) host ops one decoder layer adds in ``phase``: the difference of two layer counts."""
    low, high = layers
    return ((counts[high].get(phase, 0) - counts[low].get(phase, 0)) / (high - low),
            (ops[high][phase] - ops[low][phase]) / (high - low))


#: layer counts whose difference is measured: Gemma 4 from 2 to 4 adds shared-KV layers, from 4 to 8
#: half of each, so both kinds are checked
LAYERS = {"llama": (1, 3), "qwen3": (1, 3), "gemma3": (1, 3), "gemma4": (2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("family, checkpointing", [("llama", "full"), ("llama", "none"), ("qwen3", "full"),
                                                   ("gemma4", "full")])
def test_the_throughput_models_host_ops_per_layer_match_the_counted_ones(family, checkpointing):
    """vramplan.throughput counts host ops from the architecture alone; the counter sees them. Per
    decoder layer of vramplan's trainer (default switches: per-tensor 8-bit AdamW, Triton RoPE where
    patched), by phase, the two agree within 15% (measured: Llama 2-3%, Qwen3 1-5%, Gemma 4's shared-KV
    layers 2-9%)."""
    from benchmarks.launch_count import tiny_config
    from vramplan.arch import from_config
    from vramplan.plan import Plan
    from vramplan.throughput import step_host_ops

    layers = LAYERS[family]
    counted = {n: count_step(family, layers=n, seq=8, checkpointing=checkpointing)["per_phase"] for n in layers}
    plan = Plan(model=family, checkpointing=checkpointing, seq_len=8)  # the counted step's rows
    ops = {n: step_host_ops(from_config(tiny_config(family, n)), plan) for n in layers}
    for phase in ("forward", "recompute", "backward"):
        seen, modelled = _per_layer(counted, ops, layers, phase)
        assert modelled == pytest.approx(seen, rel=0.15, abs=0.5), phase
    # the optimizer: one bitsandbytes update per LoRA tensor (the model weighs each 3 ops: its Python, profiled)
    seen, _ = _per_layer(counted, ops, layers, "optimizer")
    linears = sum(1 for lin in from_config(tiny_config(family, layers[1])).layers[-1].linears
                  if lin.name in Plan(model=family).lora_targets)
    assert seen == 2 * linears


@pytest.mark.slow
def test_the_throughput_models_hf_host_ops_match_the_counted_ones():
    """The hf recipe (transformers + PEFT + bitsandbytes, benchmarks/launch_count_hf.py) on the CPU: per
    decoder layer of Llama, Qwen3 (qk-norm), Gemma 3 (four norms a layer) and Gemma 4 (per-layer
    inputs, shared KV), NF4 and bf16, with and without checkpointing, the model's dispatched ops
    (without the bitsandbytes Python it adds on top, HF_UNCOUNTED_DEQUANT_HOST_OPS) agree with the
    counted ones within 15% in every phase (measured: 0-11%)."""
    from benchmarks.launch_count import tiny_config
    from benchmarks.launch_count_hf import SETTINGS, count_hf_step
    from vramplan.arch import from_config
    from vramplan.plan import Plan
    from vramplan.throughput import HF_UNCOUNTED_DEQUANT_HOST_OPS, step_host_ops

    misses = []
    for family, layers in LAYERS.items():
        archs = {n: from_config(tiny_config(family, n)) for n in layers}
        for quant, checkpointing in SETTINGS:
            counted = {n: count_hf_step(family, n, quant, checkpointing)["per_phase"] for n in layers}
            plan = Plan(model=family, stack="hf", quant=quant, checkpointing=checkpointing)
            ops = {}
            for n, arch in archs.items():
                ops[n] = step_host_ops(arch, plan)
                quantized = sum(len(layer.linears) for layer in arch.layers) if quant == "nf4" else 0
                for phase in ("forward", "backward") + (("recompute",) if checkpointing == "full" else ()):
                    ops[n][phase] -= HF_UNCOUNTED_DEQUANT_HOST_OPS * quantized
            for phase in ("forward", "recompute", "backward"):
                seen, modelled = _per_layer(counted, ops, layers, phase)
                if seen and abs(modelled / seen - 1) > 0.15 or not seen and modelled:
                    misses.append((family, quant, checkpointing, phase, seen, modelled))
    assert not misses


def test_the_graph_prologue_is_counted_as_the_throughput_model_charges_it():
    """What a CUDA-graph replay leaves eager: the embedding lookups (vramplan.throughput's prologue) and
    the ops around the replay (GRAPH_REPLAY_HOST_OPS, within one: Gemma 4 fills its per-layer inputs too)."""
    from benchmarks.launch_count import count_graph_prologue
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture
    from vramplan.throughput import GRAPH_REPLAY_HOST_OPS, prologue_host_ops

    for family, model in (("llama", "llama-3.2-1b"), ("gemma4", "gemma-4-e2b-text")):
        counted = count_graph_prologue(family, layers=2)
        assert counted["lookup"] == prologue_host_ops(architecture(resolve_model(model)))
        assert abs(counted["replay"] - GRAPH_REPLAY_HOST_OPS) <= 1
