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
