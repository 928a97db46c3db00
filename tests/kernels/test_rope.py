"""RoPE: the in-place Triton kernel (in the interpreter) against its reference, and the reference
against transformers' apply_rotary_pos_emb with cos/sin from the models' own rotary embeddings."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb as gemma4_apply
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.rmsnorm import rms_norm
from vramplan_kernels.rope import apply_rope, apply_rope_one, proportional_rotated_pairs, rope_reference

# Two packed sequences in one row: positions restart at the fourth token.
PACKED = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])


def _llama_trig(head_dim, position_ids, dtype):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=500000.0)
    x = torch.zeros(1, dtype=dtype)
    return LlamaRotaryEmbedding(config)(x, position_ids)


def _gemma4_rotary():
    config = Gemma4TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              global_head_dim=32, num_hidden_layers=2, intermediate_size=64, vocab_size=128,
                              layer_types=["sliding_attention", "full_attention"])
    return config, Gemma4TextRotaryEmbedding(config)


def _qk(shape_q, shape_k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape_q, generator=gen, dtype=dtype), torch.randn(shape_k, generator=gen, dtype=dtype)


def _run(q0, k0, cos, sin, mode, unsqueeze_dim=1, rotated_pairs=None, same_halves=False):
    """Forward and backward; q and k are non-leaf (the kernel writes into them)."""
    q_leaf, k_leaf = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q, k = q_leaf * 1, k_leaf * 1
    with kernel_mode(mode):
        q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, rotated_pairs=rotated_pairs,
                                  same_halves=same_halves)
    gen = torch.Generator().manual_seed(7)
    dq, dk = torch.randn(q_out.shape, generator=gen).to(q0.dtype), torch.randn(k_out.shape, generator=gen).to(k0.dtype)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    return q_out.detach(), k_out.detach(), q_leaf.grad, k_leaf.grad


def _assert_all_close(got, want, **tol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_llama_layout_matches_reference_with_packed_positions(dtype):
    cos, sin = _llama_trig(16, PACKED, dtype)
    q, k = _qk((2, 4, 7, 16), (2, 2, 7, 16), dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    _assert_all_close(_run(q, k, cos, sin, "triton"), _run(q, k, cos, sin, "reference"), **tol)
    # Positions that restart give the same rotation as a fresh sequence at those positions.
    q_out = _run(q, k, cos, sin, "triton")[0]
    fresh_cos, fresh_sin = _llama_trig(16, torch.tensor([[0, 1, 2, 3]]), dtype)
    q_tail = q[:1, :, 3:7].contiguous()
    q_fresh = _run(q_tail, q_tail[:, :2], fresh_cos, fresh_sin, "triton")[0]
    torch.testing.assert_close(q_out[:1, :, 3:7], q_fresh, **tol)


@pytest.mark.parametrize("tokens_per_program", [2, 4])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_several_tokens_per_program_with_a_partial_last_program(monkeypatch, tokens_per_program, unsqueeze_dim):
    """2 × 7 tokens: the last program's tile runs past the end, and the mask must hold it there."""
    import vramplan_kernels.rope as rope_module

    monkeypatch.setattr(rope_module, "TOKENS_PER_PROGRAM", tokens_per_program)
    cos, sin = _llama_trig(16, PACKED, torch.float64)
    shape = (lambda h: (2, h, 7, 16)) if unsqueeze_dim == 1 else (lambda h: (2, 7, h, 16))
    q, k = _qk(shape(3), shape(1), torch.float64, seed=5)
    want = _run(q, k, cos, sin, "reference", unsqueeze_dim=unsqueeze_dim)
    _assert_all_close(_run(q, k, cos, sin, "triton", unsqueeze_dim=unsqueeze_dim), want, rtol=1e-12, atol=1e-12)
    # Llama's cos/sin are cat(f, f): reading one half gives the same rotation.
    _assert_all_close(_run(q, k, cos, sin, "triton", unsqueeze_dim=unsqueeze_dim, same_halves=True), want,
                      rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [True, False])
