"""Model FLOPs for MFU: the work the model needs, not the recompute checkpointing adds."""

import pytest

from benchmarks.mfu import model_flops, utilisation
from vramplan.plan import Plan


def test_model_flops_of_a_frozen_base_are_about_four_times_params_times_tokens():
    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    flops = model_flops(plan)
    non_embedding = 0.97e9  # Llama-3.2-1B's linears (the 0.26 B embedding is a lookup, the head is counted apart)
    head = 2 * 2 * 2048 * 128256 * 2048  # forward and dX of the tied head
    assert 4 * non_embedding * 2048 + head < flops < 1.3 * (4 * non_embedding * 2048 + head)


def test_recompute_is_not_model_work():
    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    assert model_flops(plan) == model_flops(plan.replace(checkpointing="none"))


def test_utilisation_is_needed_work_over_the_measured_rate():
    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    assert utilisation(plan, step_seconds=model_flops(plan) / 500e12, matmul_tflops=1000) == pytest.approx(0.5)
