"""The QLoRA linear against its plain-PyTorch reference: forward, every gradient, both base paths."""

import math

import pytest
import torch

from vramplan_kernels import qlora_linear as qlora_module
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from vramplan_kernels.qlora_linear import (
    FUSED_MAX_TOKENS,
    FUSED_MIN_WEIGHT,
    QLoRALinear,
    base_path,
    choose_base_path,
    nf4_matmul,
    qlora_linear,
    qlora_linear_reference,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(x_shape, out_features, rank=4, bias=True, lora=True, dtype=torch.float32, seed=0):
    g = _gen(seed)
    in_features = x_shape[-1]
    weight = quantize_nf4(torch.randn(out_features, in_features, generator=g))
    x = torch.randn(x_shape, generator=g, dtype=dtype).requires_grad_()
    a = (torch.randn(rank, in_features, generator=g, dtype=dtype) * 0.1).requires_grad_() if lora else None
    b = (torch.randn(out_features, rank, generator=g, dtype=dtype) * 0.1).requires_grad_() if lora else None
    c = torch.randn(out_features, generator=g, dtype=dtype).requires_grad_() if bias else None
    return x, weight, a, b, c


def _forward_and_grads(fn, x, weight, a, b, c, grad_y=None):
    y = fn(x, weight, a, b, 0.5, c)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=_gen(9), dtype=y.dtype).to(y.device)
    inputs = [t for t in (x, a, b, c) if t is not None]
    return y, torch.autograd.grad(y, inputs, grad_y), grad_y


CASES = [  # x shape, out_features, bias, lora
    ((5, 100), 70, True, True),  # in/out not multiples of the block size
    ((1, 64), 48, False, True),  # a single token
    ((2, 3, 40), 24, True, True),  # a 3-D input [b, s, in]
    ((1, 7, 96), 33, True, False),  # batch of one, LoRA disabled
]


@pytest.mark.parametrize("mode,path", [("reference", None), ("triton", "fused"), ("triton", "dequant")])
@pytest.mark.parametrize("x_shape,out_features,bias,lora", CASES)
def test_matches_reference(mode, path, x_shape, out_features, bias, lora):
    x, weight, a, b, c = _problem(x_shape, out_features, bias=bias, lora=lora)
    y_ref, grads_ref, grad_y = _forward_and_grads(qlora_linear_reference, x, weight, a, b, c)
    with kernel_mode(mode):
        y, grads, _ = _forward_and_grads(
            lambda *args: qlora_linear(*args, base_path=path), x, weight, a, b, c, grad_y)
    assert y.shape == (*x_shape[:-1], out_features)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, grads_ref):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# The fused kernels at the interpreter's tiles (16 x 32 x 64): M = 1 and 17 (a partial M block), N not a
# multiple of 32, K = 64·3 (a partial K tile of 64 at the end of a 128 chunk when split), splits forced
# above 1 (the CPU has one "SM"), block sizes 32 and 128 (an absmax for part of a tile row, or for more).
FUSED_SHAPES = [  # m, n, k, blocksize, double_quant, splits
    (1, 48, 192, 64, True, None),
    (17, 70, 192, 64, False, None),
    (17, 70, 192, 64, True, 3),
    (5, 33, 128, 64, False, 2),
    (3, 40, 96, 32, True, 2),
    (4, 24, 256, 128, True, None),
    (6, 20, 100, 64, True, None),  # K % 64 != 0: a block straddles rows, the dequantized weight instead
]


def _nf4_weight(n, k, blocksize, double_quant, seed=0):
    return quantize_nf4(torch.randn(n, k, generator=_gen(seed)), blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "input_grad"])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant,splits", FUSED_SHAPES)
def test_nf4_matmul_fp32_matches_dequantized_weight(m, n, k, blocksize, double_quant, splits, transpose_w):
    q = _nf4_weight(n, k, blocksize, double_quant)
    w = dequantize_nf4_reference(q, torch.float64)
    a = torch.randn(m, k if transpose_w else n, generator=_gen(1))
    with kernel_mode("triton"):
        out = nf4_matmul(a, q, transpose_w, splits)
    expected = a.double() @ (w.t() if transpose_w else w)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "input_grad"])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant,splits", FUSED_SHAPES[:4])
