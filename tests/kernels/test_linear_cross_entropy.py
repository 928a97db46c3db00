"""The fused LM head + cross-entropy against the full-logits reference: losses, every gradient,
the reductions a trainer relies on for gradient accumulation, and the edge cases of real batches."""

from __future__ import annotations

import pytest
import torch

from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make_inputs(n, h, v, dtype, *, head="frozen", bias=False, ignore_every=4, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    weight.requires_grad_(head == "trainable")
    labels = torch.randint(0, v, shape, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    kwargs = {}
    if bias:
        kwargs["bias"] = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if head == "lora":
        a = (torch.randn(3, h, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
        b = (torch.randn(v, 3, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
        kwargs["lora"] = (a, b, 2.0)
    return hidden, weight, labels, kwargs


def trainable(hidden, weight, kwargs):
    tensors = [hidden] + [weight] * getattr(weight, "requires_grad", False)  # an Int8Rows head is frozen
    if "bias" in kwargs:
        tensors.append(kwargs["bias"])
    if "lora" in kwargs:
        tensors += list(kwargs["lora"][:2])
    return tensors


def loss_and_grads(fn, hidden, weight, labels, kwargs, **options):
    """Loss and gradients under an upstream gradient that is not 1 (0.5 for a scalar loss, a ramp
    per token for reduction="none"), so the backward's scaling is exercised too."""
    loss, count = fn(hidden, weight, labels, **kwargs, **options)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * upstream).sum(), trainable(hidden, weight, kwargs))
    return loss.detach(), count, grads


def compare(hidden, weight, labels, kwargs, tol, **options):
    with kernel_mode("triton"):
        loss, count, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, kwargs, **options)
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    ref_loss, ref_count, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, kwargs,
                                                    **ref_options)
    assert count.dtype == torch.int64 and count.item() == ref_count.item()
    torch.testing.assert_close(loss, ref_loss, **tol)
    for grad, ref in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref, **tol)
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head", ["frozen", "trainable", "lora"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(dtype, head, softcap, reduction):
    hidden, weight, labels, kwargs = make_inputs(11, 16, 257, dtype, head=head, bias=head == "trainable")
    compare(hidden, weight, labels, kwargs, TOL[dtype], softcap=softcap, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("vocab,n,chunk", [(1000, 7, 3), (257, 9, None), (300, 5, 5), (64, 1, None)])
def test_odd_vocab_and_ragged_chunks(vocab, n, chunk):
    hidden, weight, labels, kwargs = make_inputs(n, 8, vocab, torch.float32, head="trainable", bias=True,
                                                 ignore_every=3)
    compare(hidden, weight, labels, kwargs, TOL[torch.float32], chunk_size=chunk, softcap=30.0)


def test_leading_shape_kept_for_none_and_flattened_otherwise():
    hidden, weight, labels, kwargs = make_inputs(0, 8, 50, torch.float32, lead=(2, 5))
    loss, _ = compare(hidden, weight, labels, kwargs, TOL[torch.float32], reduction="none", chunk_size=3)
    assert loss.shape == (2, 5)
    assert (loss.view(-1)[::4] == 0).all()  # ignored tokens carry no loss
    compare(hidden, weight, labels, kwargs, TOL[torch.float32], chunk_size=3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, labels, kwargs = make_inputs(6, 8, 40, torch.float32, head="lora", bias=True)
    labels.fill_(-100)
    with kernel_mode("triton"):
        loss, count, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, kwargs,
                                            reduction=reduction, chunk_size=4)
    assert count.item() == 0
    assert (loss == 0).all()
    for grad in grads:
        assert (grad == 0).all()


def test_sum_over_micro_batches_divided_by_total_count_equals_mean_of_whole_batch():
    """Gradient accumulation done right: micro-batches with different numbers of target tokens."""
    hidden, weight, labels, kwargs = make_inputs(18, 8, 100, torch.float64, head="lora", ignore_every=0)
    labels[:3] = -100  # first micro-batch: 3 targets of 6
    labels[6:8] = -100  # second: 4 of 6; third: all 6
    labels[12:] = torch.arange(6)
    parts = [(0, 6), (6, 12), (12, 18)]
    with kernel_mode("triton"):
        total_count = sum(int((labels[a:b] != -100).sum()) for a, b in parts)
        loss_sum = 0.0
        for a, b in parts:
            loss, count = linear_cross_entropy(hidden[a:b], weight, labels[a:b], reduction="sum", **kwargs)
            (loss / total_count).backward()
            loss_sum = loss_sum + loss.detach()
        accumulated = [t.grad.clone() for t in trainable(hidden, weight, kwargs)]
        mean, count = linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_size=5, **kwargs)
    whole = torch.autograd.grad(mean, trainable(hidden, weight, kwargs))
    assert count.item() == total_count == 13
    torch.testing.assert_close(loss_sum / total_count, mean.detach(), **TOL[torch.float64])
    for grad, ref in zip(accumulated, whole):
        torch.testing.assert_close(grad, ref, **TOL[torch.float64])
    # Averaging the micro-batch means instead would be wrong here: the test can tell.
    with kernel_mode("triton"):
        naive = sum(linear_cross_entropy(hidden[a:b], weight, labels[a:b], **kwargs)[0].detach() for a, b in parts) / 3
    assert not torch.allclose(naive, mean.detach())


def test_frozen_head_computes_no_weight_gradient():
    hidden, weight, labels, kwargs = make_inputs(5, 8, 30, torch.float32)
    with kernel_mode("triton"):
        loss, _ = linear_cross_entropy(hidden, weight, labels, **kwargs)
    assert isinstance(loss.grad_fn, LinearCrossEntropyFunction._backward_cls)
    grad_hidden, grad_weight, *_ = loss.grad_fn.grads
    assert grad_hidden is not None and grad_weight is None


def test_fp16_large_logits_stay_finite():
    """Logits in the thousands: exp() in fp16 would overflow; the kernel works in fp32 inside."""
    hidden, weight, labels, kwargs = make_inputs(6, 16, 200, torch.float16, head="trainable", ignore_every=0)
    with torch.no_grad():
        weight.mul_(400.0)
    with kernel_mode("triton"):
        loss, _, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, kwargs, chunk_size=4)
    ref_loss, _, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, kwargs)
    assert torch.isfinite(loss) and loss > 100
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-3)
    for grad, ref in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.float(), ref.float(), atol=2e-3, rtol=1e-2)


