"""The host's speed: the probe, the stored reading, and what it does to predicted speed (eager steps follow it)."""

import json

import pytest
import torch
from click.testing import CliRunner

from benchmarks.harness import host_dispatch_us
from tests.test_check import job  # noqa: F401  (the fixture)
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import architecture
from vramplan.host import REFERENCE_AUTOGRAD_OP_US, autograd_op_us, host_scale, store_probe, stored_probe
from vramplan.plan import Plan
from vramplan.throughput import combine, factors_for, predict_tokens_per_s, step_seconds


def test_probe_times_an_op_of_a_forward_and_backward():
    """µs per op of a tiny linear-and-SiLU stack, forward and backward: more than one bare queued add (it runs modules'
    Python and autograd's engine as well)."""
    autograd = autograd_op_us(torch.device("cpu"), layers=4, rounds=2)
    assert 0 < autograd < 10_000
    assert autograd > host_dispatch_us(torch.device("cpu"), ops=200, rounds=3)


def test_scale_is_the_reading_over_the_reference():
    assert host_scale(None) == 1.0
    assert host_scale(REFERENCE_AUTOGRAD_OP_US) == pytest.approx(1.0)
    assert host_scale(2 * REFERENCE_AUTOGRAD_OP_US) == pytest.approx(2.0)


def test_a_stored_reading_reads_back_and_a_broken_one_names_the_fix(tmp_path):
    assert stored_probe(tmp_path) is None
    probe = store_probe(35.5, "h100", tmp_path)
    assert stored_probe(tmp_path) == probe and "x1.25" in probe.describe()
    (tmp_path / "host.json").write_text("{not json")
    with pytest.raises(VramplanError, match="vramplan calibrate"):
        stored_probe(tmp_path)
    (tmp_path / "host.json").write_text(json.dumps({"autograd_op_us": -1, "gpu": "h100", "measured": "today"}))
    with pytest.raises(VramplanError, match="positive"):
        stored_probe(tmp_path)


def _plan(**overrides):
    return Plan(model="llama-3.2-1b", seq_len=2048, lora_rank=16, **overrides)


def test_a_slower_host_slows_eager_steps_by_its_host_time():
    """Every host second scales with the reading (the profiled per-tensor optimizer costs too); the GPU's do not. An
    eager Llama-3.2-1B step is host-bound on the H100, so it slows nearly in proportion; a captured step barely."""
    arch, gpu = architecture(resolve_model("llama-3.2-1b")), resolve_gpu("h100")
    slow = 1.5 * REFERENCE_AUTOGRAD_OP_US
    for plan in (_plan(cuda_graphs=False), _plan()):
        ref = step_seconds(arch, plan, gpu, factors_for("vramplan"))
        on_slow = step_seconds(arch, plan, gpu, factors_for("vramplan", host_us=slow))
        assert on_slow["host"] == pytest.approx(1.5 * ref["host"])
        assert on_slow["host_after_sync"] == pytest.approx(1.5 * ref["host_after_sync"])
        assert on_slow["matmul"] == ref["matmul"] and on_slow["memory"] == ref["memory"]
    eager = _plan(cuda_graphs=False)
    ratio = predict_tokens_per_s(arch, eager, gpu) / predict_tokens_per_s(arch, eager, gpu, host_us=slow)
    assert 1.3 < ratio <= 1.5
    captured = _plan()
    assert predict_tokens_per_s(arch, captured, gpu) / predict_tokens_per_s(arch, captured, gpu, host_us=slow) < 1.15
    assert combine(step_seconds(arch, eager, gpu, factors_for("vramplan", host_us=REFERENCE_AUTOGRAD_OP_US))) == \
        pytest.approx(combine(step_seconds(arch, eager, gpu)))


def test_check_predicts_for_the_host_calibrate_probed(job):  # noqa: F811
    """`vramplan check` prices speed on the host `vramplan calibrate` probed on this machine, where that probe drove
    the same GPU model, and says so; another GPU's reading is not this job's host."""
    from vramplan.cli import main

    folder, data, plan = job
    args = ["check", str(plan), "--model", str(folder), "--data", str(data), "--gpu", "h100", "--json"]
    reference = json.loads(CliRunner().invoke(main, args).output)
    assert reference["host_probe_us"] is None
    store_probe(2 * REFERENCE_AUTOGRAD_OP_US, "h100")
    slow = json.loads(CliRunner().invoke(main, args).output)
    assert slow["host_probe_us"] == pytest.approx(2 * REFERENCE_AUTOGRAD_OP_US)
    assert slow["tokens_per_s"] < reference["tokens_per_s"]
    text = CliRunner().invoke(main, args[:-1]).output
    assert "host probed" in text and "x2.00" in text
    store_probe(2 * REFERENCE_AUTOGRAD_OP_US, "a100-80gb")
    assert json.loads(CliRunner().invoke(main, args).output)["host_probe_us"] is None
