"""The row-wise int8 head: its quantization error bound, its lookup, and the fused loss on it against
the reference (dequantize whole, then F.cross_entropy) with the head split into several odd slices."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_linear_cross_entropy import TOL, compare, make_inputs
from vramplan_kernels import int8_rows
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.int8_rows import Int8Rows, slice_rows
from vramplan_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 7 rows of a 16-wide fp32 head (5 of fp64): several ragged slices at test sizes."""
    monkeypatch.setattr(int8_rows, "DEQUANT_SLICE_BYTES", 7 * 16 * 4)


def test_quantize_error_is_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 24, generator=g) * torch.linspace(0.01, 3.0, 300).unsqueeze(1)
    weight[5] = 0.0  # an all-zero row must not divide by zero
    q = Int8Rows.quantize(weight, dtype=torch.float32)
    assert q.data.dtype == torch.int8 and q.scale.shape == (300,) and q.nbytes == 300 * 24 + 300 * 4
    err = (q.dequantize() - weight).abs()
    assert (err <= q.scale.unsqueeze(1) / 2 + 1e-7).all()
    assert (q.dequantize()[5] == 0).all()
    assert (q.data.abs().amax(1)[torch.arange(300) != 5] == 127).all()  # every row uses its full range
    torch.testing.assert_close(q.dequantize(10, 20), q.dequantize()[10:20])


def test_quantize_in_slices_equals_quantize_at_once(monkeypatch):
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    whole = Int8Rows.quantize(weight)
    monkeypatch.setattr(int8_rows, "DEQUANT_SLICE_BYTES", 3 * 8 * 4)
    sliced = Int8Rows.quantize(weight)
    assert torch.equal(whole.data, sliced.data) and torch.equal(whole.scale, sliced.scale)
    assert sliced.dtype == torch.bfloat16


def test_lookup_dequantizes_exactly_the_gathered_rows():
    q = Int8Rows.quantize(torch.randn(40, 6, generator=torch.Generator().manual_seed(3)))
    ids = torch.tensor([[3, 39, 0], [3, 7, 12]])
    rows = q.lookup(ids)
    assert rows.shape == (2, 3, 6)
    torch.testing.assert_close(rows, q.dequantize()[ids], atol=0, rtol=0)


def test_slice_rows_budget():
    assert slice_rows(2048, torch.bfloat16) == 8192
    assert slice_rows(5376, torch.bfloat16) == 3072
    assert slice_rows(5376, torch.bfloat16) * 5376 * 2 <= int8_rows.DEQUANT_SLICE_BYTES


