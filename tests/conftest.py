"""Test-suite setup: Triton runs in its interpreter on machines without a GPU, and
tests marked ``gpu`` are skipped there."""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()

# Must be set before any @triton.jit function is defined, i.e. before vramplan_kernels
# is imported by a test module: triton reads it when the decorator runs.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _own_calibration_cache(tmp_path_factory, monkeypatch):
    """A developer's own calibrations (~/.cache/vramplan) must never change what a test sees."""
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path_factory.mktemp("vramplan-cache")))


@pytest.fixture(autouse=True)
def _transformers_own_attention():
    """A trainer test installs vramplan's sdpa function process-wide, as ``vramplan train`` does once; the next test
    must start with transformers' own (and no sliding-window bands)."""
    yield
    attention = sys.modules.get("vramplan.train.attention")
    if attention is not None:
        attention.uninstall()
