"""The training process asks for expandable segments, and keeps an allocator setting the user made."""

import os

import pytest
import torch

from vramplan.train.allocator import ALLOC_CONF_ENV, EXPANDABLE, prefer_expandable_segments


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    prefer_expandable_segments()
    assert os.environ[ALLOC_CONF_ENV] == EXPANDABLE
    monkeypatch.setenv(ALLOC_CONF_ENV, "max_split_size_mb:128")
    prefer_expandable_segments()
    assert os.environ[ALLOC_CONF_ENV] == "max_split_size_mb:128"


def test_the_switch_off_leaves_the_allocator_alone_and_the_planner_prices_that(monkeypatch):
    """``VRAMPLAN_DISABLE=expandable_segments``: no allocator setting, and the estimate's eager slack is the constant
    of sessions 2-3's runs without them instead of the line fitted on runs with them."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import estimate_plan
    from vramplan.memory.overhead import EAGER_FRAGMENTATION_FLOOR_BYTES, UNFITTED_EAGER_FRAGMENTATION_BYTES
    from vramplan.plan import Plan
    from vramplan.train import switches

    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    plan = Plan(model="qwen3-0.6b", seq_len=1024, cuda_graphs=False)
    with switches.forced(expandable_segments=False):
        prefer_expandable_segments()
        assert ALLOC_CONF_ENV not in os.environ
        without = estimate_plan(plan, resolve_model(plan.model)).components["fragmentation"]
    with_them = estimate_plan(plan, resolve_model(plan.model)).components["fragmentation"]
    assert without == UNFITTED_EAGER_FRAGMENTATION_BYTES
    assert EAGER_FRAGMENTATION_FLOOR_BYTES < with_them < 0.1e9  # Qwen3-0.6B's 40 MB of small-pool gradients


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the dry run would start for real")
def test_a_calibration_dry_run_measures_under_the_trainers_allocator(monkeypatch, tmp_path):
    """`vramplan calibrate` measures vramplan's trainer under the allocator `vramplan train` runs it with (session 10's
    dry runs, made without expandable segments, held 0.09-0.39 GB beyond their allocations, the trainer 0.01-0.35);
    the hf stack as transformers leaves it. Here the dry run stops where it first asks for the GPU."""
    from vramplan.calibrate import measure_run
    from vramplan.plan import Plan

    for stack, expected in (("vramplan", EXPANDABLE), ("hf", None)):
        monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
        monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
        with pytest.raises((AssertionError, RuntimeError)):  # torch without CUDA
            measure_run(Plan(model="llama-3.2-1b", stack=stack), str(tmp_path))
        assert os.environ.get(ALLOC_CONF_ENV) == expected, stack