def quantized_inputs(n, h, v, dtype, head="frozen", **options):
    hidden, weight, labels, kwargs = make_inputs(n, h, v, dtype, head=head, **options)
    return hidden, Int8Rows.quantize(weight.detach(), dtype=dtype), labels, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head", ["frozen", "lora"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_quantized_head_matches_reference(small_slices, dtype, head, softcap, reduction):
    hidden, weight, labels, kwargs = quantized_inputs(11, 16, 257, dtype, head=head, bias=head == "frozen")
    assert -(-257 // slice_rows(16, dtype)) >= 30  # the head really is walked in slices, the last one ragged
    compare(hidden, weight, labels, kwargs, TOL[dtype], softcap=softcap, reduction=reduction, chunk_size=4)


def test_quantized_head_loss_close_to_the_bf16_head_it_came_from():
    hidden, weight, labels, kwargs = make_inputs(32, 64, 1000, torch.float32)
    with torch.no_grad():
        weight.mul_(0.1)
    exact, _ = linear_cross_entropy_reference(hidden, weight, labels, softcap=30.0)
    with kernel_mode("triton"):
        quant, _ = linear_cross_entropy(hidden, Int8Rows.quantize(weight), labels, softcap=30.0, chunk_size=8)
    assert abs(quant.item() - exact.item()) < 2e-3 * exact.item()


def test_bf16_quantized_head_sums_grad_hidden_in_fp32(monkeypatch):
    """bf16 partial products over 8 slices, summed in fp32: as close to the reference as one bf16 matmul."""
    monkeypatch.setattr(int8_rows, "DEQUANT_SLICE_BYTES", 64 * 32 * 2)
    hidden, weight, labels, kwargs = quantized_inputs(9, 32, 500, torch.bfloat16, head="lora")
    with kernel_mode("triton"):
        loss, _ = linear_cross_entropy(hidden, weight, labels, softcap=5.0, chunk_size=4, **kwargs)
    ref, _ = linear_cross_entropy_reference(hidden, weight, labels, softcap=5.0, **kwargs)
    tensors = [hidden, *kwargs["lora"][:2]]
    for grad, want in zip(torch.autograd.grad(loss, tensors), torch.autograd.grad(ref, tensors)):
        torch.testing.assert_close(grad.float(), want.float(), atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-2)


def test_int8_rows_rejects_other_storage():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="int8 data"):
        Int8Rows(weight, torch.ones(4), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("vocab, frozen_bias", [(257, True), (30, False)])
def test_vocabulary_major_pass_matches_reference(small_slices, monkeypatch, dtype, softcap, reduction, vocab,
                                                 frozen_bias):
    """The trainer's head (frozen int8 rows, maybe a frozen bias, only the hidden states differentiated)
    takes the vocabulary-major pass: ragged slices of 7 rows (3 in fp64), one block of all 11 tokens, or
    several where a chunk of 1 token's logits over 30 rows leaves room for fewer, ignored labels. Losses
    and grad_hidden match the reference under a non-unit upstream gradient."""
    from vramplan_kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_ChunkedHead", None)  # the token-major pass would fail: prove it is not taken
    hidden, weight, labels, _ = quantized_inputs(11, 16, vocab, dtype)
    bias = torch.randn(vocab, generator=torch.Generator().manual_seed(5), dtype=dtype) if frozen_bias else None
    tokens, rows = lce.vocab_major_shape(11, vocab, 16, dtype, chunk=1)
    assert rows == (7 if dtype == torch.float32 else 3) and (tokens == 11) == (vocab == 257)
    options = dict(softcap=softcap, reduction=reduction, bias=bias)
    with kernel_mode("triton"):
        loss, count = linear_cross_entropy(hidden, weight, labels, chunk_size=1, **options)
    ref, ref_count = linear_cross_entropy_reference(hidden, weight, labels, **options)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), hidden)
    (want,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    assert count.item() == ref_count.item()
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype])
    torch.testing.assert_close(grad, want, **TOL[dtype])
    assert (grad[labels == -100] == 0).all() and grad.abs().sum() > 0


def test_vocabulary_major_blocks_keep_the_chunk_budget():
    """A block's logits hold no more values than the token-major chunk's, and its rows one dequantized
    slice at most; a micro-batch's tokens usually fit one block (the head dequantized once)."""
    from vramplan_kernels.linear_cross_entropy import default_chunk_size, vocab_major_shape

    for n, vocab, cols, budget in [(2048, 128256, 2048, 64 << 20), (2048, 262144, 5376, 128 << 20),
                                   (16384, 262144, 1536, 128 << 20), (11, 257, 16, None)]:
        chunk = default_chunk_size(n, vocab, torch.bfloat16, budget)
        tokens, rows = vocab_major_shape(n, vocab, cols, torch.bfloat16, chunk)
        assert tokens * rows <= chunk * vocab and rows <= min(slice_rows(cols, torch.bfloat16), vocab)
        assert 1 <= tokens <= n
    assert vocab_major_shape(2048, 128256, 2048, torch.bfloat16, 256) == (2048, 8192)


def test_bf16_vocabulary_major_pass_close_to_reference():
    hidden, weight, labels, _ = quantized_inputs(64, 32, 1000, torch.bfloat16)
    with kernel_mode("triton"):
        loss, _ = linear_cross_entropy(hidden, weight, labels, softcap=30.0, chunk_size=8, reduction="sum")
    ref, _ = linear_cross_entropy_reference(hidden, weight, labels, softcap=30.0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss.float(), ref.float(), atol=0.5, rtol=1e-2)
    torch.testing.assert_close(grad.float(), want.float(), atol=2e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, cols, vocab, softcap", [(2048, 2048, 128256, None), (1024, 1536, 262144, 30.0)])
def test_vocabulary_major_pass_equals_token_major_at_real_shapes(tokens, cols, vocab, softcap):
    """Llama-3.2-1B's and Gemma 4's heads on the GPU: the two walks give the same loss and grad_hidden
    (within bf16 rounding of their different summation orders)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    rows = Int8Rows.quantize(torch.randn(vocab, cols, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=generator)
    labels[::7] = -100
    results = []
    for vocab_major in (True, False):
        loss, _ = linear_cross_entropy(hidden, rows, labels, softcap=softcap, vocab_major=vocab_major, reduction="sum")
        results.append((loss.detach(), torch.autograd.grad(loss, hidden)[0]))
    (loss, grad), (want_loss, want_grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0.5)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=5e-2, atol=2e-3)
