"""NF4 against bitsandbytes (the format's owner) both ways, and the Triton kernels against the reference."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.nf4 import (
    NF4Tensor,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_code,
    nf4_code,
    quantize_nf4,
    quantize_nf4_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 64-multiples, a trailing partial block, an odd numel, and more than one 256-block group of absmax
SHAPES = [(64, 48), (33, 17), (3, 1001), (300 * 64 + 17,)]


def _bnb_quantize(w, double_quant=True):
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantization of the flattened weight.

    Its CPU kernel (0.50.2) decodes rows of even length that are not a multiple of the block
    size wrongly (a [64, 48] weight comes back scaled by ~1/100); its default backend and its
    flat path agree with each other and with us, so compare against the flat path.
    """
    flat = bnbf.QuantState(absmax=state.absmax, shape=torch.Size([state.shape.numel()]), code=state.code,
                           blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                           offset=state.offset, state2=state.state2)
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def _weight(shape, dtype, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w.view(-1)[:64] = 0  # an all-zero block: bitsandbytes' clamp of the absmax
    return w


def test_code_books_are_bitsandbytes():
    assert torch.equal(nf4_code("cpu"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code("cpu"), bnbf.create_dynamic_map())


@pytest.mark.parametrize("mode", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes_bytes(mode, dtype, shape):
    w = _weight(shape, dtype)
    packed, state = _bnb_quantize(w)
    with kernel_mode(mode):
        q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    assert q.absmax_offset.item() == state.offset.item()
    assert q.shape == w.shape and q.dtype == dtype


@pytest.mark.parametrize("mode", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_weights_dequantize_identically(mode, dtype, shape):
    packed, state = _bnb_quantize(_weight(shape, dtype, seed=1))
    expected = _bnb_dequantize(packed, state)
    with kernel_mode(mode):
        ours = dequantize_nf4(NF4Tensor.from_bnb(packed, state))
    assert ours.dtype == dtype
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_our_weights_dequantize_identically_in_bitsandbytes(double_quant, dtype):
    w = _weight((45, 70), dtype, seed=2)
    with kernel_mode("triton"):
        q = quantize_nf4(w, double_quant=double_quant)
        ours = dequantize_nf4(q)
    packed, state = q.to_bnb()
    assert torch.equal(_bnb_dequantize(packed, state), ours)
    assert torch.equal(NF4Tensor.from_bnb(packed, state).packed, q.packed)


def test_single_quant_absmax_is_fp32_and_matches_bitsandbytes():
    w = _weight((20, 50), torch.bfloat16)
    packed, state = _bnb_quantize(w, double_quant=False)
    with kernel_mode("triton"):
        q = quantize_nf4(w, double_quant=False)
        assert torch.equal(dequantize_nf4(NF4Tensor.from_bnb(packed, state)), dequantize_nf4(q))
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, state.absmax)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_triton_dequantize_matches_reference_in_other_dtypes(out_dtype):
    q = quantize_nf4_reference(_weight((77, 130), torch.bfloat16, seed=3))
    with kernel_mode("triton"):
        ours = dequantize_nf4(q, out_dtype)
    assert torch.equal(ours, dequantize_nf4_reference(q, out_dtype))
    assert torch.equal(ours, dequantize_nf4(q, out=torch.empty(q.shape, dtype=out_dtype)))


def test_dequantized_error_is_within_one_code_step():
    w = _weight((64, 256), torch.float32, seed=4)
    q = quantize_nf4(w)
    err = (dequantize_nf4(q) - w).abs().view(-1, 64).amax(1)
    absmax = w.abs().view(-1, 64).amax(1)
    assert (err <= 0.16 * absmax + 1e-6).all()  # the widest NF4 gap is 0.30 of the absmax


def test_nbytes_and_move():
    q = quantize_nf4(torch.randn(128, 256))
    blocks = 128 * 256 // 64
    assert q.nbytes() == 128 * 256 // 2 + blocks + 2 * 4 + 256 * 4  # packed, 8-bit absmax, 2 scales, code book
    assert q.to("cpu").packed.data_ptr() == q.packed.data_ptr()


def test_rejects_integer_weights():
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 1536), (4096, 14336)])
def test_gpu_matches_bitsandbytes_at_real_shapes(shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = _bnb_quantize(w)
    # Decoding is deterministic arithmetic: bit-exact with bitsandbytes' CUDA kernel.
    assert torch.equal(dequantize_nf4(NF4Tensor.from_bnb(packed, state)), bnbf.dequantize_4bit(packed, state))
    q = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(q), dequantize_nf4_reference(q))
    # bitsandbytes' CUDA quantizer compares against hard-coded midpoints with fast-math reciprocals,
    # so a value within rounding of a midpoint may take the neighbouring code there.
    same = (q.packed == packed.view(-1)).float().mean().item()
    assert same > 0.9999, same


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_gpu_repeated_decodes_take_the_direct_launch(double_quant):
    """After the first decode of a weight the compiled kernel is launched without the JIT; every
    decode (into the same buffer, refilled in between, and into a fresh one) stays exact."""
    from vramplan_kernels.nf4 import _dequant_launch

    q = quantize_nf4(torch.randn(1536, 640, device="cuda", dtype=torch.bfloat16), double_quant=double_quant)
    expected = dequantize_nf4_reference(q)
    out = torch.empty(q.shape, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        out.fill_(float("nan"))
        assert torch.equal(dequantize_nf4(q, out=out), expected)
    assert torch.equal(dequantize_nf4(q), expected)
    launchers = _dequant_launch(q).compiled
    assert launchers and all(getattr(f, "__name__", "") != "_jit" for f in launchers.values())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 1536), (1536, 640)])
