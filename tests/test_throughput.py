"""The throughput model: FLOPs by hand, the directions it must move in, and its error on held-out runs."""


import contextlib
import json
import statistics
from pathlib import Path

import pytest

from vramplan.arch import from_config
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture
from vramplan.plan import Plan
from vramplan.train import switches
from vramplan.throughput import combine
from vramplan.throughput import (calibration, factors_for, host_seconds, optimizer_tensors, predict_tokens_per_s, step_bytes,
                                 step_flops, step_host_ops, step_seconds)

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
    full, none = step_host_ops(arch, plan.replace(checkpointing="full")), step_host_ops(arch, plan)
    assert full["recompute"] > 0 == none["recompute"] and full["forward"] > full["checkpointed"] > 0 == none["checkpointed"]


def test_more_layers_dispatch_more_host_ops():
    """Host ops grow by the same count with every decoder layer (the per-model part stays)."""
    plan = Plan(model="tiny")
    ops = {n: sum(step_host_ops(from_config({**TINY, "num_hidden_layers": n}), plan).values()) for n in (2, 4, 8)}
    per_layer = (ops[4] - ops[2]) / 2
    assert per_layer > 30 and ops[8] - ops[2] == pytest.approx(6 * per_layer) and ops[2] > 2 * per_layer


def test_host_ops_ignore_the_sequence_and_the_batch():
    """The host dispatches the same ops for 512 tokens as for 8,192: a small model's step time stays flat."""
    arch = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", seq_len=512, cuda_graphs=False)  # measured eagerly
    assert step_host_ops(arch, plan) == step_host_ops(arch, plan.replace(seq_len=8192, micro_batch=4))
    h100 = resolve_gpu("h100")
    steps = [combine(step_seconds(arch, plan.replace(seq_len=s), h100)) for s in (512, 1024, 2048)]
    assert max(steps) < 1.15 * min(steps)  # measured: 0.16-0.26 s over 512-8,192 tokens
    big = architecture(resolve_model("qwen3-4b"))
    long = [combine(step_seconds(big, Plan(model="qwen3-4b", seq_len=s, cuda_graphs=False), h100)) for s in (1024, 8192)]
    assert long[1] > 1.3 * long[0]  # measured 0.42-0.52 s at 1,024-2,048 (checkpointed), 0.67 s at 8,192


def test_optimizer_host_work_counts_bitsandbytes_tensors():
    arch = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b")
    assert optimizer_tensors(arch, plan) == 224  # 16 layers x 7 linears x (A, B), as the launch counter saw
    assert optimizer_tensors(arch, plan.replace(lora_targets=("q_proj", "v_proj"))) == 64
    per_tensor = step_host_ops(arch, plan)["optimizer"]
    assert per_tensor > 10 * step_host_ops(arch, plan.replace(optimizer="adamw"))["optimizer"]
    assert step_host_ops(arch, plan.replace(grad_accum=4))["optimizer"] == pytest.approx(per_tensor / 4)


def test_gemma4_norms_and_wide_heads():
    """E2B: 6.9 norms a layer, as benchmarks/launch_count.py counted; its 512-wide full-attention heads
    have no flash kernel and run at the profiled slow rate (the 256-wide sliding ones do not)."""
    from vramplan.throughput import _norms_per_layer

    arch = architecture(resolve_model("gemma-4-e2b-text"))
    norms = [_norms_per_layer(arch, layer) for layer in arch.layers]
    assert sum(norms) / len(norms) == pytest.approx(6.86, abs=0.05)
    plan = Plan(model="gemma-4-e2b-text")
    flops = step_flops(arch, plan)
    assert flops["attention_wide"] > 0 and flops["attention"] > 0
    assert step_flops(architecture(resolve_model("llama-3.2-1b")), plan)["attention_wide"] == 0


def test_the_hf_recipes_nf4_runs_fp32_around_bitsandbytes_and_its_bf16_runs_flash():
    """prepare_model_for_kbit_training upcasts what bitsandbytes leaves: hf's NF4 recipe moves fp32
    activations, runs fp32 attention over the whole s×s square (no flash kernel) and an fp32 LM head,
    both at its fitted fp32 efficiency; its bf16 recipe
    runs bf16 and SDPA's flash kernels at their profiled rate. Its NF4 linears cost the bitsandbytes
    Python the CPU timing measured on top of the counted ops."""
    from vramplan.throughput import HF_UNCOUNTED_DEQUANT_HOST_OPS, Factors

    arch = architecture(resolve_model("qwen3-0.6b"))
    nf4 = Plan(model="qwen3-0.6b", stack="hf", seq_len=2048)
    bf16 = nf4.replace(quant="bf16")
    h100 = resolve_gpu("h100")
    fp32, flash = step_seconds(arch, nf4, h100), step_seconds(arch, bf16, h100)
    assert fp32["attention"] > 0 == fp32["attention_flash"] and flash["attention_flash"] > 0 == flash["attention"]
    # fp32: every key of every query; flash: the causal half
    causal = step_flops(arch, nf4.replace(stack="vramplan"))["attention"]
    assert step_flops(arch, nf4)["attention"] == pytest.approx(2 * causal, rel=0.01)
    assert step_bytes(arch, nf4)["activations"] == pytest.approx(2 * step_bytes(arch, bf16)["activations"])
    unit = Factors(1.0, 1.0, 1.0, 1.0, 1.0)  # every term at its peak: where the FLOPs go
    fp32_flops = step_seconds(arch, nf4, h100, unit)["attention"] * h100.bf16_tflops * 1e12
    assert fp32_flops == pytest.approx(step_flops(arch, nf4)["attention"] + step_flops(arch, nf4)["lm_head"], rel=1e-6)
    ops_nf4, ops_bf16 = step_host_ops(arch, nf4), step_host_ops(arch, bf16)
    linears = sum(len(layer.linears) for layer in arch.layers)
    extra = ops_nf4["backward"] - ops_bf16["backward"]
    assert extra > HF_UNCOUNTED_DEQUANT_HOST_OPS * linears  # and the counted dequantization on top
    assert combine(fp32) > 1.2 * combine(flash)  # measured on the H100: 0.735 s and 0.446 s


def test_host_cost_is_the_cpus_not_the_gpus():
    """The same plan spends the same host seconds whatever GPU it runs on; a host-bound plan gains
    little from a faster GPU."""
    arch = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", seq_len=1024, cuda_graphs=False)  # eager: host-bound (graphs take the host out)
    seconds = {g: step_seconds(arch, plan, resolve_gpu(g)) for g in ("rtx-4090", "h100", "b200")}
    assert len({round(s["host"], 12) for s in seconds.values()}) == 1
    assert seconds["b200"]["matmul"] < seconds["h100"]["matmul"]
    h100, b200 = (predict_tokens_per_s(arch, plan, resolve_gpu(g)) for g in ("h100", "b200"))
    assert b200 < 1.1 * h100