def test_nf4_matmul_bf16_multiplies_the_dequant_paths_weight(m, n, k, blocksize, double_quant, splits, transpose_w):
    """bf16 activations: the product of the bf16-rounded weight dequant + cuBLAS would multiply,
    summed in fp32 and rounded once (so at most a bf16 rounding apart, from the order of the sum)."""
    q = _nf4_weight(n, k, blocksize, double_quant)
    w = dequantize_nf4_reference(q, torch.bfloat16).float()
    a = torch.randn(m, k if transpose_w else n, generator=_gen(1)).to(torch.bfloat16)
    with kernel_mode("triton"):
        out = nf4_matmul(a, q, transpose_w, splits)
    expected = (a.float() @ (w.t() if transpose_w else w)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_reduction_splits_fill_idle_sms(monkeypatch):
    monkeypatch.setattr(qlora_module, "sm_count", lambda device: 132)  # an H100
    splits = qlora_module._reduction_splits
    assert splits(64, 4096, 14336, "cuda") == 4  # Llama-8B up's input gradient: 32 column tiles
    assert splits(64, 14336, 4096, "cuda") == 1  # its forward: 112 tiles
    assert splits(64, 1536, 6144, "cuda") == 11  # Gemma-4-E2B up's input gradient: 12 tiles
    assert splits(1, 64, 1024, "cuda") == 2  # no split shorter than MIN_SPLIT_LENGTH
    assert splits(256, 4096, 14336, "cpu") == 1


def test_tile_configs_fit_the_token_count():
    configs = qlora_module._tile_configs(wide=False)
    assert {c.kwargs["BLOCK_M"] for c in qlora_module._tiles_for_m(configs, {"m_bucket": 16})} == {16}
    assert {c.kwargs["BLOCK_M"] for c in qlora_module._tiles_for_m(configs, {"m_bucket": 256})} == {16, 32, 64}
    assert len(qlora_module._tile_configs(wide=True)) == 3 * 3 * 3 * 2 * 2


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("x_shape,out_features", [((17, 192), 70), ((2, 3, 128), 40)])
def test_fused_path_forward_and_gradients_match_reference(x_shape, out_features, double_quant):
    """Through the autograd Function: the fused kernels in the forward (x·Wᵀ) and backward (dY·W)."""
    g = _gen(3)
    weight = quantize_nf4(torch.randn(out_features, x_shape[-1], generator=g), double_quant=double_quant)
    x, _, a, b, c = _problem(x_shape, out_features)
    y_ref, grads_ref, grad_y = _forward_and_grads(qlora_linear_reference, x, weight, a, b, c)
    with kernel_mode("triton"):
        y, grads, _ = _forward_and_grads(
            lambda *args: qlora_linear(*args, base_path="fused"), x, weight, a, b, c, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, grads_ref):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_float64():
    x, weight, a, b, c = _problem((3, 70), 20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: qlora_linear_reference(t[0], weight, *t[1:3], 0.7, t[3]), (x, a, b, c))


def test_autograd_function_gradcheck_float64():
    x, weight, a, b, c = _problem((3, 70), 20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: qlora_linear(t[0], weight, *t[1:3], 0.7, t[3]), (x, a, b, c))


def test_bf16_base_and_mixed_dtypes():
    """bf16 activations, an fp32 LoRA pair, a plain bf16 weight: output in bf16, LoRA grads in fp32."""
    g = _gen(1)
    weight = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    x = torch.randn(6, 96, generator=g).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(8, 96, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(40, 8, generator=g) * 0.1).requires_grad_()
    y, (gx, ga, gb), grad_y = _forward_and_grads(qlora_linear, x, weight, a, b, None)
    y_ref, (rx, ra, rb), _ = _forward_and_grads(qlora_linear_reference, x, weight, a, b, None, grad_y)
    assert y.dtype == gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    for ours, ref in ((gx, rx), (ga, ra), (gb, rb)):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_base_path_choice_follows_token_count_and_weight_size_and_can_be_forced():
    big, small = FUSED_MIN_WEIGHT, FUSED_MIN_WEIGHT - 1
    assert choose_base_path(FUSED_MAX_TOKENS, big) == "fused" and choose_base_path(1, big) == "fused"
    assert choose_base_path(FUSED_MAX_TOKENS + 1, big) == "dequant"
    assert choose_base_path(1, small) == "dequant"  # too small a weight for one read of it to pay
    with base_path("fused"):
        assert choose_base_path(4096, small) == "fused"
    with base_path("dequant"):
        assert choose_base_path(1, big) == "dequant"
    assert choose_base_path(8, big, "dequant") == "dequant"
    with pytest.raises(ValueError, match="choose one of"):
        qlora_linear(torch.ones(1, 64), quantize_nf4(torch.ones(8, 64)), None, None, 1.0, base_path="cublas")


def test_module_from_linear_nf4():
    linear = torch.nn.Linear(96, 40)
    module = QLoRALinear.from_linear(linear, rank=8, alpha=16)
    assert (module.in_features, module.out_features, module.rank, module.scale) == (96, 40, 8, 2.0)
    assert isinstance(module.weight, NF4Tensor)
    assert set(module.state_dict()) == {"bias", "lora_A.weight", "lora_B.weight"}
    assert module.lora_A.weight.shape == (8, 96) and module.lora_B.weight.shape == (40, 8)
    assert torch.count_nonzero(module.lora_B.weight) == 0
    bound = 1 / math.sqrt(96)  # kaiming_uniform_(a=sqrt(5)) on [8, 96], as PEFT initialises A
    assert module.lora_A.weight.abs().max() <= bound and module.lora_A.weight.std() > bound / 3
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(2, 5, 96)
    # B = 0: the adapter starts as the identity on the quantized base
    torch.testing.assert_close(module(x), x @ dequantize_nf4(module.weight).t() + linear.bias)
    module.lora_B.weight.data.normal_()
    module(x).sum().backward()
    assert module.lora_A.weight.grad is not None and module.lora_B.weight.grad is not None
    assert module.to("cpu").weight.packed.device.type == "cpu"


def test_module_from_linear_bf16_and_unknown_quant():
    linear = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    module = QLoRALinear.from_linear(linear, rank=4, alpha=8, quant="bf16", lora_dtype=torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16 and not module.weight.requires_grad
    # an unquantized base keeps the dtype the model was loaded in
    assert QLoRALinear.from_linear(torch.nn.Linear(64, 32), rank=4, alpha=8, quant="bf16").weight.dtype == torch.float32
    assert module.lora_A.weight.dtype == torch.bfloat16
    y = module(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 32)
    with pytest.raises(ValueError, match="nf4 or bf16"):
        QLoRALinear.from_linear(linear, rank=4, alpha=8, quant="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 2048])
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_gpu_matches_reference_at_real_shapes(tokens, path):
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = quantize_nf4(torch.randn(6144, 1536, device="cuda", dtype=torch.bfloat16, generator=g))
    x = torch.randn(tokens, 1536, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    a = (torch.randn(16, 1536, device="cuda", generator=g) * 0.02).requires_grad_()
    b = (torch.randn(6144, 16, device="cuda", generator=g) * 0.02).requires_grad_()
    y, grads, grad_y = _forward_and_grads(lambda *t: qlora_linear(*t, base_path=path), x, weight, a, b, None)
    y_ref, grads_ref, _ = _forward_and_grads(qlora_linear_reference, x, weight, a, b, None, grad_y)
    # bf16 LoRA matmuls (as under autocast) against an fp32 reference: compare whole tensors
    for ours, ref in zip((y, *grads), (y_ref, *grads_ref)):
        assert (ours.float() - ref.float()).norm() <= 1e-2 * ref.float().norm()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_gpu_fused_matches_dequant_at_llama_8b_up(tokens):
    """Llama-3.1-8B's up projection (K = 4096, N = 14336): both base paths multiply the same bf16
    weight, so forward and input gradient agree to the order of an fp32 sum; so does the whole layer."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = quantize_nf4(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g))
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    grad_y = torch.randn(tokens, 14336, device="cuda", dtype=torch.bfloat16, generator=g)
    w = dequantize_nf4(weight, torch.bfloat16)
    for fused, dense in ((nf4_matmul(x, weight, True), x @ w.t()), (nf4_matmul(grad_y, weight, False), grad_y @ w)):
        assert (fused.float() - dense.float()).norm() <= 1e-3 * dense.float().norm()
    a = (torch.randn(16, 4096, device="cuda", generator=g) * 0.02).requires_grad_()
    b = (torch.randn(14336, 16, device="cuda", generator=g) * 0.02).requires_grad_()
    x.requires_grad_()
    results = {}
    for path in ("fused", "dequant"):
        results[path] = _forward_and_grads(lambda *t: qlora_linear(*t, base_path=path), x, weight, a, b, None, grad_y)
    (y_f, grads_f, _), (y_d, grads_d, _) = results["fused"], results["dequant"]
    for ours, ref in zip((y_f, *grads_f), (y_d, *grads_d)):
        assert (ours.float() - ref.float()).norm() <= 1e-3 * ref.float().norm()


def test_benchmark_cases_run_at_tiny_shapes():
    from benchmarks.kernel_cases import qlora_linear as qlora_cases

    with kernel_mode("triton"):
        cases = qlora_cases.cases("cpu", shapes={"tiny": (64, 32), "other": (128, 48)}, tokens=(16, 80),
                                  fused_tokens=(16,), small_shapes=("tiny",))
        assert len(cases) == 4 and cases[0].flops == qlora_cases.qlora_flops(16, 64, 32, qlora_cases.RANK)
        all_grads = [{name: fn() for name, fn in case.variants.items()} for case in cases]
    # the fused path only where it is timed (fused_tokens): at 80 tokens it is not
    assert ["vramplan fused" in case.variants for case in cases] == [True, False, False, False]
    assert all(case.cuda_graph and "vramplan QLoRALinear" in case.variants for case in cases)  # all under 4,096 tokens
    # each case keeps its own shape's tensors (no late-bound closure sees the last shape)
    for (k, n), grads in zip([(64, 32), (64, 32), (128, 48), (128, 48)], all_grads):
        assert "bnb matmul_4bit + peft lora" in grads
        assert grads["vramplan"][1].shape == (qlora_cases.RANK, k)
        assert grads["vramplan"][2].shape == (n, qlora_cases.RANK)
        for name, g in grads.items():
            for ours, ref in zip(grads["vramplan"], g):  # bf16 dX: within a bf16 rounding of the largest value
                assert (ours.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max(), name


class _DataSGD(torch.optim.Optimizer):
    """Writes the parameters through ``.data``, which leaves their version counters alone, as
    bitsandbytes' fused 8-bit update does."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.5})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_module_casts_adapters_once_per_optimizer_step():
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(32, 24, bias=False), rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    copies = layer._lora_copies.get(a, b, torch.bfloat16)
    assert layer._lora_copies.get(a, b, torch.bfloat16) is copies  # cached between calls
    y = layer(x)
    expected = qlora_linear(x, layer.weight, a, b, layer.scale)  # casts afresh
    assert torch.equal(y, expected)
    y.float().square().sum().backward()
    version = a._version
    _DataSGD([a, b]).step()
    assert a._version == version  # the update bypassed the version counter ...
    fresh = layer._lora_copies.get(a, b, torch.bfloat16)
    assert fresh is not copies and torch.equal(fresh[0], a.detach().to(torch.bfloat16))  # ... the step hook caught it
    with torch.no_grad():
        b.mul_(2)  # an in-place torch op bumps the version
    assert torch.equal(layer._lora_copies.get(a, b, torch.bfloat16)[2], b.detach().to(torch.bfloat16))
    assert torch.equal(layer(x), qlora_linear(x, layer.weight, a, b, layer.scale))


def _loss_scaled_fp16_problem(tokens=2048):
    """fp16 activations and a loss-scaled output gradient (64 a token: inside fp16's range) whose adapter gradients,
    summed over the tokens, pass fp16's 65,504; the fp64 reference gradients."""
    g = _gen(3)
    weight = torch.randn(16, 32, generator=g).to(torch.float16)
    x = torch.randn(tokens, 32, generator=g).abs().to(torch.float16).requires_grad_()
    a = (torch.rand(4, 32, generator=g) * 0.1).requires_grad_()
    b = (torch.rand(16, 4, generator=g) * 0.1).requires_grad_()
    grad_y = torch.full((tokens, 16), 64.0, dtype=torch.float16)
    x64, g64 = x.detach().double(), grad_y.double()
    grad_b = 2.0 * g64.t() @ (x64 @ a.detach().double().t())
    grad_a = (2.0 * g64 @ b.detach().double()).t() @ x64
    assert min(grad_a.abs().max(), grad_b.abs().max()) > torch.finfo(torch.float16).max  # fp16 would overflow
    return x, weight, a, b, grad_y, grad_a, grad_b


def test_fp16_adapter_gradients_past_fp16s_range_stay_finite():
    """fp16 steps scale their loss (``train.loss_scale``): a weight gradient sums over every token and passes fp16's
    65,504 where each token's gradient is far inside it, so the backward writes dA and dB in fp32."""
    x, weight, a, b, grad_y, ref_a, ref_b = _loss_scaled_fp16_problem()
    y = qlora_linear(x, weight, a, b, 2.0)
    assert y.dtype == torch.float16
    grad_a, grad_b = torch.autograd.grad(y, (a, b), grad_y)
    torch.testing.assert_close(grad_a.double(), ref_a, rtol=5e-3, atol=0)
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=5e-3, atol=0)


def test_fp16_adapter_gradients_into_the_flat_buffer_stay_finite():
    """The same through the flat gradient buffer the flat optimizer step reads (``flat_adapters``)."""
    x, weight, a, b, grad_y, ref_a, ref_b = _loss_scaled_fp16_problem()
    flat = torch.nn.Parameter(torch.cat([a.detach().flatten(), b.detach().flatten()]))
    grad = torch.zeros_like(flat)
    qlora_module.flat_adapters(flat, grad)
    try:
        a_view = flat[:a.numel()].view_as(a)
        b_view = flat[a.numel():].view_as(b)
        qlora_linear(x, weight, a_view, b_view, 2.0).backward(grad_y)
    finally:
        qlora_module._flat_adapters.clear()
    torch.testing.assert_close(grad[:a.numel()].view_as(a).double(), ref_a, rtol=5e-3, atol=0)
    torch.testing.assert_close(grad[a.numel():].view_as(b).double(), ref_b, rtol=5e-3, atol=0)
