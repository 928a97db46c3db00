"""Planning a run over several GPUs: per-rank memory of DDP and FSDP2, the layout fit picks, boxes in buy,
communication in the throughput model, and plans with gpus/parallel round-tripping through files."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from vramplan.buy import BOX_SIZES, Job, price_job
from vramplan.catalog import list_gpus, resolve_gpu, resolve_model
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, budget_bytes, estimate_plan
from vramplan.fit import fit_plan, leanest_per_layout, safety_margin
from vramplan.memory.distributed import nccl_buffer_bytes, ring_bytes_all_reduce
from vramplan.memory.overhead import UNFITTED_EAGER_FRAGMENTATION_BYTES
from vramplan.plan import Plan, read_plan
from vramplan.stacks.distributed import WEIGHT_COMPONENTS
from vramplan.throughput import predict_tokens_per_s, step_comm_bytes, step_seconds

L70 = resolve_model("llama-3.3-70b")
L8 = resolve_model("llama-3.1-8b")


def run(*args):
    return CliRunner().invoke(main, list(args))


def usable(gpu):
    return budget_bytes(gpu) - safety_margin(budget_bytes(gpu))


def weights_on_one_gpu(plan, profile):
    single = estimate_plan(plan.replace(gpus=1, parallel="none", cpu_offload=False), profile)
    return sum(v for k, v in single.components.items() if k in WEIGHT_COMPONENTS)


# ---------------------------------------------------------------- per-rank memory


@pytest.mark.parametrize("stack", ["vramplan", "hf"])
def test_fsdp_per_rank_memory_shrinks_with_the_gpus_and_the_weights_about_as_1_over_n(stack):
    base = Plan(model=L70.name, stack=stack, loss="full" if stack == "hf" else "chunked")
    weights = weights_on_one_gpu(base, L70)
    peaks = []
    for n in (2, 4, 8):
        est = estimate_plan(base.replace(gpus=n, parallel="fsdp"), L70)
        assert not set(est.components) & set(WEIGHT_COMPONENTS)  # replaced by the shards
        assert est.components["sharded_weights"] == pytest.approx(weights / n, rel=1e-3)
        assert {"all_gathered_layers", "nccl_buffers"} <= set(est.components)
        peaks.append(est.peak_bytes)
    assert peaks[0] > peaks[1] > peaks[2]
    assert peaks[0] - peaks[1] == pytest.approx(weights / 4, rel=0.1)  # what the shards give back, mostly


def test_ddp_holds_the_whole_model_per_rank_plus_buckets_and_nccl():
    single = estimate_plan(Plan(model=L8.name), L8)
    ddp = estimate_plan(Plan(model=L8.name, gpus=2, parallel="ddp"), L8)
    assert ddp.peak_bytes >= weights_on_one_gpu(single.plan, L8)
    assert ddp.components["weights_quantized"] == single.components["weights_quantized"]
    assert ddp.components["ddp_grad_buckets"] == ddp.components["lora_grads"]  # the reducer's copy
    # the one-GPU run replays CUDA graphs, which DDP does not (nor their memory, nor the slack their first eager pass
    # leaves: DDP's allocator holds the eager constant instead); both hold the adapters' bf16 copies
    assert ddp.components["lora_compute_copies"] == single.components["lora_compute_copies"]
    assert ddp.peak_bytes == single.peak_bytes - single.components["cuda_graphs"] \
        + nccl_buffer_bytes() + ddp.components["lora_grads"] \
        - single.components["fragmentation"] + ddp.components["fragmentation"]
    assert ddp.components["fragmentation"] == UNFITTED_EAGER_FRAGMENTATION_BYTES
    assert ddp.components["cuda_context"] == single.components["cuda_context"]  # one process per GPU
    assert any("own CUDA context" in n for n in ddp.notes)


def test_nccl_buffers_are_a_few_hundred_megabytes():
    assert 100e6 < nccl_buffer_bytes() < 1e9


def test_cpu_offload_leaves_only_the_layers_in_flight_on_the_gpu():
    sharded = estimate_plan(Plan(model=L70.name, gpus=2, parallel="fsdp"), L70)
    offload = estimate_plan(Plan(model=L70.name, gpus=2, parallel="fsdp", cpu_offload=True), L70)
    assert offload.peak_bytes < sharded.peak_bytes - sharded.components["sharded_weights"] + 1e9
    assert not {"sharded_weights", "lora_params", "optimizer_states"} & set(offload.components)
    assert any("host memory" in n for n in offload.notes)


def test_fsdp_8bit_states_are_priced_as_the_trainer_keeps_them(monkeypatch):
    """Switched on (VRAMPLAN_ENABLE=fused_optimizer) an FSDP2 8-bit plan keeps the fused kernel's states,
    1/N per rank: per moment one byte a value and one fp32 absmax per 256; paged runs unpaged and is
    priced so. Switched off the trainer steps torch AdamW for it, and it is priced as that."""
    from vramplan.fit import optimizers_for
    from vramplan.memory.adapters import lora_param_count
    from vramplan.train import switches

    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    base = Plan(model=L70.name, gpus=2, parallel="fsdp", optimizer="adamw")
    trainable = lora_param_count(architecture(L70), base.lora_rank, base.lora_targets)
    adamw = estimate_plan(base, L70)
    off = estimate_plan(base.replace(optimizer="adamw8bit"), L70)
    assert off.peak_bytes == adamw.peak_bytes and any("torch AdamW" in n for n in off.notes)
    assert optimizers_for(base) == ("adamw",)
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    eight = estimate_plan(base.replace(optimizer="adamw8bit"), L70)
    saved = (8 * trainable - 2 * (trainable + 4 * -(-trainable // 256))) / base.gpus
    assert adamw.components["optimizer_states"] - eight.components["optimizer_states"] == pytest.approx(saved, abs=1)
    assert adamw.peak_bytes - eight.peak_bytes == pytest.approx(saved, abs=1)
    paged = estimate_plan(base.replace(optimizer="paged_adamw8bit"), L70)
    assert paged.peak_bytes == eight.peak_bytes and any("not paged" in n for n in paged.notes)
    assert optimizers_for(base) == ("adamw", "adamw8bit")
    assert optimizers_for(base.replace(cpu_offload=True)) == ("adamw",)  # offload steps on the host: torch AdamW


def test_fit_writes_an_fsdp_8bit_plan_only_where_the_trainer_runs_it(monkeypatch):
    """70B on 2×RTX 4090: with the fused optimizer switched on, 8-bit states leave room for rank 16, and
    the plan fit writes is the one the trainer builds its optimizer for (no torch AdamW stand-in)."""
    import torch

    from vramplan.train import switches
    from vramplan.train.optim import FusedShardedAdamW8bit
    from vramplan.train.recipe import make_optimizer

    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    base = Plan(model=L70.name, seq_len=2048)
    assert fit_plan(L70, resolve_gpu("2xrtx-4090"), base=base).plan.optimizer == "adamw"
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    plan = fit_plan(L70, resolve_gpu("2xrtx-4090"), base=base).plan
    assert plan.parallel == "fsdp" and plan.optimizer == "adamw8bit"
    opt, note = make_optimizer([torch.nn.Parameter(torch.zeros(4, 8))], plan, 1e-3, 0.0, torch.device("cpu"), sharded=True)
    assert isinstance(opt, FusedShardedAdamW8bit) and note is None


# ---------------------------------------------------------------- plans and their validation


@pytest.mark.parametrize("fields,fix", [
    ({"gpus": 2}, "set parallel to ddp or fsdp"),
    ({"parallel": "ddp"}, "set gpus above 1"),
    ({"gpus": 2, "parallel": "ddp", "cpu_offload": True}, "set parallel to fsdp"),
    ({"gpus": 2, "parallel": "fsdp", "cpu_offload": "yes"}, "true or false"),
])
def test_inconsistent_layouts_are_one_line_errors(fields, fix):
    with pytest.raises(VramplanError, match=fix) as err:
        Plan.from_dict({"model": "m", **fields})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- fit


def test_70b_on_two_24gb_gpus_is_fsdp2_and_ddp_is_refused_with_numbers():
    gpu = resolve_gpu("rtx-4090")
    result = fit_plan(L70, gpu, base=Plan(model=L70.name, seq_len=2048, gpus=2, parallel="ddp"))
    assert result.plan.parallel == "fsdp" and result.plan.gpus == 2 and result.plan.seq_len == 2048
    assert result.estimate.peak_bytes <= usable(gpu)
    lean = leanest_per_layout(L70, result.plan, lambda est: est)
    assert lean["DDP"] > usable(gpu) and lean["DDP"] > 40e9
    why = result.explanation[0]
    assert why.startswith("FSDP2") and f"DDP {lean['DDP'] / 1e9:.2f} GB" in why.replace("DDP needs at least ", "DDP ")


def test_8b_on_two_rtx_4090_is_ddp_and_says_why():
    result = fit_plan(L8, resolve_gpu("2xrtx-4090"), base=Plan(model=L8.name, seq_len=2048))
    assert result.plan.parallel == "ddp" and result.plan.gpus == 2 and result.gpu == "2xrtx-4090"
    assert result.explanation[0].startswith("DDP over 2 GPUs") and "fits on each GPU" in result.explanation[0]


def test_70b_on_two_12gb_gpus_needs_cpu_offload_and_a_tiny_budget_is_refused_with_numbers():
    result = fit_plan(L70, resolve_gpu("2xrtx-3060"), base=Plan(model=L70.name, seq_len=2048))
    assert result.plan.parallel == "fsdp" and result.plan.cpu_offload and result.plan.quant == "nf4"
    assert "FSDP2 with CPU offload" in result.explanation[0] and "GB" in result.explanation[0]
    with pytest.raises(VramplanError) as err:
        fit_plan(L70, budget=3 * 10**9, base=Plan(model=L70.name, seq_len=2048, gpus=2, parallel="ddp"))
    message = str(err.value)
    assert "\n" not in message and "DDP" in message and "FSDP2 with CPU offload" in message
    assert "per GPU" in message and message.count(" GB") >= 4


def test_a_box_and_a_different_gpus_count_conflict():
    with pytest.raises(VramplanError, match="give one of them"):
        fit_plan(L8, resolve_gpu("4xh100"), base=Plan(model=L8.name, gpus=2, parallel="ddp"))


# ---------------------------------------------------------------- CLI


def test_box_parsing_and_estimate_json_per_rank():
    assert resolve_gpu("2xrtx-4090").count == 2
    result = run("estimate", "llama-3.3-70b", "--gpu", "2xrtx-4090", "--parallel", "fsdp", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gpus"] == 2 and data["parallel"] == "fsdp" and data["memory_per"] == "rank"
    assert {"sharded_weights", "all_gathered_layers", "nccl_buffers"} <= set(data["components"])
    assert sum(data["components"].values()) == data["peak_bytes"]
    table = run("estimate", "llama-3.3-70b", "--gpu", "rtx-4090", "--gpus", "2", "--parallel", "fsdp")
    assert "sharded_weights" in table.output and "peak per GPU" in table.output and "FSDP2 on 2 GPUs" in table.output


def test_mismatched_gpus_is_a_one_line_error():
    result = run("estimate", "llama-3.1-8b", "--gpu", "2xrtx-4090", "--gpus", "4")
    assert result.exit_code != 0 and "give one of them" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_fit_json_and_plan_file_round_trip(tmp_path):
    out = tmp_path / "plan.json"
    result = run("fit", "llama-3.3-70b", "--gpu", "rtx-4090", "--gpus", "2", "--seq", "2048", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["memory_per"] == "rank" and data["components"]
    plan = read_plan(out)
    assert plan.gpus == 2 and plan.parallel == "fsdp" and plan == Plan.from_dict(data["plan"])
    assert json.loads(out.read_text())["gpu"]["count"] == 2
    again = estimate_plan(plan, L70)
    assert again.peak_bytes == data["peak_bytes"]


# ---------------------------------------------------------------- throughput


def test_communication_bytes_follow_the_ring_formulas():
    plan = Plan(model=L8.name, gpus=4, parallel="ddp", grad_accum=2)
    grads = estimate_plan(Plan(model=L8.name), L8).phases["optimizer_step"] and \
        estimate_plan(Plan(model=L8.name), L8).components["lora_grads"]
    comm = step_comm_bytes(architecture(L8), plan)
    assert comm["all_reduce"] == pytest.approx(ring_bytes_all_reduce(grads, 4) / 2)
    fsdp = step_comm_bytes(architecture(L8), plan.replace(parallel="fsdp"))
    weights = weights_on_one_gpu(plan, L8)
    assert fsdp["all_gather"] > 2 * 0.75 * (weights - 2 * 4096 * 128256 * 2)  # two gathers of the layers
    assert step_comm_bytes(architecture(L8), Plan(model=L8.name)) == {k: 0.0 for k in comm}


def test_nvlink_trains_the_same_fsdp_plan_faster_than_pcie():
    h100 = resolve_gpu("8xh100")
    pcie = dataclasses.replace(h100, interconnect="pcie4")
    plan = Plan(model=L70.name, gpus=8, parallel="fsdp", seq_len=512)
    arch = architecture(L70)
    assert step_seconds(arch, plan, h100)["comm"] < step_seconds(arch, plan, pcie)["comm"] / 5
    assert predict_tokens_per_s(arch, plan, h100) > predict_tokens_per_s(arch, plan, pcie)


def test_box_tokens_per_s_is_n_ranks_over_the_step():
    arch, gpu = architecture(L8), resolve_gpu("h100")
    single = predict_tokens_per_s(arch, Plan(model=L8.name, cuda_graphs=False), gpu)  # a rank's step: eager
    box = predict_tokens_per_s(arch, Plan(model=L8.name, gpus=8, parallel="ddp"), gpu)
    assert 6 * single < box <= 8 * single
    # one GPU replays its steps as CUDA graphs, which a box's ranks do not
    assert predict_tokens_per_s(arch, Plan(model=L8.name), gpu) > single


# ---------------------------------------------------------------- buy


def test_buy_lists_boxes_of_sensible_sizes_at_n_times_the_price():
    options = price_job(Job(L70, Plan(model=L70.name, seq_len=4096), 20_000_000))
    by_name = {o.gpu.name: o for o in options}
    assert {"2xh100", "4xh100", "8xh100", "2xrtx-4090"} <= set(by_name)
    for o in options:
        assert o.gpu.count in BOX_SIZES[o.gpu.kind]
        assert o.gpu.count == 1 or o.fits
        if o.gpu.count > 1 and o.gpu.price_usd:
            assert o.purchase_usd == pytest.approx(o.gpu.count * o.gpu.price_usd)
        if o.fits:
            assert o.plan.gpus == o.gpu.count
    assert not any(o.gpu.count > 1 for o in options if o.gpu.kind in ("unified", "laptop"))
    assert not any(o.gpu.count > 4 for o in options if o.gpu.kind == "consumer")
    assert by_name["2xrtx-4090"].plan.parallel == "fsdp"
    one = by_name["rtx-4090"]  # one 24 GB card: only with the frozen 70B in host memory, slower than two
    assert one.plan.gpus == 1 and one.plan.cpu_offload and one.tokens_per_s < by_name["2xrtx-4090"].tokens_per_s


def test_buy_table_shows_boxes():
    result = run("buy", "llama-3.3-70b", "--seq", "4096", "--tokens", "20M")
    assert result.exit_code == 0, result.output
    assert "8xh100" in result.output and "/GPU" in result.output and "fsdp" in result.output


def test_one_gpu_fsdp_with_offload_is_a_plan_and_holds_only_layers_in_flight():
    """FSDP2 on one GPU is CPU offload of the frozen base: a model bigger than the GPU trains on it."""
    profile = resolve_model("llama-3.3-70b")
    offloaded = estimate_plan(Plan(model="llama-3.3-70b", parallel="fsdp", cpu_offload=True, optimizer="adamw",
                                   checkpointing="offload"), profile)
    whole = estimate_plan(Plan(model="llama-3.3-70b"), profile)
    assert offloaded.peak_bytes < 24e9 < 35e9 < whole.peak_bytes