def test_a_captured_step_charges_one_replay_for_its_graph():
    """Captured phases cost one replay's host ops together; the prologue, the optimizer and the step's
    bookkeeping stay eager, and run after the gradient norm's sync instead of overlapping the GPU, where
    bitsandbytes' per-tensor step costs its profiled seconds a tensor, not the eager fit's ops."""
    from vramplan.throughput import (CAPTURED_OPTIMIZER_S_PER_TENSOR, GRAPH_REPLAY_HOST_OPS, host_seconds_split,
                                     optimizer_tensors)

    arch = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b")
    assert plan.captures_steps
    factors = factors_for("vramplan")
    eager = host_seconds(arch, plan.replace(cuda_graphs=False), factors)
    with switches.forced(overlap_optimizer=False):  # the trainer before session 10: it read the norm first
        before, after = host_seconds_split(arch, plan, factors)
    ops = step_host_ops(arch, plan)
    assert before == pytest.approx((ops["prologue"] + GRAPH_REPLAY_HOST_OPS) * factors.seconds_per_host_op)
    assert after == pytest.approx(optimizer_tensors(arch, plan) * CAPTURED_OPTIMIZER_S_PER_TENSOR
                                  + ops["step"] * factors.seconds_per_host_op)
    assert optimizer_tensors(arch, plan) == 224  # Llama-3.2-1B: 16 layers x 7 linears x (A, B)
    assert before + after < eager / 3
    # overlapped (session 10's trainer): the same host seconds, bitsandbytes' loop beside the GPU's work, its
    # zeroing and the step's bookkeeping after its last sync; queued whole (switch queued_optimizer, the
    # default since session 11), all of them beside
    from vramplan.throughput import ZERO_GRAD_S_PER_TENSOR

    with switches.forced(queued_optimizer=False):
        over_before, over_after = host_seconds_split(arch, plan, factors)
        overlapped = combine(step_seconds(arch, plan, resolve_gpu("h100")))
    assert over_after == pytest.approx(optimizer_tensors(arch, plan) * ZERO_GRAD_S_PER_TENSOR
                                       + ops["step"] * factors.seconds_per_host_op)
    assert over_before + over_after == pytest.approx(before + after)
    assert host_seconds_split(arch, plan, factors) == (pytest.approx(before + after), 0.0)
    waiting = combine(step_seconds(arch, plan, resolve_gpu("h100")))
    assert waiting < overlapped
    with switches.forced(overlap_optimizer=False):
        assert combine(step_seconds(arch, plan, resolve_gpu("h100"))) > waiting
    # eager plans keep every host op overlapped with the GPU, as fitted
    assert host_seconds_split(arch, plan.replace(cuda_graphs=False), factors) == (pytest.approx(eager), 0.0)


def test_the_prologue_is_carved_out_of_the_forward():
    """The embedding lookups a graph leaves eager, as benchmarks.launch_count.count_graph_prologue counted
    them (Llama 1, Gemma 4 9); splitting them off changes no eager total. A checkpoint's hooks see every op of the
    layers' forward but the chunked attention's, which its autograd Function runs unrecorded (Gemma 4's wide heads)."""
    from vramplan.throughput import HOST_OPS_PER_MODEL, chunked_attention_host_ops

    for model, lookups in (("llama-3.2-1b", 1), ("gemma-3-1b", 2), ("gemma-4-e2b-text", 9)):
        arch = architecture(resolve_model(model))
        plan = Plan(model=model)
        ops = step_host_ops(arch, plan)
        assert ops["prologue"] == lookups
        unrecorded = sum(chunked_attention_host_ops(layer, plan)[0] for layer in arch.layers)
        assert (unrecorded > 0) == model.startswith("gemma-4")
        assert ops["checkpointed"] == pytest.approx(ops["forward"] + ops["prologue"] - unrecorded
                                                    - HOST_OPS_PER_MODEL["vramplan"][0])


@pytest.mark.parametrize("change", [dict(cuda_graphs=False), dict(checkpointing="offload"), dict(stack="hf"),
                                    dict(gpus=2, parallel="ddp"), dict(gpus=2, parallel="fsdp")])
def test_nothing_is_captured_where_the_trainer_cannot_capture(change):
    from vramplan.throughput import CAPTURED_PHASES, captured_phases

    arch = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b")
    assert captured_phases(arch, plan) == CAPTURED_PHASES
    assert captured_phases(arch, plan.replace(**change)) == ()


def test_graphs_speed_a_small_model_up_much_and_a_large_one_little():
    """Against the committed H100 runs (median step times; eager in trainer_h100.jsonl, graphs in
    trainer_graphs_h100.jsonl, flat-optimizer runs left out): Llama-3.2-1B at 2,048 tokens went 3.3x
    faster with graphs (host-bound: the graph removes ~15,000 host ops), Llama-3.1-8B 1.4x (its GPU
    work dominates). The predicted speed-ups lie within 25% of those: Llama-3.2-1B's is predicted 2.5x, the
    eager step's prediction 26% fast (a fitted row) and the captured one's 9% slow (profiled; within 15% until
    the graph-step device term was profiled, when both errors leaned the same way)."""
    from benchmarks.throughput import load_later_runs, load_runs

    eager = {r.key: r for r in load_runs()}
    graphs = {r.key.removesuffix(":graphs"): r for r in load_later_runs() if r.group == "graphs"}
    h100 = resolve_gpu("h100")
    speedups = {}
    for model in ("llama-3.2-1b", "llama-3.1-8b"):
        key = f"vramplan:{model}:s2048:b1:r16:full:nf4:paged_adamw8bit"
        graphed, plain = graphs[key], eager[key]
        arch = architecture(resolve_model(model))
        with graphed.as_ran():  # as those runs stepped: the optimizer after the wait
            predicted = (predict_tokens_per_s(arch, graphed.plan, h100)
                         / predict_tokens_per_s(arch, graphed.plan.replace(cuda_graphs=False), h100))
        measured = plain.step_s / graphed.step_s
        assert predicted == pytest.approx(measured, rel=0.25), model
        speedups[model] = predicted
    assert speedups["llama-3.2-1b"] > 2.2 and speedups["llama-3.1-8b"] < 1.8
    # measured 2.4x apart; predicted 2.0x since the prefetches of paged states (PREFETCH_S) count on both sides
    assert speedups["llama-3.2-1b"] > 1.8 * speedups["llama-3.1-8b"]