def test_bf16_close_to_reference():
    hidden, weight, labels, kwargs = make_inputs(9, 32, 500, torch.bfloat16, head="lora", bias=True)
    with kernel_mode("triton"):
        loss, _, grads = loss_and_grads(linear_cross_entropy, hidden, weight, labels, kwargs, softcap=5.0,
                                        chunk_size=4)
    ref_loss, _, ref_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, kwargs,
                                            softcap=5.0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref.float(), atol=2e-2, rtol=5e-2)


def test_loss_without_gradients():
    hidden, weight, labels, kwargs = make_inputs(7, 8, 60, torch.float32, head="lora")
    with torch.no_grad(), kernel_mode("triton"):
        for reduction in ("mean", "sum"):
            loss, _ = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=3, **kwargs)
            ref, _ = linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction, **kwargs)
            torch.testing.assert_close(loss, ref, **TOL[torch.float32])


def test_cpu_default_runs_the_reference():
    hidden, weight, labels, kwargs = make_inputs(4, 8, 20, torch.float32)
    with kernel_mode("reference"):
        loss, _ = linear_cross_entropy(hidden, weight, labels)
    assert not isinstance(loss.grad_fn, LinearCrossEntropyFunction._backward_cls)


def test_default_chunk_keeps_logits_within_budget():
    chunk = default_chunk_size(8192, 262144, torch.bfloat16)
    assert chunk == 256 and chunk * 262144 * 2 <= 128 * 1024**2
    assert default_chunk_size(8192, 262144, torch.bfloat16, budget=256 * 1024**2) == 512
    assert default_chunk_size(10, 1000, torch.float32) == 10
    assert default_chunk_size(100_000, 10**9, torch.float32) == 1
    # a trainable head: 4x the budget (each chunk reads and writes all of grad_W)
    assert default_chunk_size(8192, 262144, torch.bfloat16, trainable_head=True) == 1024


