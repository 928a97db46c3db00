"""Graph-safe activation checkpointing: the same gradients as torch's checkpoint and as none, with
no activation kept between forward and backward."""

import gc
import weakref

import pytest
import torch

from vramplan.train.recompute import checkpoint_without_leaf


def _block(x, w1, w2):
    h = torch.tanh(x @ w1)
    h = h * torch.sigmoid(h)  # saves h and its sigmoid
    return (h @ w2).relu()


def test_gradients_equal_plain_and_torch_checkpoint():
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (_block, lambda *a: checkpoint_without_leaf(_block, *a),
                lambda *a: torch.utils.checkpoint.checkpoint(_block, *a, use_reentrant=False)):
        out = run(x, w1, w2)
        grads = torch.autograd.grad(out.square().sum(), (x, w1, w2))
        results.append((out.detach(), grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want)


def test_the_forward_keeps_no_activation():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    kept = []

    def layer(inp):
        hidden = torch.tanh(inp @ w)
        kept.append(weakref.ref(hidden))
        return hidden.exp()  # exp saves its output; tanh saved `hidden`

    out = checkpoint_without_leaf(layer, x)
    gc.collect()
    assert kept[0]() is None  # the forward's intermediate is gone: only an index was saved
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_no_grad_runs_the_function_plainly():
    with torch.no_grad():
        assert checkpoint_without_leaf(lambda t: t * 2, torch.ones(2)).tolist() == [2.0, 2.0]


def test_a_recompute_that_saves_differently_is_refused():
    calls = []

    def changing(t):
        calls.append(1)
        return t.exp() if len(calls) == 1 else t.exp().exp()

    x = torch.randn(3, requires_grad=True)
    out = checkpoint_without_leaf(changing, x)
    with pytest.raises(RuntimeError, match="recompute saved"):
        out.sum().backward()


def test_a_layers_recomputed_activations_are_freed_before_the_layer_below_runs_backward():
    """A stack of checkpointed layers holds one layer's recomputed activations at a time, as torch's
    checkpoint does: when the bottom layer's backward runs, every upper layer's are gone."""
    w = torch.randn(8, 8, requires_grad=True)
    recomputed: list[list[weakref.ref]] = [[] for _ in range(4)]

    def layer(i):
        def run(inp):
            hidden = torch.tanh(inp @ w)
            recomputed[i].append(weakref.ref(hidden))
            return hidden.exp()
        return run

    x = torch.randn(4, 8, requires_grad=True)
    alive_above_bottom = []

    def at_bottom(grad):
        gc.collect()
        alive_above_bottom.append(sum(ref() is not None for refs in recomputed[1:] for ref in refs[1:]))
        return grad

    h = x
    for i in range(4):
        h = checkpoint_without_leaf(layer(i), h)
        if i == 0:
            h.register_hook(at_bottom)  # runs as the bottom layer's backward starts
    h.sum().backward()
    assert all(len(refs) == 2 for refs in recomputed)  # forward, then one recompute each
    assert alive_above_bottom == [0]


def test_unpacking_a_recomputed_tensor_twice_is_refused():
    x = torch.randn(3, requires_grad=True)
    out = checkpoint_without_leaf(lambda t: t.exp(), x)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="unpacked twice"):
        out.sum().backward()