def test_a_gpu_without_speed_figures_is_a_clear_error():
    from vramplan.catalog import budget_gpu
    from vramplan.errors import VramplanError

    with pytest.raises(VramplanError, match="no compute rate"):
        step_seconds(from_config(TINY), Plan(model="tiny"), budget_gpu(10**10, "10GB"))


def test_held_out_error_on_the_committed_measurements():
    """The fit never sees the held-out runs. The issue's target is 15% per configuration; not reached on
    every one. On the committed data (H100: 25 trainer and 23 hf-stack configurations, repeats kept
    at their median, a third of each stack fitted): 10.2% mean, 8.8% median, 33.6% max, 25 of 31
    within 15% since attention is priced by the SMs its kernels keep busy (9.9%, 8.7%, 33.6%, 26 before;
    9.8%, 8.4%, 33.2%, 25 while vramplan's matmul and attention rates were fitted, not profiled;
    before the hf recipe's host ops were counted: 11.6%, 10.9%, 35.3%, 22); with the other
    two thirds fitted 9.4% and 14.3% mean. Repeats of one configuration differ by up to 22%, and nine
    Llama-3.2-1B configurations the model gives one step time were measured at 0.163-0.258 s
    (host-bound steps): no prediction is within 15% of all of those, which bounds what any model reaches.
    Since session 18 vramplan's seconds per host op is fitted on session 12's eager runs of the trainer as it
    ships (``throughput.HOST_OP_FIT_GROUP``), not on those first runs: the numbers above are sessions 1-3's."""
    from benchmarks.throughput import PROFILED, evaluate, load_runs, split

    runs = load_runs()
    fit, held = split(runs)
    assert len(runs) >= 40 and len(held) > len(fit) >= 12 and not {r.key for r in fit} & {r.key for r in held}
    assert any(len(r.step_times) > 1 for r in runs)  # repeats are kept, not overwritten
    for offset in (1, 2):  # the rotations fit other thirds; each still sees a run without checkpointing
        other_fit, other_held = split(runs, offset)
        assert not {r.key for r in other_fit} & {r.key for r in other_held} and len(other_held) > len(other_fit)
        assert {r.stack for r in other_fit if r.plan.checkpointing == "none"} == {"hf", "vramplan"}
    result = evaluate(runs, rotate=False)
    assert result["held_out"]["count"] == len(held)
    assert result["held_out_by_group"]["eager"] == result["held_out"]
    # the runs with CUDA graphs, none fitted: 13 configurations (5 with the flat optimizer step), two of them
    # profiled (their kernels set the graph-step constants) and so not held out; the other 11: 11.1% mean,
    # 11.2% median, 26.3% max, 8 within 15% since the captured optimizer is priced at the four profiles' mean
    # cost a tensor (6.4%, 4.3%, 15.2%, 10 at the eager fit's 3 ops a tensor, which the session-8 profiles
    # showed 2.6x too dear; before the device term was profiled: 28.0%, 29.9%, 59.3%, 3). Since attention is
    # priced by its kernels' SM occupancy (vramplan.occupancy), these session-5 runs (Llama under an explicit
    # mask in its captures) read 12.6% mean, 25.2% max, 6 within 15%: the masked kernel's rate now comes
    # from one profile, not a constant shared with the causal kernel
    graphs = result["held_out_by_group"]["graphs"]
    assert graphs["count"] == 11 and graphs["mean_abs_error"] < 0.13 and graphs["max_abs_error"] < 0.26
    assert graphs["within_15_percent"] >= 6
    assert not any(r["group"].startswith("graphs") and r["set"] == "fit" for r in result["rows"])
    # sessions 7 and 8's graph runs kept SDPA's causal kernel in their captures (priced as eager attention):
    # 11 configurations, two of them profiled in session 8; the other 9 (int8 heads, tiled MLPs, the fused
    # optimizer, Gemma-4-31B): 9.2% mean, 22.5% max, 8 within 15% (8.9%, 21.1%, 8 before attention was priced
    # by its occupancy; session 7's 5 alone had read 15.3% mean,
    # 28.6% max, 3 within 15% with the eager fit's optimizer cost: its bf16-head Llama-3.2-1B 29% slow). Since the
    # prefetches of paged states are priced (PREFETCH_S, fitted on session 12's A/B), 12.2% mean, 20.7% max, 6
    # within 15%: its rank-16 Llama-3.2-1B runs now read 10-15% slow (their 96 prefetches priced at 3.7 ms)
    causal = result["held_out_by_group"]["graphs_causal"]
    assert causal["count"] == 9 and causal["mean_abs_error"] < 0.13 and causal["max_abs_error"] < 0.23
    assert causal["within_15_percent"] >= 6
    # session 9's campaign of the trainer as it ships, measured after every constant was set: 16 configurations
    # over 8 models, 8.2% mean, 17.6% max (Gemma-4-E2B at 1,024 tokens, whose short rows leave SMs idle in its
    # attention: 25.7% before vramplan.occupancy priced that), 13 within 15%
    # 7.3% / 16.3% / 13 once NF4 dequantization paid its ramp; 5.8% mean, 17.0% max, 15 of 16 within 15% since the
    # prefetches of paged states are priced
    campaign = result["held_out_by_group"]["campaign"]
    assert campaign["count"] == 16 and campaign["mean_abs_error"] < 0.065 and campaign["within_15_percent"] >= 15
    assert campaign["max_abs_error"] < 0.18
    # session 11's re-measured matrix configurations, priced before they ran: 13.2% mean, 8 of 13 within 15%;
    # the eager offloaded-checkpoint run at 4,096 tokens came out 1.8x faster than priced (-45%; sessions 1-3's
    # eager trainer read -14.7% there), where the same plan at 2,048 tokens read -7.5% in session 11's eager runs
    # (+7.5% and -15.4% the other two): host-bound eager steps vary between processes
    # (8.6% mean, 11 of 13 within 15% since the prefetches of paged states are priced; 7.9% since vramplan's host op
    # is fitted on session 12's eager runs, the offloaded one -35%)
    remeasured = result["held_out_by_group"]["remeasured"]
    assert remeasured["count"] == 13 and remeasured["mean_abs_error"] < 0.09 and remeasured["within_15_percent"] >= 11
    offload = [r for r in result["rows"] if r["group"] == "remeasured" and r["checkpointing"] == "offload"]
    assert len(offload) == 1 and offload[0]["error"] < -0.3
    # session 11's short rows on the trainer queued whole: 11.9% mean, 3 of 4 within 15% (Gemma-4-E4B at 1,024
    # tokens +19.4%; Gemma-4-E2B +10.5% at 512 and +14.8% at 1,024, Qwen3-0.6B -3.0%)
    # (5.5% mean, all 4 within 15% since the prefetches are priced)
    short = result["held_out_by_group"]["short_rows"]
    assert short["count"] == 4 and short["mean_abs_error"] < 0.06 and short["within_15_percent"] == 4
    # session 11's eager runs: 10.1% mean, 2 of 3 within 15% at sessions 1-3's 44 µs a host op; 15.4% at session 12's
    # 36 µs (its offloaded Llama-3.2-1B at 2,048 tokens -31%): one host-bound Llama step of two sessions' hosts
    eager = result["held_out_by_group"]["eager_11"]
    assert eager["count"] == 3 and eager["within_15_percent"] == 2 and eager["max_abs_error"] < 0.33
    # session 12's A/Bs (the Llama pair fitted PREFETCH_S): Gemma 4 with and without the Triton RoPE within 11%;
    # its rank sweep, measured with the prefetches, 10.7% mean (20.1% before they were priced)
    ab = result["held_out_by_group"]["session12_ab"]
    assert ab["count"] == 6 and ab["within_15_percent"] == 6 and ab["mean_abs_error"] < 0.07
    # session 13's A/B of Gemma 4's wide heads through chunked attention: all within 15% (E2B 4,096 and E4B 2,048, the
    # clean hold-outs of its efficiency, +8.3% and +7.3%)
    wide = result["held_out_by_group"]["session13_ab"]
    assert wide["count"] == 4 and wide["within_15_percent"] == 4
    # session 12's rank sweep under graphs (its 5 eager runs fit vramplan's seconds per host op, so not held out)
    sweep = result["held_out_by_group"]["session12_fit"]
    assert sweep["count"] == 8 and sweep["mean_abs_error"] < 0.06
    host_fit = [r for r in result["rows"] if r["group"] == "session12_fit" and r["set"] == "fit"]
    assert len(host_fit) == 5 and not any(r["cuda_graphs"] for r in host_fit)
    # session 13's campaign of the trainer with session 12's defaults (prefetched once, Gemma 4's Triton RoPE when
    # captured), priced by the commit that ran it: 4.3% mean, all 7 within 15% (max +7.5%)
    # session 14: the fused attention rows' A/B (their efficiency read off it: no clean hold-out for speed) and the
    # campaign with them on, Gemma-4-E2B at 1,024-8,192 tokens and E4B at 2,048 and 4,096: 6.6% mean, 5 of 5 in 15%
    assert result["held_out_by_group"]["session14_ab"]["within_15_percent"] == 2
    campaign14 = result["held_out_by_group"]["session14"]
    assert campaign14["count"] == 5 and campaign14["within_15_percent"] == 5 and campaign14["mean_abs_error"] < 0.08
    # session 15: the band's A/B at E2B 8,192 (its efficiency read off it) and the runs at its threshold: E2B at 6,144
    # tokens priced +18% and +22% both ways (the masked run too, so not the band), E4B's band +14.5%
    assert result["held_out_by_group"]["session15_ab"]["within_15_percent"] == 2
    threshold = result["held_out_by_group"]["session15"]
    assert threshold["count"] == 5 and threshold["within_15_percent"] >= 3 and threshold["max_abs_error"] < 0.25
    campaign13 = result["held_out_by_group"]["session13"]
    assert campaign13["count"] == 7 and campaign13["within_15_percent"] == 7 and campaign13["mean_abs_error"] < 0.05
    # session 17 re-measured where older lines missed most, on the trainer as it ships: E2B at ranks 32 and 128 under
    # graphs +9.5% and +13.4% (+34.6% and +21.4% in session 12), Qwen3-4B without checkpointing -2.9% (+30.6% on the
    # old eager matrix), Llama-3.2-1B at 8,192 +8.8% (+18.4%); E2B eager -18.8% at sessions 1-3's 44 µs a host op
    # (-17.9% in session 12), within 15% at session 12's eager runs' 36 µs
    campaign17 = result["held_out_by_group"]["session17"]
    assert campaign17["count"] == 5 and campaign17["within_15_percent"] == 5 and campaign17["max_abs_error"] < 0.15
    # session 19: Llama-3.2-1B in loss-scaled fp16 (its norm read before the update: -7.1%; +18.6% priced as
    # overlapped as its bf16 steps) and bf16 (+2.7%), E2B in bf16 and at the band's threshold both ways
    campaign19 = result["held_out_by_group"]["session19"]
    assert campaign19["count"] == 5 and campaign19["within_15_percent"] == 5 and campaign19["max_abs_error"] < 0.10
    fp16 = [r for r in result["rows"] if r["group"] == "session19" and r["compute_dtype"] == "fp16"]
    assert len(fp16) == 1 and abs(fp16[0]["error"]) < 0.10
    # session 20's campaign, its grid and predictions committed before it ran (16 configurations, 8 models): every
    # captured one within 15% (max 12.9%); the two eager ones priced slower than they ran, Qwen3-4B -21% and
    # Llama-3.2-1B's offloaded checkpoints -34%: eager steps are bound by the host, faster on this one than on
    # session 12's, whose runs set the seconds per host op
    campaign20 = result["held_out_by_group"]["session20"]
    assert campaign20["count"] == 16 and campaign20["within_15_percent"] == 14
    rows20 = [r for r in result["rows"] if r["group"] == "session20"]
    assert all(abs(r["error"]) < 0.15 for r in rows20 if r["cuda_graphs"])
    assert sorted(r["error"] < -0.15 for r in rows20 if not r["cuda_graphs"]) == [True, True]
    # after it, on another machine: Llama-3.2-1B at 2,048 tokens eager -0.2% (session 11's host ran it 24% slower,
    # the campaign's ran its offloaded twin 34% faster than priced); Qwen3-1.7B at rank 128 without checkpointing
    # +6.3% under graphs, +10.5% eager
    followup = result["held_out_by_group"]["session20_followup"]
    assert followup["count"] == 3 and followup["within_15_percent"] == 3
    # session 21: its captured runs, as the trainer shipped before compact captures and with them, all within 15%; its
    # eager campaign (registered before it ran) on a host that ran eager steps 1.4-1.6x faster than session 12's,
    # every one priced 27-37% slow (its probe read 5.7-5.9 µs an op where session 20's host read 7.1)
    assert result["held_out_by_group"]["session21_slack"]["within_15_percent"] == 4
    assert result["held_out_by_group"]["session21_compact"]["within_15_percent"] == 9
    eager21 = [r for r in result["rows"] if r["group"] == "session21_eager"]
    assert len(eager21) == 6 and all(-0.38 < r["error"] < -0.2 for r in eager21)
    # session 21's campaign of compact captures, registered before it ran: every captured run within 15% (5.8-9.4%);
    # Llama-3.2-1B eager after it, on that third host, -20% on the reference host, -37% on its probe (36.0 µs an op,
    # read before the steps; the step ran 0.128 s)
    compact = [r for r in result["rows"] if r["group"] == "session21_compact_held_out"]
    assert len(compact) == 6 and all(abs(r["error"]) < 0.10 for r in compact if r["cuda_graphs"])
    # session 22's eager campaign, registered before it ran (session 23, one more host): 9.5% mean, 4 of 6 within 15%
    # on the reference host (Llama-3.1-8B -15.2%, Qwen3-0.6B at rank 128 +16.9%); each on its own probe (read before
    # the steps, 22-29 µs an op: a fast host) 16.6% mean, 2 of 6 (Qwen3-1.7B +33.9%, Qwen3-4B +29.4%)
    eager23 = [r for r in result["rows"] if r["group"] == "session23_eager"]
    assert len(eager23) == 6 and sum(abs(r["error"]) < 0.15 for r in eager23) == 2
    assert all(abs(r["error"]) < 0.35 for r in eager23)
    # session 24's eager campaign, registered before it ran (for its memory): on the reference host priced 1.6% slower
    # to 61% faster than it ran (29% mean, 1 of 6 within 15%); on its probe (33-37 µs, a slow host) 12.0% mean, 5 of 6
    eager24 = [r for r in result["rows"] if r["group"] == "session24_eager_timing"]
    assert len(eager24) == 6 and sum(abs(r["error"]) < 0.15 for r in eager24) == 5
    # session 25's eager runs on two hosts (probes 25-31 and 34-42 µs: 0.134 and 0.241 s a step of one plan): on
    # their probes 6.1% mean, 8 of 9 within 15% (Llama-3.2-1B at batch 2 -17.0%); on the reference host 2 of 9. Since
    # session 26 prices the chunked attention's ops as unrecorded, its Gemma-4-E2B and E4B +14.8% and +14.1% (were +4.5%
    # and +5.8%): 8.2% mean
    eager25 = result["held_out_by_group"]["session25_eager"]
    assert eager25["count"] == 9 and eager25["within_15_percent"] == 8 and eager25["mean_abs_error"] < 0.09
    # every held-out run of the trainer as it shipped since session 9, together: its captured steps (the default)
    # 6.1% mean, 122 of 127 within 15%; its eager ones, host-bound, 15.2% mean, 23 of 40, each on its host's probe
    # where it has one (19.3% mean, 13 of 31 before session 25, all at the reference host)
    # session 26's H100 call: session 25's host-probe campaign, registered before it ran with a target of 3 of 4 within
    # 15% on each line's probe, met 1 of 4 (Llama-3.2-1B offloaded +14.1%; Qwen3-1.7B +23.7%, Llama-3.2-3B +15.5%:
    # the host ran 12-24% slower than its 27-32 µs probe says; Gemma-4-E2B at 4,096 tokens -49.2%: its sliding layers'
    # band priced at a recorded op a chunk op). With the chunked attention's ops priced as unrecorded (after the call):
    # E2B +11.8%, 2 of 4. The two captured Qwen3-1.7B plans of its second campaign: +4.4%, -3.3%
    probe26 = [r for r in result["rows"] if r["group"] == "session26_host_probe"]
    assert len(probe26) == 4 and sum(abs(r["error"]) < 0.15 for r in probe26) == 2
    assert all(0.1 < r["error"] < 0.25 for r in probe26)
    assert result["held_out_by_group"]["session26_shipped_captures"]["within_15_percent"] == 2
    shipped = result["shipped_trainer_held_out"]
    assert shipped["all"]["count"] == shipped["captured"]["count"] + shipped["eager"]["count"] == 173
    assert shipped["captured"]["count"] == 129 and shipped["captured"]["within_15_percent"] >= 124
    assert shipped["captured"]["mean_abs_error"] < 0.065 and shipped["eager"]["count"] == 44
    assert shipped["eager"]["within_15_percent"] >= 25 and shipped["eager"]["mean_abs_error"] < 0.16
    profiled = [r for r in result["rows"] if r["set"] == "profiled"]
    assert {r["key"] for r in profiled} == set(PROFILED)
    assert {r["group"] for r in profiled} == {"graphs", "graphs_causal"}
    # the hf stack's third, fitted as before; sessions 1-3's vramplan rows measured a trainer whose host work cost more
    # than today's (12.8% mean at the 44 µs they fitted): at today's 36 µs every one is priced faster than it ran
    hf = result["held_out_by_stack"]["hf"]
    assert hf["count"] == 15 and hf["mean_abs_error"] < 0.075 and hf["within_15_percent"] >= 13
    first = [r for r in result["rows"] if r["group"] == "eager" and r["stack"] == "vramplan" and r["set"] == "held_out"]
    assert len(first) == 16 and all(r["error"] > 0 for r in first)
    assert result["same_work"]["configurations"] >= 3 and result["same_work"]["spread"] > 0.3
    # the fitted factors are physical: tens of µs of host work per op, matmuls below cuBLAS's own rate
    for factors in result["factors"].values():
        assert 5e-6 < factors["seconds_per_host_op"] < 100e-6 and 0.02 <= factors["matmul_efficiency"] <= 0.8
    committed = calibration()
    for stack, factors in result["factors"].items():
        for name, value in factors.items():
            assert committed["stacks"][stack][name] == pytest.approx(value, rel=1e-6), (stack, name)
    assert committed["date"] and "trainer_h100.jsonl" in committed["source"]


