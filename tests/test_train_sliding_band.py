"""Sliding-window layers through the chunked attention over their band (switch ``sliding_band_attention``): the same
function as SDPA under transformers' sliding mask, chunk by chunk and through a tiny Gemma 4's training step whose
sliding masks the captured step leaves out (vramplan.train.graphs.packing_decided)."""

import contextlib

import pytest
import torch

from train_fixtures import (attention_grads, attention_inputs, build_model, gemma4_config,
                            unpacked_and_packed_steps)
from vramplan.memory import activations
from vramplan.memory.activations import chunked_attention_chunk_rows, chunked_attention_keys_per_query
from vramplan.train import attention, switches
from vramplan.train.attention import attention_reference, band_mask, chunked_attention
from vramplan_kernels.dispatch import kernel_mode


SHIPPED_MIN_WINDOWS = activations.SLIDING_BAND_MIN_WINDOWS  # where the band beats SDPA's masked square on the H100


@pytest.fixture(autouse=True)
def band_at_tiny_rows(monkeypatch):
    """The band from two windows up, so a tiny Gemma 4 (window 8) takes it at 20 and 24 tokens; the tests of the
    threshold itself put :data:`SHIPPED_MIN_WINDOWS` back."""
    monkeypatch.setattr(activations, "SLIDING_BAND_MIN_WINDOWS", 2)


def test_the_band_mask_is_transformers_sliding_window():
    """q − window < k ≤ q, as transformers' sliding_window_overlay and causal mask functions say."""
    mask = band_mask(6, 3, "cpu")
    want = torch.tensor([[k <= q and k > q - 3 for k in range(6)] for q in range(6)])
    assert torch.equal(mask, want)