def test_either_token_order_rotates_the_same(monkeypatch, reverse):
    """Programs walking the tokens last to first (the default) or first to last change the schedule, not
    the result (2 × 7 tokens at 4 a program: the partial program runs first or last)."""
    import vramplan_kernels.rope as rope_module

    monkeypatch.setattr(rope_module, "TOKENS_PER_PROGRAM", 4)
    monkeypatch.setattr(rope_module, "REVERSE_ORDER", reverse)
    cos, sin = _llama_trig(16, PACKED, torch.float64)
    q, k = _qk((2, 7, 3, 16), (2, 7, 1, 16), torch.float64, seed=6)
    want = _run(q, k, cos, sin, "reference", unsqueeze_dim=2)
    _assert_all_close(_run(q, k, cos, sin, "triton", unsqueeze_dim=2), want, rtol=1e-12, atol=1e-12)


def test_same_halves_reads_only_the_first_half_of_cos_and_sin():
    """Halves that differ expose it: the kernel rotates both halves by the first half's angles."""
    cos, sin = _llama_trig(16, PACKED, torch.float64)
    half = cos.shape[-1] // 2
    skewed_cos, skewed_sin = cos.clone(), sin.clone()
    skewed_cos[..., half:], skewed_sin[..., half:] = 0.5, -0.25  # never read with same_halves
    q, k = _qk((2, 3, 7, 16), (2, 1, 7, 16), torch.float64, seed=9)
    _assert_all_close(_run(q, k, skewed_cos, skewed_sin, "triton", same_halves=True),
                      _run(q, k, cos, sin, "reference"), rtol=1e-12, atol=1e-12)


def test_gemma4_layout_both_layer_types_and_proportional_partial_rotary():
    config, rotary = _gemma4_rotary()
    for layer_type, head_dim in (("sliding_attention", 16), ("full_attention", 32)):
        cos, sin = rotary(torch.zeros(1), PACKED, layer_type)
        # Gemma 4 passes [batch, seq, heads, head_dim] and unsqueeze_dim=2.
        q, k = _qk((2, 7, 2, head_dim), (2, 7, 1, head_dim), torch.float32, seed=3)
        factor = config.rope_parameters[layer_type].get("partial_rotary_factor", 1.0)
        pairs = proportional_rotated_pairs(head_dim, factor)
        assert pairs == (4 if layer_type == "full_attention" else 8)
        got = _run(q, k, cos, sin, "triton", unsqueeze_dim=2, rotated_pairs=pairs)
        want = _run(q, k, cos, sin, "reference", unsqueeze_dim=2)
        _assert_all_close(got, want, rtol=1e-6, atol=1e-6)
        if layer_type == "full_attention":
            # The non-rotated dims pass through bit-identical, forward and backward.
            dq = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
            for half_start in (0, head_dim // 2):
                idle = slice(half_start + pairs, half_start + head_dim // 2)
                assert torch.equal(got[0][..., idle], q[..., idle])
                assert torch.equal(got[2][..., idle], dq[..., idle])
    # The two layer types' theta and head_dim really give different rotations.
    assert not torch.equal(rotary(torch.zeros(1), PACKED, "sliding_attention")[0][..., :8],
                           rotary(torch.zeros(1), PACKED, "full_attention")[0][..., :8])


def test_leading_partial_rotary_passes_the_tail_through():
    # cos/sin narrower than head_dim: the first 8 of 12 dims rotate (NeoX / Phi-3 style).
    cos, sin = _llama_trig(8, PACKED[:1], torch.float64)
    q, k = _qk((1, 3, 7, 12), (1, 1, 7, 12), torch.float64)
    got, want = _run(q, k, cos, sin, "triton"), _run(q, k, cos, sin, "reference")
    _assert_all_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0][..., 8:], q[..., 8:])
    assert not torch.allclose(got[0][..., :8], q[..., :8])


