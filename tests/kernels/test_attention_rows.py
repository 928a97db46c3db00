"""The chunked attention's row passes (vramplan_kernels.attention_rows) in Triton's interpreter against their
references, and the chunked attention with them against softmax attention over the whole square."""

import pytest
import torch

from vramplan.train import switches
from vramplan.train.attention import attention_reference, chunked_attention, fused_rows_apply
from vramplan_kernels.attention_rows import (softmax_grad_rows, softmax_grad_rows_reference, softmax_rows,
                                             softmax_rows_reference)
from vramplan_kernels.dispatch import kernel_mode


def _scores(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, rows, cols, generator=g) * 4


@pytest.mark.parametrize("rows,cols,queries,first", [(6, 37, 3, 2), (4, 1500, 4, 1496), (1, 5, 1, 4), (10, 64, 5, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_rows_match_the_reference(rows, cols, queries, first, causal):
    scores = _scores(rows, cols)
    with kernel_mode("triton"):
        probs, lse = softmax_rows(scores, 0.7, causal, first, queries, torch.float32)
    want_probs, want_lse = softmax_rows_reference(scores, 0.7, causal, first, queries, torch.float32)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, rows), atol=1e-5)


@pytest.mark.parametrize("rows,cols,queries,first", [(6, 37, 3, 2), (4, 1500, 4, 1496), (10, 64, 5, 0)])
def test_backward_rows_match_the_reference(rows, cols, queries, first):
    scores, grad = _scores(rows, cols), _scores(rows, cols, seed=1)
    _, lse = softmax_rows_reference(scores, 0.7, True, first, queries, torch.float32)
    delta = torch.randn(2, rows, generator=torch.Generator().manual_seed(2))
    with kernel_mode("triton"):
        probs, ds = softmax_grad_rows(scores, grad, lse, delta, 0.7, True, first, queries, torch.float32)
    want = softmax_grad_rows_reference(scores, grad, lse, delta, 0.7, True, first, queries, torch.float32)
    torch.testing.assert_close(probs, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols,queries,first,window", [(6, 37, 3, 20, 9), (4, 1500, 4, 1000, 700), (5, 9, 5, 4, 1)])
def test_windowed_rows_match_the_reference(rows, cols, queries, first, window):
    """A sliding window's band: keys ``window`` or more before the row's query are masked too, both ways."""
    scores, grad = _scores(rows, cols), _scores(rows, cols, seed=1)
    delta = torch.randn(2, rows, generator=torch.Generator().manual_seed(2))
    with kernel_mode("triton"):
        probs, lse = softmax_rows(scores, 0.7, True, first, queries, torch.float32, window)
        again, ds = softmax_grad_rows(scores, grad, lse, delta, 0.7, True, first, queries, torch.float32, window)
    want_probs, want_lse = softmax_rows_reference(scores, 0.7, True, first, queries, torch.float32, window)
    want_ds = softmax_grad_rows_reference(scores, grad, want_lse, delta, 0.7, True, first, queries, torch.float32,
                                          window)[1]
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, want_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, want_ds, rtol=1e-5, atol=1e-5)
    query = first + torch.arange(rows) % queries
    outside = torch.arange(cols)[None, :] <= (query - window)[:, None]
    assert (probs[:, outside] == 0).all() and (probs.sum(-1) - 1).abs().max() < 1e-5


def test_bf16_outputs():
    scores = _scores(4, 100)
    with kernel_mode("triton"):
        probs, _ = softmax_rows(scores, 1.0, True, 0, 4, torch.bfloat16)
    want, _ = softmax_rows_reference(scores, 1.0, True, 0, 4, torch.bfloat16)
    assert probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), want.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("h_kv,chunk", [(2, 5), (1, 13)])
def test_chunked_attention_with_the_fused_rows(h_kv, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 13, 8, generator=g).requires_grad_() for n in (4, h_kv, h_kv))
    dout = torch.randn(2, 4, 13, 8, generator=torch.Generator().manual_seed(1))
    with kernel_mode("triton"), switches.forced(wide_head_fused_rows=True):
        assert fused_rows_apply(q)
        out = chunked_attention(q, k, v, scale=0.7, causal=True, chunk=chunk)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = attention_reference(q, k, v, scale=0.7, causal=True)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_benchmark_cases_time_the_same_function():
    """benchmarks/kernel_cases/wide_attention.py at a tiny shape: every variant returns the same gradients."""
    from benchmarks.kernel_cases import wide_attention

    (case,) = wide_attention.cases("cpu", {"tiny": (1, 4, 2, 40, 16)})
    with kernel_mode("triton"):
        results = {name: run() for name, run in case.variants.items()}
    reference = results["sdpa math"]
    for name, grads in results.items():
        for a, b in zip(grads, reference):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05, msg=name)