def test_host_and_device_overlap_to_about_the_longer():
    """Where one side dominates the step takes it; at the crossover each waits on the other now and then."""
    from vramplan.throughput import overlap

    assert overlap(0.2, 0.02) == pytest.approx(0.2, rel=1e-3)
    assert overlap(0.02, 0.2) == pytest.approx(0.2, rel=1e-3)
    assert 0.2 < overlap(0.2, 0.2) < 0.4 and overlap(0.2, 0.1) < overlap(0.2, 0.15) < overlap(0.2, 0.2)


def test_an_int8_head_costs_its_dequantization():
    """Llama-3.2-1B at 2,048 tokens: vocabulary-major, one block of all 2,048 tokens dequantizes the
    128,256-row head once, in 16 slices of 8,192 rows; token-major (the A/B switch off) each of 4 chunks
    dequantized it twice. Both against the bf16 head, whose chunks read it as it is (twice, 2 bytes)."""
    from vramplan.throughput import HEAD_SLICE_COSTS, int8_head_walks, step_host_ops
    from vramplan.train import switches

    arch = architecture(resolve_model("llama-3.2-1b"))
    bf16 = Plan(model="llama-3.2-1b", seq_len=2048)
    int8 = Plan(model="llama-3.2-1b", seq_len=2048, head_quant="int8")
    head = arch.vocab_size * arch.hidden_size
    assert int8_head_walks(arch, bf16) == (0, 0)
    for vocab_major, walks in ((True, (1, 16)), (False, (8, 16))):
        with switches.forced(int8_vocab_major=vocab_major):
            ops, _, moved = HEAD_SLICE_COSTS[vocab_major]
            assert int8_head_walks(arch, int8) == walks
            extra_ops = step_host_ops(arch, int8)["forward"] - step_host_ops(arch, bf16)["forward"]
            assert extra_ops == walks[0] * walks[1] * ops
            extra_bytes = step_bytes(arch, int8)["weights"] - step_bytes(arch, bf16)["weights"]
            assert extra_bytes == pytest.approx((walks[0] * moved - 4) * head)
    with switches.forced(int8_vocab_major=False):
        slow = predict_tokens_per_s(arch, int8.replace(cuda_graphs=False), resolve_gpu("h100"))
    assert predict_tokens_per_s(arch, int8.replace(cuda_graphs=False), resolve_gpu("h100")) > slow
    assert int8_head_walks(arch, Plan(model="llama-3.2-1b", seq_len=2048, head_quant="int8", stack="hf")) == (0, 0)


