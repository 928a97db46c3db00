"""Gated MLP activations: the fused Triton kernels (in the interpreter) against their references,
and the references against transformers' activations and MLP modules."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.glu import (GatedMLP, gated_mlp_act, gated_mlp_forward, geglu, geglu_reference,
                                  hf_activation, swiglu, swiglu_reference)

OPS = {"swiglu": swiglu, "geglu": geglu}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Spread wide enough to reach both tails of the activations.
    return torch.randn(shape, generator=gen, dtype=dtype) * 3, torch.randn(shape, generator=gen, dtype=dtype)


def _run(op, gate0, up0, mode, inplace_backward=False):
    gate_leaf, up_leaf = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    gate, up = gate_leaf * 1, up_leaf * 1
    with kernel_mode(mode):
        out = OPS[op](gate, up, inplace_backward=inplace_backward)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    out.backward(dout)
    return out.detach(), gate_leaf.grad, up_leaf.grad


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 1, 37), (3, 1500)])
def test_kernel_matches_reference(shape, dtype, op, inplace_backward):
    gate, up = _inputs(shape, dtype)
    got = _run(op, gate, up, "triton", inplace_backward)
    want = _run(op, gate, up, "reference")
    # In the tails torch's 0.5·g·(1 + tanh) cancels; the kernel's sigmoid form does not, so the
    # absolute tolerance scales with the tensor's size.
    rel = 2e-6 if dtype == torch.float32 else 1e-12
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * w.abs().max().item())


@pytest.mark.parametrize("op", list(OPS))
def test_inplace_backward_reuses_the_saved_buffers(op):
    gate_leaf = torch.randn(4, 64, requires_grad=True)
    up_leaf = torch.randn(4, 64, requires_grad=True)
    gate, up = gate_leaf * 1, up_leaf * 1
    seen = {}
    gate.register_hook(lambda g: seen.update(dgate=g.data_ptr()))
    up.register_hook(lambda g: seen.update(dup=g.data_ptr()))
    gate_ptr, up_ptr = gate.data_ptr(), up.data_ptr()
    with kernel_mode("triton"):
        OPS[op](gate, up, inplace_backward=True).sum().backward()
    assert seen == {"dgate": gate_ptr, "dup": up_ptr}


def test_inplace_backward_is_ignored_for_leaves():
    gate = torch.randn(4, 64, requires_grad=True)
    up = torch.randn(4, 64, requires_grad=True)
    gate_before = gate.detach().clone()
    with kernel_mode("triton"):
        swiglu(gate, up, inplace_backward=True).sum().backward()
    assert torch.equal(gate.detach(), gate_before)
    assert gate.grad.data_ptr() != gate.data_ptr()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp64(op, dtype):
    gate, up = _inputs((8, 96), dtype, seed=2)
    got = _run(op, gate, up, "triton")
    want = _run(op, gate.double(), up.double(), "reference")
    rel = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=rel, atol=rel * w.abs().max().item() * 0.1)


def test_gelu_tanh_written_with_sigmoid_is_the_same_function():
    g = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    k = math.sqrt(2 / math.pi)
    as_tanh = 0.5 * g * (1 + torch.tanh(k * (g + 0.044715 * g**3)))
    as_sigmoid = g * torch.sigmoid(2 * k * (g + 0.044715 * g**3))
    torch.testing.assert_close(as_sigmoid, as_tanh, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_equal_transformers_activations(dtype):
    gate, up = _inputs((4, 33), dtype)
    assert torch.equal(swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)
    assert torch.equal(geglu_reference(gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    with kernel_mode("reference"):
        assert torch.equal(gated_mlp_act("silu", gate, up), ACT2FN["silu"](gate) * up)
        assert torch.equal(gated_mlp_act("gelu_pytorch_tanh", gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up)


def _mlps():
    torch.manual_seed(0)
    llama = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, hidden_act="silu"))
    gemma_config = Gemma4TextConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=8, global_head_dim=16, vocab_size=64,
                                    layer_types=["sliding_attention", "full_attention"])
    return [llama, Gemma4TextMLP(gemma_config, layer_idx=0)]


def test_gated_mlp_forward_matches_hf_modules_forward_and_backward():
    for mlp, kind in zip(_mlps(), ("silu", "gelu_pytorch_tanh")):
        assert hf_activation(mlp) == kind
        x = torch.randn(2, 3, 24)
        results = []
        for run in ("hf", "triton", "module"):
            mlp.zero_grad()
            x_ = x.clone().requires_grad_()
            if run == "hf":
                out = mlp(x_)
            elif run == "triton":
                with kernel_mode("triton"):
                    out = gated_mlp_forward(mlp, x_)
            else:
                fused = GatedMLP.from_hf(mlp)
                assert fused.gate_proj is mlp.gate_proj and set(dict(fused.named_parameters())) == set(
                    dict(mlp.named_parameters()))
                with kernel_mode("triton"):
                    out = fused(x_)
            out.square().sum().backward()
            results.append((out.detach(), x_.grad, mlp.gate_proj.weight.grad.clone(), mlp.up_proj.weight.grad.clone()))
        for result in results[1:]:
            for got, want in zip(result, results[0]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="no fused kernel"):
        gated_mlp_act("relu", torch.ones(2), torch.ones(2))
    mlp = _mlps()[0]
    mlp.act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match="ReLU"):
        hf_activation(mlp)


def _grads_of(mlp_module, x, weights, tiles):
    """Output, dx and the weights' .grad of one forward+backward of the fused module at ``tiles``."""
    mlp_module.tiles = tiles
    for w in weights:
        w.grad = None
    x_ = x.clone().requires_grad_()
    with kernel_mode("triton"):
        out = mlp_module(x_)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach(), x_.grad] + [w.grad.clone() for w in weights]