@pytest.mark.parametrize("window,chunk", [(4, 4), (4, 3), (4, 9), (7, 5), (1, 6), (22, 5)])
@pytest.mark.parametrize("h_kv", [2, 1])
def test_band_equals_the_masked_square(window, chunk, h_kv):
    q, k, v = attention_inputs(h_kv=h_kv, s=23)
    ours = attention_grads(lambda *t: chunked_attention(*t, scale=0.7, causal=True, chunk=chunk, window=window), q, k, v)
    ref = attention_grads(lambda *t: attention_reference(*t, scale=0.7, causal=True, window=window), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window,chunk", [(5, 5), (5, 3), (8, 11)])
def test_band_with_the_fused_rows(window, chunk):
    """The Triton row passes (interpreter) mask the band as the PyTorch passes do."""
    q, k, v = (t.detach().float().requires_grad_() for t in attention_inputs(s=19))
    with kernel_mode("triton"), switches.forced(wide_head_fused_rows=True):
        ours = attention_grads(lambda *t: chunked_attention(*t, scale=0.7, causal=True, chunk=chunk, window=window), q, k, v)
    ref = attention_grads(lambda *t: attention_reference(*t, scale=0.7, causal=True, window=window), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunks_read_only_the_band():
    """Under a window the chunks are at most ``window`` queries and each reads the keys from the multiple of 8 at or
    before ``window - 1`` keys ahead of its first query: whole multiples of 8 keys at Gemma 4's shape (cuBLAS's
    aligned rows), the mean keys a query computes near the window at any length, where the causal square's grow."""
    from vramplan.memory.activations import chunked_attention_chunks

    rows = chunked_attention_chunk_rows(1, 8, 8192, 512)
    assert rows == 512
    assert {(upto - first) % 8 for _, _, first, upto in chunked_attention_chunks(8192, 8192, rows, True, 512)} == {0}
    assert max(upto - first for _, _, first, upto in chunked_attention_chunks(8192, 8192, rows, True, 512)) == 1024
    assert chunked_attention_keys_per_query(8192, rows, 512) < 1024 < chunked_attention_keys_per_query(8192, 256)
    assert chunked_attention_keys_per_query(40, 5, 8) == pytest.approx(sum(
        (min(40, s + 5) - max(0, (s - 7) // 8 * 8)) * 5 for s in range(0, 40, 5)) / 40)


@pytest.fixture(scope="module")
def gemma4_folder(tmp_path_factory):
    return build_model(gemma4_config(), tmp_path_factory.mktemp("gemma4-band") / "m")


def _step(folder, grad=True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").train()
    ids = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14, 9, 3, 7, 22, 17, 40, 11, 10]])  # 20 > window 8
    if not grad:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("grad", [True, False])
def test_gemma4_sliding_layers_through_the_band(gemma4_folder, monkeypatch, grad):
    """A tiny Gemma 4 (window 8, 20 tokens) whose step leaves its sliding masks out, as a captured step does: training,
    its sliding layers run the band (and its full layers the wide-head path) with the loss and every gradient SDPA gives
    under transformers' masks; without gradients SDPA runs them under the band mask the call builds, same logits."""
    from vramplan.train.graphs import packing_decided

    reference = _step(gemma4_folder, grad)
    calls = []
    original_apply = attention.ChunkedAttention.apply
    monkeypatch.setattr(attention.ChunkedAttention, "apply", lambda *a: calls.append(a[7]) or original_apply(*a))
    try:
        with switches.forced(sliding_band_attention=True):
            assert attention.install(min_head_dim=32, bands=True) and attention.bands_sliding_windows()
            with packing_decided(False):
                ours = _step(gemma4_folder, grad)
    finally:
        attention.uninstall()
    assert not attention.bands_sliding_windows()
    if not grad:
        assert not calls
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        return
    assert 8 in calls and 0 in calls  # sliding layers with their window, full layers without
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], reference[1]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_eager_steps_leave_the_sliding_mask_to_the_band(gemma4_folder, monkeypatch, packed):
    """The trainer's eager step (``accumulate_gradients``) with the switch on: unpadded, unpacked rows leave
    transformers' sliding mask out and run the band, with the loss and gradients of the same step under the mask;
    packed rows keep transformers' mask (it never offers the skip there) and run SDPA."""
    from transformers import AutoModelForCausalLM

    from vramplan.train.loss import accumulate_gradients

    ids = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14, 9, 3, 7, 22, 17, 40, 11, 10]])
    positions = torch.arange(20)[None].clone()
    if packed:
        positions[0, 12:] = torch.arange(8)
    labels = ids.roll(-1, dims=1)
    labels[0, -1] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}

    def step():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(gemma4_folder, dtype=torch.float32, attn_implementation="sdpa").train()
        loss, _ = accumulate_gradients(model, [batch])
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = step()
    windows = []
    original_apply = attention.ChunkedAttention.apply
    monkeypatch.setattr(attention.ChunkedAttention, "apply", lambda *a: windows.append(a[7]) or original_apply(*a))
    try:
        with switches.forced(sliding_band_attention=True):
            attention.install(min_head_dim=32, bands=True)
            ours = step()
    finally:
        attention.uninstall()
    assert (8 in windows) != packed
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_masks_stay_without_the_switch(gemma4_folder):
    """Switch off, the captured step's sliding layers keep transformers' mask: no call is left to apply a window."""
    from vramplan.train.graphs import packing_decided

    try:
        attention.install(min_head_dim=32, bands=True)
        with switches.forced(sliding_band_attention=False):
            assert not attention.bands_sliding_windows()
            with packing_decided(False):
                loss, _ = _step(gemma4_folder)
    finally:
        attention.uninstall()
    torch.testing.assert_close(loss, _step(gemma4_folder)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seq", [2048, 3000])
def test_gemma4_e2b_sliding_layer_shape_on_the_gpu(seq, fused):
    """Gemma-4-E2B's sliding layer (8 query heads, 1 K/V head, 256 wide, window 512, scale 1) in bf16 against SDPA
    under the band mask, as transformers runs it: output and gradients within bf16 attention's usual error."""
    torch.manual_seed(0)
    shapes = ((1, 8, seq, 256), (1, 1, seq, 256), (1, 1, seq, 256))
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16).mul(0.5).requires_grad_() for s in shapes)
    mask = band_mask(seq, 512, "cuda")[None, None]
    with switches.forced(wide_head_fused_rows=fused):
        ours = attention_grads(lambda *t: chunked_attention(*t, scale=1.0, causal=True, window=512), q, k, v)
    sdpa = attention_grads(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, attn_mask=mask, scale=1.0, enable_gqa=True), q, k, v)
    exact = attention_grads(lambda *t: attention_reference(*(x.double() for x in t), scale=1.0, causal=True,
                                                  window=512).to(torch.bfloat16), q, k, v)
    for a, s, e in zip(ours, sdpa, exact):
        ours_err = (a.double() - e.double()).norm() / e.double().norm()
        sdpa_err = (s.double() - e.double()).norm() / e.double().norm()
        assert ours_err <= max(2 * sdpa_err, 1e-2), (ours_err, sdpa_err)