@switches.forced(wide_head_attention=False)  # the profiled trainers ran SDPA's kernels on Gemma 4's wide heads
def test_a_replayed_step_pays_a_floor_per_kernel_and_its_profiled_gpu_time():
    """Once a CUDA graph takes the host out, the GPU's own costs set the step: every kernel's gap
    (KERNEL_FLOOR_S, scaling with the kernels a plan runs) and each matmul's fixed cost (MATMUL_KERNEL_S).
    The device term of the two profiled graph steps (benchmarks/results/session5/profile-graphs-*.txt)
    is within 15% of their synced forward+backward wall time, 50.0 ms and 181.8 ms; with the eager-fitted
    rates it was 35 ms and 116 ms."""
    from vramplan.throughput import (KERNEL_FLOOR_S, MATMUL_KERNEL_S, NF4_DEQUANT_KERNEL_S, device_kernels,
                                     matmul_kernels, nf4_dequant_kernels)

    h100 = resolve_gpu("h100")
    for model, profiled in (("llama-3.2-1b", 0.0500), ("gemma-4-e2b-text", 0.1818)):
        arch = architecture(resolve_model(model))
        plan = Plan(model=model, seq_len=2048, loss_chunk_mb=256)  # the profile's plan: captured, checkpointed
        seconds = step_seconds(arch, plan, h100, masked_captures=True)  # as the profiled trainer captured it
        device = sum(seconds[k] for k in ("matmul", "attention", "attention_wide", "attention_flash", "memory", "kernels"))
        assert device == pytest.approx(profiled, rel=0.15), model
        assert seconds["kernels"] == pytest.approx(device_kernels(arch, plan) * KERNEL_FLOOR_S
                                                   + nf4_dequant_kernels(arch, plan) * NF4_DEQUANT_KERNEL_S)
        assert combine(seconds) > device  # the optimizer's host work after the sync adds
    llama = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    # the floor follows the kernels, not the tokens: fewer adapted linears, fewer kernels, less floor
    fewer = plan.replace(lora_targets=("q_proj", "v_proj"))
    assert device_kernels(llama, fewer) < device_kernels(llama, plan)
    assert step_seconds(llama, fewer, h100)["kernels"] < step_seconds(llama, plan, h100)["kernels"]
    assert step_seconds(llama, plan.replace(seq_len=8192), h100)["kernels"] == step_seconds(llama, plan, h100)["kernels"]
    # one NF4 dequantization per adapted linear and pass, as profiled (333 a step); none on bf16 weights
    assert nf4_dequant_kernels(llama, plan) == 16 * 7 * 3
    assert nf4_dequant_kernels(llama, plan.replace(quant="bf16")) == 0
    # 16 layers x 7 adapted linears x 11 matmuls (forward 3, recompute 3, backward 5), the head's 2 per chunk
    assert matmul_kernels(llama, plan) == 16 * 7 * 11 + 2 * 4
    assert matmul_kernels(llama, plan.replace(checkpointing="none")) == 16 * 7 * 8 + 2 * 4
    unit_cost = matmul_kernels(llama, plan) * MATMUL_KERNEL_S
    assert 0.1 * step_seconds(llama, plan, h100)["matmul"] < unit_cost < 0.5 * step_seconds(llama, plan, h100)["matmul"]


