"""Eager steps with the adapters' gradients held in one buffer (switch ``held_eager_gradients``): the same training,
the gradients made once, before the first backward, and zeroed in place after every step."""

import pytest
import torch

from train_fixtures import build_model, llama_config
from vramplan.plan import Plan
from vramplan.train import data, switches
from vramplan.train.held_gradients import held_gradients, point_gradients_at
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.recipe import make_optimizer, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(llama_config(), tmp_path_factory.mktemp("held") / "llama")


def batches() -> list[dict]:
    rows = [[data.to_example(list(range(3 + i, 30 + 2 * i)), [True] * (27 + i))] for i in range(2)]
    return [data.collate([row], 0) for row in rows]


def three_steps(llama, held: bool, optimizer_name: str):
    plan = Plan(model="tiny", lora_rank=4, seq_len=64, checkpointing="full", optimizer=optimizer_name,
                cuda_graphs=False)
    with switches.forced(held_eager_gradients=held):
        model, _ = load_for_training(llama, plan, CPU)
        torch.manual_seed(1)
        params = lora_parameters(model)
        with torch.no_grad():
            for param in params:
                param.normal_(std=0.1)
        optimizer, _ = make_optimizer(params, plan, 1e-3, 0.0, CPU)
        steps, storages = [], set()
        for step in range(3):
            loss, targets, norm = train_step(model, batches(), optimizer, params, 1.0, step, CPU)
            steps.append((loss, targets, norm))
            storages |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        return steps, params, storages


@pytest.mark.parametrize("optimizer_name", ["adamw", "paged_adamw8bit"])
def test_held_gradients_train_as_dropped_ones_do(llama, optimizer_name):
    """Three steps of two micro-batches: the same losses, target counts and gradient norms (accumulation adds into
    the held buffer as into fresh gradients), the same adapters after; held, every gradient after a step is a zeroed
    view of the one buffer the first step made."""
    dropped, dropped_params, _ = three_steps(llama, False, optimizer_name)
    held, held_params, storages = three_steps(llama, True, optimizer_name)
    for (loss, targets, norm), (loss_h, targets_h, norm_h) in zip(dropped, held):
        assert targets == targets_h
        assert loss_h == pytest.approx(loss, rel=1e-5) and norm_h == pytest.approx(norm, rel=1e-4)
    for a, b in zip(dropped_params, held_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is not None and not p.grad.any() for p in held_params)
    assert len(storages) == 1  # one buffer, the same one every step
    assert all(p.grad is None for p in dropped_params)


def test_held_tensors_take_over_replaced_and_dropped_gradients():
    """A gradient an eager backward replaced moves its value into the held tensor; a dropped one comes back zeroed."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    held = held_gradients(params)
    assert held[0].untyped_storage().data_ptr() == held[1].untyped_storage().data_ptr()  # views of one buffer
    params[0].grad = torch.full((3,), 2.0)
    point_gradients_at(params, held)
    assert params[0].grad is held[0] and params[0].grad.tolist() == [2.0, 2.0, 2.0]
    assert params[1].grad is held[1] and not params[1].grad.any()
    params[0].grad = None
    point_gradients_at(params, held)
    assert params[0].grad is held[0] and not held[0].any()