def test_rejects_misaligned_labels():
    hidden, weight, labels, kwargs = make_inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="align"):
        linear_cross_entropy(hidden, weight, labels[:3])


def test_benchmark_cases_run_at_tiny_sizes():
    from benchmarks.kernel_cases.linear_cross_entropy import cases

    built = cases("cpu", shapes={"tiny": (24, 16, 300)}, with_compiled=False, int8_shapes={"tiny": (24, 16, 300)})
    assert len(built) == 4 and all(case.measure_peak_memory for case in built)
    assert [(c.extra["trainable_head"], c.extra["lora_head"]) for c in built[:3]] == [(False, False), (True, False), (False, True)]
    int8 = built.pop()
    assert int8.extra["int8_head"] and list(int8.variants)[:3] == ["vramplan", "vramplan token-major", "unfused"]
    with kernel_mode("triton"):
        walked = [int8.variants[name]() for name in ("vramplan", "vramplan token-major")]
    for (grad,), (want,) in zip(walked, [int8.variants["unfused"]()] * 2):
        torch.testing.assert_close(grad.float(), want.float(), atol=2e-2, rtol=5e-2)
    for case in built:
        assert list(case.variants)[:2] == ["vramplan", "unfused"]
        with kernel_mode("triton"):
            ours = case.variants["vramplan"]()
            others = [fn() for name, fn in case.variants.items() if name.startswith("vramplan chunk")]
        ref = case.variants["unfused"]()
        assert len(ours) == (2 if case.extra["trainable_head"] else 3 if case.extra["lora_head"] else 1)
        for grads in (ours, *others):
            for grad, want in zip(grads, ref):
                torch.testing.assert_close(grad.float(), want.float(), atol=2e-2, rtol=5e-2)


@pytest.mark.slow
def test_benchmark_compiled_chunked_reference_is_correct():
    """The torch.compile baseline must compute the same thing, or its timing means nothing (~6 s: inductor)."""
    from benchmarks.kernel_cases.linear_cross_entropy import compiled_chunked_reference

    hidden, weight, labels, _ = make_inputs(24, 16, 300, torch.float32, head="trainable", ignore_every=5)
    loss, grad_hidden, grad_weight = compiled_chunked_reference(8)(hidden.detach(), weight, labels)
    ref_loss, _ = linear_cross_entropy_reference(hidden, weight, labels)
    ref_hidden, ref_weight = torch.autograd.grad(ref_loss, [hidden, weight])
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_weight, ref_weight, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_peak_memory_under_five_percent_of_unfused_at_gemma_vocab():
    tokens, hidden_size, vocab = 8192, 1536, 262144
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, vocab, (tokens,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = fn(hidden, weight, labels)
        (grad,) = torch.autograd.grad(loss, [hidden])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, loss.detach(), grad

    fused, loss, grad = peak(linear_cross_entropy)
    unfused, ref_loss, ref_grad = peak(linear_cross_entropy_reference)
    assert fused < 0.05 * unfused, f"fused peak {fused / 1e9:.2f} GB vs unfused {unfused / 1e9:.2f} GB"
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-3)
    assert (grad.float() - ref_grad.float()).norm() < 1e-2 * ref_grad.float().norm()


@pytest.mark.parametrize("splits,vocab", [(3, 1000), (5, 257), (2, 64)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_rows_split_across_programs_match_the_reference(monkeypatch, splits, vocab, softcap):
    """A GPU splits each row of a chunk across several programs when the chunk has too few rows to fill it
    (partial logsumexps per segment, then each segment's gradient): forced here, in 64-wide blocks, with
    segments that do not divide the vocabulary, ignored rows, a trainable head and a bias."""
    import vramplan_kernels.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "ROW_SPLITS", splits)
    monkeypatch.setattr(lce, "_SPLIT_BLOCK_V", 64)
    for dtype in (torch.float32, torch.float64):
        hidden, weight, labels, kwargs = make_inputs(9, 8, vocab, dtype, head="trainable", bias=True, ignore_every=3)
        compare(hidden, weight, labels, kwargs, TOL[dtype], chunk_size=4, softcap=softcap, reduction="sum")