@switches.forced(wide_head_attention=False)  # the profiles below ran SDPA's kernels on Gemma 4's wide heads
def test_a_mask_makes_flash_attention_compute_the_whole_square():
    """SDPA handed a mask computes every block: Gemma 4's sliding layers (window 512 < 2,048 tokens) and,
    replayed as a CUDA graph under transformers 5.17's capture-time mask, every layer (profiled: Llama-3.2-1B's
    cuDNN kernels 2.3x their eager time). The trainer now keeps the causal kernel in an unpacked capture:
    by default a captured step's attention is priced as its eager one."""
    from vramplan.throughput import attention_seconds

    h100 = resolve_gpu("h100")
    rate = h100.bf16_tflops * 1e12
    llama = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    sms = h100.sms
    captured, _ = attention_seconds(llama, plan, rate, sms, masked_captures=True)
    eager, _ = attention_seconds(llama, plan.replace(cuda_graphs=False), rate, sms)
    assert captured > eager * 2  # the whole square, at the masked kernel's rate
    assert attention_seconds(llama, plan, rate, sms)[0] == pytest.approx(eager)
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    replayed = Plan(model="gemma-4-e2b-text", seq_len=2048)
    assert attention_seconds(gemma, replayed, rate, sms)[1] < attention_seconds(gemma, replayed, rate, sms, masked_captures=True)[1]
    assert captured == pytest.approx(0.0094, rel=0.1)  # profiled: 9.4 ms a step
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    flash, wide = attention_seconds(gemma, Plan(model="gemma-4-e2b-text", seq_len=2048, cuda_graphs=False), rate, sms)
    assert flash == pytest.approx(0.0193, rel=0.15)  # profiled eager: 21.9 + 35.8 ms over 3 steps, sliding layers
    assert wide == pytest.approx(0.0519, rel=0.1)  # profiled eager: 138.9 + 16.8 ms over 3 steps
    # at 1,024 tokens its 8 heads leave SMs idle: profiled 24.7 ms a step (session9/profile-graphs-*-1024.txt),
    # where a quadratic count from 2,048 tokens gives 17.4
    short = Plan(model="gemma-4-e2b-text", seq_len=1024)
    assert sum(attention_seconds(gemma, short, rate, sms)) == pytest.approx(0.0247, rel=0.1)
    assert sum(attention_seconds(gemma, short, rate, 0)) < 0.8 * 0.0247  # a GPU of unknown SMs: taken as full