@pytest.mark.parametrize("case", ["single_token", "odd_heads_2d_trig", "broadcast_batch"])
def test_odd_shapes(case):
    if case == "single_token":
        cos, sin = _llama_trig(6, torch.tensor([[5]]), torch.float64)
        q, k = _qk((1, 1, 1, 6), (1, 1, 1, 6), torch.float64)
    elif case == "odd_heads_2d_trig":
        cos, sin = (t[0] for t in _llama_trig(10, PACKED[:1], torch.float64))  # [seq, dim]
        q, k = _qk((3, 5, 7, 10), (3, 3, 7, 10), torch.float64)
    else:
        cos, sin = _llama_trig(10, PACKED[1:], torch.float64)  # batch 1 of cos for a batch of 3
        q, k = _qk((3, 5, 7, 10), (3, 3, 7, 10), torch.float64)
    _assert_all_close(_run(q, k, cos, sin, "triton"), _run(q, k, cos, sin, "reference"), rtol=1e-12, atol=1e-12)


def test_in_place_on_projection_views_and_grad_of_only_q():
    # What a Llama attention layer hands over: transposed views of a projection's output.
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    proj = torch.nn.Linear(32, 4 * 8, bias=False)
    cos, sin = _llama_trig(8, PACKED, torch.float32)
    grads = []
    for mode in ("triton", "reference"):
        x.grad, proj.weight.grad = None, None
        q = proj(x).view(2, 7, 4, 8).transpose(1, 2)
        k = (proj(x) * 0.5).view(2, 7, 4, 8).transpose(1, 2)
        with kernel_mode(mode):
            q_out, k_out = apply_rope(q, k, cos, sin)
        (q_out.sum() * 2).backward()  # dk is None, dq arrives expanded (stride 0)
        grads.append((q_out.detach(), x.grad.clone(), proj.weight.grad.clone()))
    _assert_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def _graph(fn):
    names, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_writes_in_place_unless_autograd_would_copy():
    torch.manual_seed(0)
    cos, sin = _llama_trig(8, PACKED, torch.float32)
    # Gemma 4: q and k come out of q_norm/k_norm (vramplan's RMSNorm), not views: rotated in place.
    with kernel_mode("triton"):
        q = rms_norm(torch.randn(2, 7, 4, 8, requires_grad=True) * 1, torch.ones(8), 1e-6)
        k = rms_norm(torch.randn(2, 7, 1, 8, requires_grad=True) * 1, None, 1e-6)
        assert q._base is None and k._base is None
        q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    assert q_out is q and k_out is k
    assert not _graph(q_out.grad_fn) & {"CopySlices", "AsStridedBackward0"}
    # Llama: transposed views of the projections that need a gradient: a new tensor, and no
    # as_strided/CopySlices nodes in the graph (they would copy dq three times in backward).
    x = torch.randn(2, 7, 32, requires_grad=True)
    q = (x * 1).view(2, 7, 4, 8).transpose(1, 2)
    with kernel_mode("triton"):
        q_out, _ = apply_rope(q, q.detach().clone(), cos, sin)
    assert q_out.data_ptr() != q.data_ptr() and q_out.stride() == q.stride()
    assert not _graph(q_out.grad_fn) & {"CopySlices", "AsStridedBackward0"}
    # A leaf that needs a gradient cannot be written in place: a new tensor, and its gradient.
    leaf = torch.randn(1, 2, 7, 8, requires_grad=True)
    with kernel_mode("triton"):
        q_out, _ = apply_rope(leaf, leaf.detach().clone(), cos[:1], sin[:1])
    q_out.sum().backward()
    assert leaf.grad is not None and q_out.data_ptr() != leaf.data_ptr()
    # Without autograd the same view is rotated in place.
    with torch.no_grad(), kernel_mode("triton"):
        q_out, _ = apply_rope(q, q.clone(), cos, sin)
    assert q_out.data_ptr() == q.data_ptr()


