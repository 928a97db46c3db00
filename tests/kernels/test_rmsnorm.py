"""RMSNorm: the Triton kernel (in the interpreter) against its reference, and the reference
against the transformers modules it replaces."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.rmsnorm import RMSNorm, rms_norm, rms_norm_reference

CONVENTIONS = [(0.0, "llama"), (1.0, "gemma"), (0.0, "gemma")]


def _run(x, w, eps, offset, cast_mode, mode):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_() if w is not None else None
    with kernel_mode(mode):
        y = rms_norm(x, w, eps, offset, cast_mode)
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    y.backward(dy)
    return y, x.grad, (w.grad if w is not None else None)


@pytest.mark.parametrize("offset,cast_mode", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 1, 37), (3, 130), (100, 24), (7, 3000)])
def test_kernel_matches_reference(shape, dtype, offset, cast_mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3
    w = torch.randn(shape[-1], generator=gen, dtype=dtype)
    got = _run(x, w, 1e-6, offset, cast_mode, "triton")
    want = _run(x, w, 1e-6, offset, cast_mode, "reference")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)


def test_without_weight_gemma4_v_norm():
    x = torch.randn(2, 3, 4, 24, dtype=torch.float64)
    got = _run(x, None, 1e-6, 0.0, "gemma", "triton")
    want = _run(x, None, 1e-6, 0.0, "gemma", "reference")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_frozen_weight_gets_no_grad_but_x_does():
    x = torch.randn(4, 40, requires_grad=True)
    w = torch.randn(40)
    with kernel_mode("triton"):
        rms_norm(x * 1, w, 1e-5).sum().backward()
    with kernel_mode("reference"):
        x2 = x.detach().clone().requires_grad_()
        rms_norm(x2, w, 1e-5).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("offset,cast_mode", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp64(dtype, offset, cast_mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 200, generator=gen).to(dtype)
    w = (torch.rand(200, generator=gen) + 0.5).to(dtype)
    y, dx, dw = _run(x, w, 1e-6, offset, cast_mode, "triton")
    y_ref, dx_ref, dw_ref = _run(x.double(), w.double(), 1e-6, offset, cast_mode, "reference")
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    # One rounding to bf16 (8 bits of mantissa) is 0.4% relative; allow two, but not a wrong formula.
    rel = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.double(), y_ref, rtol=rel, atol=rel)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=rel, atol=rel * dx_ref.abs().max().item())
    torch.testing.assert_close(dw.double(), dw_ref, rtol=rel, atol=rel * dw_ref.abs().max().item())
    # The kernel rounds where the reference rounds: each output is within two units in the last
    # place of the reference's (Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to
    # nearest, and the llama path rounds twice).
    y_same = _run(x, w, 1e-6, offset, cast_mode, "reference")[0].float()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((y.float() - y_same).abs() <= 2 * ulp * y_same.abs() + 1e-6).all()


def _hf_modules(dim):
    llama, qwen, g3, g4, g4_noscale = (LlamaRMSNorm(dim, eps=1e-5), Qwen2RMSNorm(dim, eps=1e-6),
                                       Gemma3RMSNorm(dim, eps=1e-6), Gemma4RMSNorm(dim, eps=1e-6),
                                       Gemma4RMSNorm(dim, eps=1e-6, with_scale=False))
    with torch.no_grad():
        for m in (llama, qwen, g3, g4):
            m.weight.normal_()
    return [llama, qwen, g3, g4, g4_noscale]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_transformers_modules(dtype):
    for hf in _hf_modules(64):
        hf = hf.to(dtype)
        ours = RMSNorm.from_hf(hf)
        if hasattr(hf, "weight"):
            assert ours.weight is hf.weight
        x = torch.randn(3, 7, 64).to(dtype)
        with kernel_mode("reference"):
            got = ours(x)
        want = hf(x)
        assert got.dtype == want.dtype
        if type(hf).__name__ == "Gemma4RMSNorm":
            # Gemma 4 computes pow(ms, -0.5), not rsqrt: equal up to fp32 rounding before the cast.
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_from_hf_reads_each_convention():
    llama, qwen, g3, g4, g4_noscale = _hf_modules(8)
    ours = RMSNorm.from_hf(llama)
    assert (ours.offset, ours.cast_mode, ours.eps) == (0.0, "llama", 1e-5)
    assert (RMSNorm.from_hf(qwen).offset, RMSNorm.from_hf(qwen).cast_mode) == (0.0, "llama")
    assert (RMSNorm.from_hf(g3).offset, RMSNorm.from_hf(g3).cast_mode) == (1.0, "gemma")
    assert (RMSNorm.from_hf(g4).offset, RMSNorm.from_hf(g4).cast_mode) == (0.0, "gemma")
    assert RMSNorm.from_hf(g4_noscale).weight is None
    with pytest.raises(ValueError, match="unknown RMSNorm convention"):
        RMSNorm.from_hf(torch.nn.LayerNorm(8))


def test_rejects_unknown_cast_mode():
    with pytest.raises(ValueError, match="cast_mode"):
        rms_norm(torch.ones(2, 4), None, 1e-6, cast_mode="t5")


@pytest.mark.parametrize("partials,cols", [(1, 37), (4, 130), (130, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_partials_summed_in_one_launch(partials, cols, dtype):
    """dW's partials (one row per backward program; an H100 runs 528) summed over programs and cast
    in one kernel: more rows than a tile holds, and columns over several programs."""
    from vramplan_kernels.rmsnorm import _summed_dw

    partial = torch.randn(partials, cols, generator=torch.Generator().manual_seed(2))
    with kernel_mode("triton"):
        got = _summed_dw(partial, dtype)
    assert got.dtype == dtype and got.shape == (cols,)
    torch.testing.assert_close(got, partial.sum(0).to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