def test_the_fused_optimizer_steps_one_buffer_without_waiting_first(monkeypatch):
    """Switched on, the fused 8-bit AdamW steps the flat buffer in one launch and the trainer reads the
    gradient norm only after the step: a captured plan's optimizer no longer waits on the GPU before it
    (no ``host_after_sync``), and its host ops fall from bitsandbytes' 3 per adapter tensor to a handful."""
    from vramplan.throughput import (FUSED_OPTIMIZER_HOST_OPS_PER_STEP, FUSED_OPTIMIZER_HOST_OPS_PER_TENSOR,
                                     OPTIMIZER_HOST_OPS_PER_TENSOR, optimizer_tensors, step_host_ops)
    from vramplan.train import switches

    h100 = resolve_gpu("h100")
    llama = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", seq_len=2048)  # paged 8-bit, captured, per-tensor
    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    tensors = optimizer_tensors(llama, plan)
    assert tensors == 2 * 16 * 7
    bnb_ops = step_host_ops(llama, plan)["optimizer"]
    assert bnb_ops == pytest.approx(OPTIMIZER_HOST_OPS_PER_TENSOR[plan.optimizer] * tensors)
    monkeypatch.setenv(switches.DISABLE_ENV, "overlap_optimizer")  # bitsandbytes stepped after the wait, as before session 10
    bnb = step_seconds(llama, plan, h100)
    assert bnb["host_after_sync"] > 0
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    assert optimizer_tensors(llama, plan) == 1
    assert step_host_ops(llama, plan)["optimizer"] == FUSED_OPTIMIZER_HOST_OPS_PER_TENSOR + FUSED_OPTIMIZER_HOST_OPS_PER_STEP
    fused = step_seconds(llama, plan, h100)
    assert fused["host_after_sync"] == 0
    assert combine(fused) < combine(bnb)
    sharded = Plan(model="llama-3.2-1b", seq_len=2048, gpus=2, parallel="fsdp")  # one launch per local shard
    assert optimizer_tensors(llama, sharded) == tensors


def test_chunked_wide_heads_price_what_session_13_profiled():
    """Gemma-4-E2B's seven 512-wide layers at 2,048 tokens: 55 ms a step on SDPA's memory-efficient kernels (profiled
    51.9), 18.7 on vramplan's chunked attention (read off the same profiles); the step 1.3x faster priced, 1.26x
    measured (benchmarks/results/session13/ab-wide-heads.jsonl). Narrow-headed models do not change."""
    from vramplan.throughput import attention_seconds, chunked_attention_host_ops

    h100 = resolve_gpu("h100")
    rate = h100.bf16_tflops * 1e12
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    plan = Plan(model="gemma-4-e2b-text", seq_len=2048)
    with switches.forced(wide_head_attention=False):
        sdpa = attention_seconds(gemma, plan, rate, h100.sms)[1]
        before = predict_tokens_per_s(gemma, plan, h100)
    with switches.forced(wide_head_attention=True, wide_head_fused_rows=False):
        chunked = attention_seconds(gemma, plan, rate, h100.sms)[1]
        after = predict_tokens_per_s(gemma, plan, h100)
        layer = next(layer for layer in gemma.layers if layer.head_dim > 256)
        eager_ops = chunked_attention_host_ops(layer, plan)
    with switches.forced(wide_head_attention=True, wide_head_fused_rows=True):
        fused = attention_seconds(gemma, plan, rate, h100.sms)[1]
        fused_tok_s = predict_tokens_per_s(gemma, plan, h100)
        fused_ops = chunked_attention_host_ops(layer, plan)
        llama = architecture(resolve_model("llama-3.2-1b"))
        llama_plan = Plan(model="llama-3.2-1b", seq_len=2048)
        on = predict_tokens_per_s(llama, llama_plan, h100)
    with switches.forced(wide_head_attention=False):
        assert predict_tokens_per_s(llama, llama_plan, h100) == on
    assert sdpa == pytest.approx(0.0519, rel=0.1) and chunked == pytest.approx(0.0187, rel=0.05)
    assert 1.15 < after / before < 1.4
    # eager, each chunk's ops cost host time: 2 chunks of 1,024 queries at 2,048 tokens, 8 at 4,096
    assert eager_ops == [65, 65, 95]
    with switches.forced(wide_head_attention=True, wide_head_fused_rows=False):
        assert chunked_attention_host_ops(layer, plan.replace(seq_len=4096))[2] == 5 + 45 * 8
    # the row passes fused (session 14's A/B: 10.45 ms off the step, 1.09x): 8.25 ms, fewer host ops a chunk
    assert fused == pytest.approx(0.00825, rel=0.05)
    assert 1.05 < fused_tok_s / after < 1.15
    assert all(f < e for f, e in zip(fused_ops, eager_ops))


def test_unaligned_chunks_cost_what_the_kernel_tables_timed():
    """Switch ``aligned_attention_chunks`` off gives the chunks sessions 13-15 ran: Gemma-4-E2B's full layer at 6,144
    tokens in the budget's 341-row chunks (320 aligned), its sliding band in chunks of 1,023 keys (1,024). Priced,
    the unaligned share of the work at 1.86x: the band's step at 8,192 tokens as session 15 measured it unaligned
    (516.5 ms) and as session 16 measured it aligned (443.6 ms), each within 5%."""
    from vramplan.memory.activations import chunked_attention_chunk_rows, chunked_attention_chunks
    from vramplan.throughput import UNALIGNED_CHUNK_SLOWDOWN, unaligned_chunk_cost

    h100 = resolve_gpu("h100")
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    plan = Plan(model="gemma-4-e2b-text", seq_len=8192, cuda_graphs=True)
    aligned_s = 8192 / predict_tokens_per_s(gemma, plan, h100)
    assert chunked_attention_chunk_rows(1, 8, 6144) == 320
    assert unaligned_chunk_cost(6144, 320) == unaligned_chunk_cost(8192, 512, 512) == 1.0
    with switches.forced(aligned_attention_chunks=False):
        assert chunked_attention_chunk_rows(1, 8, 6144) == 341
        keys = {upto - first for _, _, first, upto in chunked_attention_chunks(8192, 8192, 512, True, 512)}
        assert keys == {512, 1023}
        assert unaligned_chunk_cost(6144, 341) == UNALIGNED_CHUNK_SLOWDOWN  # every chunk 341 rows high
        assert 1.8 < unaligned_chunk_cost(8192, 512, 512) < UNALIGNED_CHUNK_SLOWDOWN  # the first chunk reads 512 keys
        unaligned_s = 8192 / predict_tokens_per_s(gemma, plan, h100)
    assert aligned_s == pytest.approx(0.4436, rel=0.05) and unaligned_s == pytest.approx(0.5165, rel=0.05)