@pytest.mark.parametrize("tiles", [2, 3, 7])
def test_tiled_mlp_gives_the_untiled_outputs_and_gradients(tiles):
    """5 tokens in 2, 3 or 7 tiles (7 > tokens: 5 tiles of one), trainable gate and down weights, float64;
    the inner backwards accumulate the weights' gradients exactly as one backward does."""
    for mlp in _mlps():
        mlp = mlp.double()
        mlp.up_proj.weight.requires_grad_(False)  # a frozen projection between trainable ones
        fused = GatedMLP.from_hf(mlp)
        weights = [mlp.gate_proj.weight, mlp.down_proj.weight]
        x = torch.randn(1, 5, 24, dtype=torch.float64)
        want = _grads_of(fused, x, weights, 1)
        got = _grads_of(fused, x, weights, tiles)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert "tiles=" in repr(fused)


def test_tiled_mlp_with_frozen_weights_and_without_autograd():
    mlp = _mlps()[0].double().requires_grad_(False)
    fused = GatedMLP.from_hf(mlp)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    want = _grads_of(fused, x, [], 1)
    torch.testing.assert_close(_grads_of(fused, x, [], 4), want, rtol=1e-12, atol=1e-12)  # only dx flows
    fused.tiles = 4
    with torch.no_grad(), kernel_mode("triton"):
        torch.testing.assert_close(fused(x), want[0], rtol=1e-12, atol=1e-12)


def test_tiled_mlp_inside_a_checkpointed_block():
    """The trainer checkpoints each decoder layer: its recompute reruns the tiled forward, and the
    tiled backward's inner backwards run inside checkpoint's backward."""
    from torch.utils.checkpoint import checkpoint

    mlp = _mlps()[1].double()
    fused = GatedMLP.from_hf(mlp)
    weights = [p for p in mlp.parameters()]
    x = torch.randn(1, 6, 24, dtype=torch.float64)
    results = []
    for tiles in (1, 3):
        fused.tiles = tiles
        for w in weights:
            w.grad = None
        x_ = x.clone().requires_grad_()
        with kernel_mode("triton"):  # the recompute runs in the backward: the same kernels there
            out = checkpoint(lambda t: fused(t) + t, x_, use_reentrant=False)
            out.square().sum().backward()
        results.append([out.detach(), x_.grad] + [w.grad.clone() for w in weights])
    for g, w in zip(results[1], results[0]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
