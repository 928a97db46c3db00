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