def test_bf16_close_to_fp64():
    cos, sin = _llama_trig(32, PACKED, torch.bfloat16)
    q, k = _qk((2, 2, 7, 32), (2, 1, 7, 32), torch.bfloat16)
    got = _run(q, k, cos, sin, "triton")
    want = _run(q.double(), k.double(), cos.double(), sin.double(), "reference")
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_transformers(dtype):
    cos, sin = _llama_trig(16, PACKED, dtype)
    q, k = _qk((2, 4, 7, 16), (2, 2, 7, 16), dtype)
    for got, want in zip(rope_reference(q, k, cos, sin), llama_apply(q, k, cos, sin)):
        assert torch.equal(got, want)
    _, rotary = _gemma4_rotary()
    for layer_type, head_dim in (("sliding_attention", 16), ("full_attention", 32)):
        cos, sin = (t.to(dtype) for t in rotary(torch.zeros(1), PACKED, layer_type))
        q, k = _qk((2, 7, 2, head_dim), (2, 7, 1, head_dim), dtype)
        got_q, got_k = rope_reference(q, k, cos, sin, unsqueeze_dim=2)
        assert torch.equal(got_q, gemma4_apply(q, cos, sin, unsqueeze_dim=2))
        assert torch.equal(got_k, gemma4_apply(k, cos, sin, unsqueeze_dim=2))
        with kernel_mode("reference"):
            assert torch.equal(apply_rope_one(q, cos, sin, unsqueeze_dim=2), gemma4_apply(q, cos, sin, unsqueeze_dim=2))


def test_single_tensor_form_as_gemma4_calls_it():
    # Gemma 4's shared-KV layers rotate only q, one call per tensor.
    _, rotary = _gemma4_rotary()
    cos, sin = rotary(torch.zeros(1), PACKED, "full_attention")
    q = torch.randn(2, 7, 2, 32, dtype=torch.float32)
    want = gemma4_apply(q, cos, sin, unsqueeze_dim=2)
    with kernel_mode("triton"):
        got = apply_rope_one(q.clone(), cos, sin, unsqueeze_dim=2, rotated_pairs=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rejects_bad_layouts():
    cos, sin = _llama_trig(16, PACKED, torch.float32)
    q = torch.randn(2, 4, 7, 8)
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(q, q, cos, sin)
    with pytest.raises(ValueError, match="rotated_pairs"):
        apply_rope(torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16), cos, sin, rotated_pairs=9)


def test_slices_of_a_fused_projection_and_mixed_in_place():
    # q and k as slices of one fused qkv output (views that are not dense): each becomes a dense
    # copy rotated in place; a non-view k next to them is rotated in place. Outputs and gradients
    # match the reference either way.
    torch.manual_seed(0)
    cos, sin = _llama_trig(8, PACKED, torch.float32)
    x = torch.randn(2, 7, 16, requires_grad=True)
    proj = torch.nn.Linear(16, (4 + 2 + 2) * 8, bias=False)
    results = []
    for mode in ("triton", "reference"):
        x.grad, proj.weight.grad = None, None
        qkv = proj(x)
        q = qkv[..., :32].view(2, 7, 4, 8)  # [batch, seq, heads, head_dim], Gemma 4's layout
        k = qkv[..., 32:48].reshape(2, 7, 2, 8) * 1  # not a view: rotated in place
        with kernel_mode(mode):
            q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
        if mode == "triton":
            assert k_out is k and q_out.data_ptr() != q.data_ptr()
        (q_out * torch.arange(8.0)).sum().backward(retain_graph=True)
        (k_out ** 2).sum().backward()
        results.append((q_out.detach(), k_out.detach(), x.grad.clone(), proj.weight.grad.clone()))
    _assert_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_head_dim_not_contiguous_takes_the_reference():
    cos, sin = _llama_trig(16, PACKED, torch.float32)
    q, k = _qk((2, 4, 7, 16), (2, 2, 7, 16), torch.float32)
    q_strided = q.repeat_interleave(2, dim=-1)[..., ::2]  # head_dim stride 2
    assert q_strided.stride(-1) == 2
    with kernel_mode("triton"):
        got = apply_rope(q_strided, k.clone(), cos, sin)
    for g, w in zip(got, rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