def test_gpu_every_benchmarked_launch_decodes_exactly(shape):
    """The launches the benchmark compares (one wave of looping programs, one tile per program,
    the byte kernel), each twice: the JIT's launch, then the compiled kernel's direct one."""
    from benchmarks.kernel_cases.nf4 import LAUNCHES
    from vramplan_kernels.nf4 import dequantize_nf4_with

    q = quantize_nf4(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
    expected = dequantize_nf4_reference(q)
    out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    for config in LAUNCHES.values():
        for _ in range(2):
            out.fill_(float("nan"))
            assert torch.equal(dequantize_nf4_with(q, out, config), expected), config


def test_benchmark_cases_run_at_tiny_shapes():
    from benchmarks.kernel_cases import nf4 as nf4_cases

    cases = nf4_cases.cases("cpu", shapes={"tiny": (32, 128)})
    assert [c.op for c in cases] == ["nf4_dequantize"] and next(iter(cases[0].variants)) == "vramplan"
    assert {"bitsandbytes", "torch"} <= set(cases[0].variants)
    results = [fn() for fn in cases[0].variants.values()]
    for other in results[1:]:
        assert torch.equal(results[0], other.reshape(results[0].shape))
    assert cases[0].bytes_moved == 32 * 128 // 2 + 64 + 4 + 2 * 32 * 128


# Whole int32 words of packed bytes and more than one tile: the word kernel (the GPU's path for
# real weights); a partial last tile and a partial 256-block absmax group.
WORD_SHAPES = [(128, 96), (40, 1000)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", WORD_SHAPES)
def test_word_kernel_decodes_bitsandbytes_weights_identically(shape, double_quant, monkeypatch):
    import vramplan_kernels.nf4 as nf4
    from vramplan_kernels.nf4 import _dequant_launch

    monkeypatch.setattr(nf4, "WORD_KERNEL_BY_DEFAULT", True)  # the default launch for every size

    packed, state = _bnb_quantize(_weight(shape, torch.bfloat16, seed=2), double_quant)
    q = NF4Tensor.from_bnb(packed, state)
    with kernel_mode("triton"):
        ours = dequantize_nf4(q)
    assert _dequant_launch(q).config.words  # the word kernel ran, not the byte fallback
    assert torch.equal(ours, _bnb_dequantize(packed, state))


@pytest.mark.parametrize("config", [
    dict(words=256, num_warps=4, programs_per_sm=16),  # one wave: on the CPU a single program loops over every tile
    dict(words=256, num_warps=4, programs_per_sm=3, prefetch_absmax=False),
    dict(words=128, num_warps=4, programs_per_sm=0),  # one tile per program
    dict(words=512, num_warps=8, programs_per_sm=2),
    dict(words=0, block_bytes=512),  # the byte kernel
])
def test_every_launch_config_decodes_the_same(config):
    from vramplan_kernels.nf4 import DequantConfig, dequantize_nf4_with

    q = quantize_nf4_reference(_weight((96, 640), torch.float32, seed=3))
    expected = dequantize_nf4_reference(q, torch.bfloat16)
    with kernel_mode("triton"):
        out = dequantize_nf4_with(q, torch.empty(q.shape, dtype=torch.bfloat16), DequantConfig(**config))
    assert torch.equal(out, expected)


def test_unaligned_packed_bytes_fall_back_to_the_byte_kernel():
    from vramplan_kernels.nf4 import _dequant_launch

    q = quantize_nf4_reference(_weight((64, 128), torch.float32, seed=4))
    shifted = torch.empty(q.packed.numel() + 1, dtype=torch.uint8)[1:]  # storage offset 1: no int32 view
    shifted.copy_(q.packed)
    moved = NF4Tensor(shifted, q.absmax, q.shape, q.dtype, q.blocksize, q.absmax_scale, q.absmax_offset, q.absmax_code)
    with kernel_mode("triton"):
        assert torch.equal(dequantize_nf4(moved, torch.float32), dequantize_nf4_reference(q, torch.float32))
    assert _dequant_launch(moved).config.words == 0


def test_programs_that_fit_an_sm():
    from vramplan_kernels.nf4 import programs_that_fit

    # 4 warps: 40 registers (the word kernel with its absmax prefetch) -> 12; 32 -> 16 (the warp limit)
    assert programs_that_fit(40, 4) == 12 and programs_that_fit(32, 4) == 16 and programs_that_fit(16, 4) == 16
    assert programs_that_fit(80, 8) == 3 and programs_that_fit(255, 8) == 1
    assert programs_that_fit(0, 4) == 0  # unknown (the interpreter): keep the configured count


def test_a_word_kernel_that_does_not_build_falls_back_to_the_byte_kernel(monkeypatch):
    """A Triton that cannot build the word kernel (only Triton 3.9 compiled it here) still decodes: with the byte kernel."""
    import vramplan_kernels.nf4 as nf4

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(nf4, "WORD_KERNEL_BY_DEFAULT", True)
    monkeypatch.setattr(nf4, "_nf4_dequantize_words_kernel", Unbuildable())
    q = quantize_nf4_reference(_weight((128, 96), torch.float32, seed=5))
    with kernel_mode("triton"), pytest.warns(RuntimeWarning, match="byte kernel"):
        out = dequantize_nf4(q, torch.float32)
    assert torch.equal(out, dequantize_nf4_reference(q, torch.float32))
    assert nf4._dequant_launch(q).config.words == 0


def test_small_weights_take_the_word_kernel_and_large_ones_the_byte_kernel():
    """The trainer's launch per size: the byte kernel for a few tiles and above SMALL_WEIGHT_MAX_BYTES,
    the one-wave word kernel between; a small weight decodes exactly through it."""
    import vramplan_kernels.nf4 as nf4
    from vramplan_kernels.nf4 import _dequant_config, _dequant_launch

    assert _dequant_config(2048) == nf4.BYTE_KERNEL
    assert _dequant_config(4096) == _dequant_config(nf4.SMALL_WEIGHT_MAX_BYTES) == nf4.SMALL_WEIGHT_LAUNCH
    assert _dequant_config(nf4.SMALL_WEIGHT_MAX_BYTES + 4) == nf4.BYTE_KERNEL
    q = quantize_nf4_reference(_weight((128, 96), torch.float32, seed=7))
    with kernel_mode("triton"):
        out = dequantize_nf4(q, torch.bfloat16)
    assert _dequant_launch(q).config == nf4.SMALL_WEIGHT_LAUNCH
    assert torch.equal(out, dequantize_nf4_reference(q, torch.bfloat16))