def test_the_benchmark_cases_time_the_same_function():
    """benchmarks/kernel_cases/sliding_attention.py at a tiny shape: the band both ways equals SDPA under the band mask."""
    from benchmarks.kernel_cases import sliding_attention

    (case,) = sliding_attention.cases("cpu", {"tiny": (1, 4, 2, 40, 16, 9)})
    with kernel_mode("triton"):
        results = {name: run() for name, run in case.variants.items() if "not the same" not in name}
    reference = results["sdpa, band mask (transformers)"]
    for name, grads in results.items():
        for a, b in zip(grads, reference):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05, msg=name)


def test_the_planner_prices_the_band_where_the_trainer_runs_it(monkeypatch):
    """Gemma-4-E2B's 28 sliding layers run the band at rows of six windows and more (switch on by default), captured
    or eager, not on the hf stack, not at 2,048 tokens; the estimate says so; the speed model prices 8,192 tokens
    about as the H100 measured it (674 ms a step masked in session 15, 444 over the aligned band in session 16: 1.52x)."""
    from vramplan.catalog import resolve_gpu, resolve_model
    from vramplan.estimate import architecture, estimate_plan
    from vramplan.plan import Plan
    from vramplan.stacks.vramplan import attention_kernel_of
    from vramplan.throughput import predict_tokens_per_s

    monkeypatch.setattr(activations, "SLIDING_BAND_MIN_WINDOWS", SHIPPED_MIN_WINDOWS)
    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    sliding = [layer for layer in gemma.layers if layer.attention == "sliding"]
    plan = Plan(model="gemma-4-e2b-text", seq_len=8192)
    h100 = resolve_gpu("h100")
    assert switches.enabled("sliding_band_attention")
    assert {attention_kernel_of(layer, plan) for layer in sliding} == {"chunked_fused"}
    assert {attention_kernel_of(layer, plan.replace(cuda_graphs=False)) for layer in sliding} == {"chunked_fused"}
    assert {attention_kernel_of(layer, plan.replace(stack="hf")) for layer in sliding} == {"flash"}
    assert {attention_kernel_of(layer, plan.replace(seq_len=2048)) for layer in sliding} == {"flash"}
    assert {attention_kernel_of(layer, plan.replace(seq_len=3072)) for layer in sliding} == {"chunked_fused"}
    notes = estimate_plan(plan, resolve_model("gemma-4-e2b-text")).notes
    assert any("28 sliding-window layers" in n and "VRAMPLAN_DISABLE=sliding_band_attention" in n for n in notes)
    assert not any("sliding-window layers" in n for n in estimate_plan(plan.replace(seq_len=2048),
                                                                        resolve_model("gemma-4-e2b-text")).notes)
    band = predict_tokens_per_s(gemma, plan, h100)
    with switches.forced(sliding_band_attention=False):
        assert {attention_kernel_of(layer, plan) for layer in sliding} == {"flash"}
        masked = predict_tokens_per_s(gemma, plan, h100)
    assert 1.35 < band / masked < 1.6