def test_a_measured_line_is_priced_at_the_band_threshold_it_ran_under(monkeypatch, tmp_path):
    """Session 15's Gemma-4-E2B line at 4,096 tokens ran with the band switched on but under a 12-window threshold, so
    SDPA's mask ran: priced so whatever today's threshold is; a line from before the threshold (session 15's call 1)
    took the band at any length."""
    from benchmarks.throughput import load_runs, run_seconds
    from vramplan.memory import activations

    line = {"model": "gemma-4-e2b-text", "seq": 4096, "batch": 1, "rank": 16, "gc": True, "cuda_graphs": 1,
            "causal_captures": True, "sliding_band_attention": True, "step_s": 0.25, "tok_s": 16384.0}
    masked_line = dict(line, sliding_band_attention=False)
    priced = {}
    for name, record in {"threshold 12": dict(line, sliding_band_min_windows=12), "before the threshold": line,
                         "switched off": masked_line}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        (run,) = load_runs({"vramplan": path})
        monkeypatch.setattr(activations, "SLIDING_BAND_MIN_WINDOWS", 2)
        priced[name] = sum(run_seconds(run, factors_for("vramplan")).values())
    assert priced["threshold 12"] == priced["switched off"] != priced["before the threshold"]


def test_reference_host_is_the_fit_of_the_probed_runs_no_hold_out_counts():
    """``vramplan.host.REFERENCE_AUTOGRAD_OP_US`` is the reading that prices session 24's probed rank sweep best, each run
    on its own host; none of those runs is in a hold-out (``records.HELD_OUT``)."""
    from benchmarks.records import HELD_OUT, REFERENCE_HOST_RUNS
    from benchmarks.throughput import reference_host_fit
    from vramplan.host import REFERENCE_AUTOGRAD_OP_US

    reference, error = reference_host_fit()
    assert reference == pytest.approx(REFERENCE_AUTOGRAD_OP_US, abs=0.05) and error < 0.12
    assert not set(REFERENCE_HOST_RUNS) & {path for held in HELD_OUT for path in held.paths}


def test_a_machine_runs_eager_lines_beyond_its_probe_by_more_than_15_percent_apart():
    """What each probed eager line's host did beyond its probe (``host_residuals``): one machine's plans, in fresh
    processes, need host scales up to 1.39 / 0.89 apart (session 24's rank sweep), wider than 1.15 / 0.85, so no
    price scaled by a probe, or by one measured step on that machine, is within 15% of all of them."""
    from benchmarks.throughput import host_residuals, residual_spread

    rows = host_residuals()
    assert len(rows) == 35 and all(0.4 < r["residual"] < 1.5 for r in rows)
    spread = residual_spread(rows)
    assert len(spread) == 6
    wide = [file for file, r in spread.items() if r["high"] / r["low"] > 1.15 / 0.85]
    assert {"session24/call2/slack-sweep.jsonl", "session24/call3/eager-timing.jsonl"} <= set(wide)
    steady = spread["session25/call2/eager-steady.jsonl"]
    assert steady["high"] / steady["low"] < 1.15


def test_the_chunked_attentions_ops_cost_what_a_dispatch_and_its_loop_cost():
    """UNRECORDED_OP_SHARE is read off measurements no speed line is: the reference host's runs, whose dispatched add
    cost 0.274 of a recorded op, and the CPU's chunk op at 1.21 dispatched adds. Gemma-4-E2B's eager step at 4,096
    tokens (the sliding layers' band in 8 chunks, the wide heads' in 2) prices 1.7x faster than with each of those ops
    a recorded one (2.2x faster than before session 26, when a checkpoint's hooks were priced on them too); a captured
    step replays them and prices the same kernels."""
    from benchmarks.records import REFERENCE_HOST_RUNS
    from vramplan.throughput import UNRECORDED_OP_SHARE, device_kernels, unrecorded_host_ops

    lines = [json.loads(line) for path in REFERENCE_HOST_RUNS for line in path.read_text().splitlines()]
    dispatch = statistics.median(r["host_dispatch_us"] / r["host_autograd_us"] for r in lines
                                 if r.get("host_dispatch_us"))
    cpu_reading = Path(__file__).resolve().parent.parent / "benchmarks/results/session26/unrecorded-ops-cpu.json"
    cpu = json.loads(cpu_reading.read_text())
    assert UNRECORDED_OP_SHARE == pytest.approx(dispatch * cpu["chunk_op_over_dispatch"], abs=0.01)
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    plan = Plan(model="gemma-4-e2b-text", seq_len=4096, cuda_graphs=False)
    assert unrecorded_host_ops(gemma, plan)["forward"] > 0.5 * step_host_ops(gemma, plan)["forward"]
    priced = predict_tokens_per_s(gemma, plan, resolve_gpu("h100"))
    with priced_with_share(1.0):
        as_recorded = predict_tokens_per_s(gemma, plan, resolve_gpu("h100"))
        kernels = device_kernels(gemma, plan.replace(cuda_graphs=True))
    assert 1.5 < priced / as_recorded < 2.0
    assert device_kernels(gemma, plan.replace(cuda_graphs=True)) == kernels
    llama = architecture(resolve_model("llama-3.2-1b"))
    assert not any(unrecorded_host_ops(llama, Plan(model="llama-3.2-1b", seq_len=4096)).values())


@contextlib.contextmanager
def priced_with_share(share: float):
    """The module's share of a recorded op set to ``share`` for the duration (1: each costs a recorded op)."""
    import vramplan.throughput as throughput

    saved, throughput.UNRECORDED_OP_SHARE = throughput.UNRECORDED_OP_SHARE, share
    try:
        yield
    finally:
        throughput.UNRECORDED_OP_SHARE = saved