def test_short_rows_keep_transformers_mask(gemma4_folder, monkeypatch):
    """At the shipped threshold a tiny Gemma 4's 20-token row (2.5 windows of 8) keeps its sliding mask in a captured
    step: SDPA runs it, no call bands, the loss is the masked step's."""
    from vramplan.train.graphs import packing_decided

    monkeypatch.setattr(activations, "SLIDING_BAND_MIN_WINDOWS", SHIPPED_MIN_WINDOWS)
    windows = []
    original_apply = attention.ChunkedAttention.apply
    monkeypatch.setattr(attention.ChunkedAttention, "apply", lambda *a: windows.append(a[7]) or original_apply(*a))
    try:
        attention.install(min_head_dim=32, bands=True)
        assert attention.bands_sliding_windows()
        with packing_decided(False):
            loss, _ = _step(gemma4_folder)
    finally:
        attention.uninstall()
    assert 8 not in windows and 0 in windows  # full layers still chunked (wide heads), sliding ones not banded
    torch.testing.assert_close(loss, _step(gemma4_folder)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gemma4_steps_through_the_band_train_like_steps_under_the_mask(tmp_path, monkeypatch):
    """A tiny Gemma 4 (window 8) trained six optimizer steps on unpacked 24-token and packed 16-token rows: eager with
    the switch off (every sliding layer under transformers' mask), then with it on eagerly and through captured
    graphs (the unpacked rows' sliding layers over the band). The band ran, every step's loss agrees, and the first
    step's gradients sit as close to the masked step's as a second correct masked step does: the same step with SDPA's
    math kernel instead of its fused ones. bf16 alone moves these gradients (their LoRA terms nearly cancel): one
    matrix by 15% and 26% of its norm on the H100 in sessions 15 and 16 under a fixed bound, where the same step in fp32
    on the CPU agrees to 5e-6 (test_eager_steps_leave_the_sliding_mask_to_the_band); hence a bound measured in the
    run, over all adapters together. Not the adapters after six AdamW steps: AdamW turns such differences in a
    near-zero gradient into whole steps of either sign (session 15, call 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vramplan.plan import Plan
    from vramplan.train.graphs import StepGraphs
    from vramplan.train.loss import accumulate_gradients
    from vramplan.train.model import load_for_training, lora_parameters
    from vramplan.train.recipe import make_optimizer

    folder = build_model(gemma4_config(), tmp_path / "gemma4")
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    batches = unpacked_and_packed_steps()  # the same data each step: the loss must fall
    windows = []
    original_apply = attention.ChunkedAttention.apply
    monkeypatch.setattr(attention.ChunkedAttention, "apply", lambda *a: windows.append(a[7]) or original_apply(*a))
    results = {}
    runs = {"masked": (False, False, None), "masked, SDPA math": (False, False, SDPBackend.MATH),
            "band": (True, False, None), "band, graphs": (True, True, None)}
    try:
        for run, (band, use_graphs, backend) in runs.items():
            windows.clear()
            with switches.forced(sliding_band_attention=band), \
                    (sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()):
                torch.manual_seed(0)
                model, _ = load_for_training(folder, plan, torch.device("cuda"))
                params = lora_parameters(model)
                graphs = StepGraphs(model, params) if use_graphs else None
                optimizer, _ = make_optimizer(params, plan, 1e-3, 0.0, torch.device("cuda"))
                losses, first_grads = [], None
                for micro_batches in batches:
                    losses.append(accumulate_gradients(model, micro_batches, graphs=graphs)[0])
                    if first_grads is None:
                        first_grads = torch.cat([p.grad.detach().float().flatten().cpu() for p in params])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=graphs is None)
                results[run] = (losses, first_grads)
                assert (8 in windows) == band, run
            attention.uninstall()
    finally:
        attention.uninstall()
    masked_losses, masked_grads = results.pop("masked")
    assert masked_losses[-1] < masked_losses[0]
    floor = (results.pop("masked, SDPA math")[1] - masked_grads).norm() / masked_grads.norm()
    for run, (losses, grads) in results.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(masked_losses), rtol=2e-3, atol=2e-3, msg=run)
        moved = (grads - masked_grads).norm() / masked_grads.norm()
        assert moved <= max(3 * floor, 0.05), (run, float(moved), float(floor))


@pytest.mark.parametrize("outer", [False, True])
def test_the_mask_decision_reads_transformers_arguments_through_both_wrappers(outer):
    """transformers' ``_ignore_causal_mask_sdpa`` as the step sees it, inside sliding_masks_left_out alone (eager) and
    under packing_decided too (captured): each wrapper binds transformers' own signature, so a padded row keeps its
    sliding mask and an unpadded one long enough for the band leaves it out, however the arguments come."""
    from transformers import masking_utils

    from vramplan.train.graphs import packing_decided

    padding = torch.ones(1, 40, dtype=torch.bool)
    padding[0, :3] = False
    try:
        attention.install(min_head_dim=32, bands=True)
        with packing_decided(False) if outer else attention.sliding_masks_left_out():
            skip = masking_utils._ignore_causal_mask_sdpa
            assert skip(None, 40, 40, 0, 0, 8) and skip(None, 40, 40, 0, 0, local_attention_size=8)
            assert not skip(padding, 40, 40, 0, 0, 8) and not skip(padding_mask=padding, q_length=40, kv_length=40,
                                                                   q_offset=0, kv_offset=0, local_attention_size=8)
            assert not skip(None, 12, 12, 0, 0, 8)  # 1.5 windows: below even the tests' two
    finally:
        attention.uninstall()
