"""Chunked attention for heads wider than SDPA's flash kernels (vramplan.train.attention): the same function as
softmax attention over the whole square, its gradients, and Gemma 4's training step through it unchanged."""

import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from train_fixtures import attention_grads, attention_inputs, build_model, gemma4_config
from vramplan.train import attention, switches
from vramplan.memory.activations import CHUNKED_ATTENTION_SCORE_BYTES, chunked_attention_chunk_rows
from vramplan.train.attention import attention_reference, chunked_attention


@pytest.mark.parametrize("h_kv", [4, 2, 1])
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_causal_equals_the_whole_square(h_kv, chunk):
    q, k, v = attention_inputs(h_kv=h_kv)
    ours = attention_grads(lambda *t: chunked_attention(*t, scale=0.7, causal=True, chunk=chunk), q, k, v)
    ref = attention_grads(lambda *t: attention_reference(*t, scale=0.7, causal=True), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["bool", "additive", "per-head bool"])
def test_masks_as_sdpa_takes_them(kind):
    """transformers hands SDPA a boolean mask (True attends) or an additive one, [b, 1, q, k] or per head."""
    q, k, v = attention_inputs(s=11)
    g = torch.Generator().manual_seed(3)
    heads = 4 if kind == "per-head bool" else 1
    keep = torch.rand(2, heads, 11, 11, generator=g) > 0.4
    keep |= torch.eye(11, dtype=torch.bool)  # every query attends somewhere
    mask = keep if kind != "additive" else torch.where(keep, 0.0, -1e4).double() + torch.rand(2, 1, 11, 11, generator=g).double()
    ours = attention_grads(lambda *t: chunked_attention(*t, mask=mask, chunk=4), q, k, v)
    ref = attention_grads(lambda *t: attention_reference(*t, mask=mask), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    q, k, v = attention_inputs(b=1, h=2, h_kv=1, s=6, d=4)
    assert torch.autograd.gradcheck(lambda *t: chunked_attention(*t, causal=True, chunk=4), (q, k, v))


def test_a_fully_masked_query_gives_zeros_not_nans():
    q, k, v = attention_inputs(b=1, h=2, h_kv=2, s=5)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, dq, dk, dv = attention_grads(lambda *t: chunked_attention(*t, mask=mask, chunk=2), q, k, v)
    assert torch.all(out[:, :, 2] == 0) and all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


def test_bf16_inputs_keep_fp32_scores():
    """bf16 q/k/v (the trainer's dtype): within bf16 rounding of the float64 function, logits of Gemma's size."""
    q, k, v = (t.detach() for t in attention_inputs(s=32, d=64, seed=4))
    q = q * 0.6  # unscaled dot products of ~±5-20, as Gemma 4's normed q and k give with scale 1
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    exact = [t.detach().double().requires_grad_() for t in low]  # the same bf16 inputs, computed in float64
    ref = attention_grads(lambda *t: attention_reference(*t, scale=1.0, causal=True), *exact)
    ours = attention_grads(lambda *t: chunked_attention(*t, scale=1.0, causal=True, chunk=8), *low)
    for a, b in zip(ours, ref):
        assert (a.double() - b).norm() <= 0.02 * b.norm()


def test_chunks_fit_their_budget():
    assert chunked_attention_chunk_rows(1, 8, 8192) * 8 * 8192 * 4 <= CHUNKED_ATTENTION_SCORE_BYTES
    assert chunked_attention_chunk_rows(1, 8, 2048) == 1024 and chunked_attention_chunk_rows(1, 1, 10**9) == 16


@pytest.fixture(scope="module")
def gemma4_folder(tmp_path_factory):
    return build_model(gemma4_config(), tmp_path_factory.mktemp("gemma4-wide") / "m")


def _loss_and_grads(folder, padded: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").train()
    ids = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14, 9, 3, 7, 22, 17, 40, 11, 10]])
    if padded:  # a batch of two, the second row right-padded: transformers hands SDPA a mask, not is_causal
        ids = torch.cat([ids, ids.roll(3, dims=1)])
        mask = torch.ones_like(ids)
        mask[1, -6:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss, grads


@pytest.mark.parametrize("padded", [False, True])
def test_gemma4_training_step_through_the_chunked_path(gemma4_folder, monkeypatch, padded):
    """A tiny Gemma 4 (sliding 16-wide and full 32-wide heads, shared-KV layers) with its 32-wide heads sent through
    the chunked path, causal or (a padded batch) under transformers' mask: the loss and every gradient as
    transformers' SDPA gives them; the path really ran."""
    from transformers.modeling_utils import AttentionInterface

    reference = _loss_and_grads(gemma4_folder, padded)
    calls = []
    original_apply = attention.ChunkedAttention.apply
    monkeypatch.setattr(attention.ChunkedAttention, "apply",
                        lambda *a: calls.append((a[0].shape, a[3] is not None)) or original_apply(*a))
    try:
        AttentionInterface._global_mapping["sdpa"] = attention.with_wide_heads(
            AttentionInterface._global_mapping["sdpa"], min_head_dim=32)
        ours = _loss_and_grads(gemma4_folder, padded)
    finally:
        attention.uninstall()
    assert calls and all(shape[-1] == 32 for shape, _ in calls)
    assert all(masked == padded for _, masked in calls)  # causal rows take no mask; padded ones transformers' mask
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], reference[1]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_install_is_once_and_undone_and_the_switch_turns_it_off():
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]
    try:
        assert attention.install() and attention.install()
        assert AttentionInterface._global_mapping["sdpa"].vramplan_original is original
    finally:
        attention.uninstall()
    assert AttentionInterface._global_mapping["sdpa"] is original
    q, k, v = attention_inputs(d=512, s=4)
    assert attention.takes_chunked_path(q, k, v, 0.0, {})
    with switches.forced(wide_head_attention=False):
        assert not attention.takes_chunked_path(q, k, v, 0.0, {})
    with torch.no_grad():
        assert not attention.takes_chunked_path(q, k, v, 0.0, {})  # inference keeps SDPA


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seq", [2048, 3000])
def test_gemma4_e2b_full_layer_shape_on_the_gpu(seq, fused):
    """Gemma-4-E2B's full layer (8 query heads, 1 K/V head, 512 wide, scale 1, causal) in bf16 against SDPA's own
    memory-efficient kernels: output and gradients within bf16 attention's usual error, with the row passes in
    PyTorch and fused (``wide_head_fused_rows``)."""
    with switches.forced(wide_head_fused_rows=fused):
        _check_e2b_full_layer(seq)


def _check_e2b_full_layer(seq):
    torch.manual_seed(0)
    q = torch.randn(1, 8, seq, 512, device="cuda", dtype=torch.bfloat16) * 0.5
    k = torch.randn(1, 1, seq, 512, device="cuda", dtype=torch.bfloat16) * 0.5
    v = torch.randn(1, 1, seq, 512, device="cuda", dtype=torch.bfloat16)
    tensors = [t.requires_grad_() for t in (q, k, v)]
    ours = attention_grads(lambda *t: chunked_attention(*t, scale=1.0, causal=True), *tensors)
    sdpa = attention_grads(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, scale=1.0, is_causal=True, enable_gqa=True), *tensors)
    exact = attention_grads(lambda *t: attention_reference(*(x.double() for x in t), scale=1.0, causal=True).to(torch.bfloat16), *tensors)
    for a, s, e in zip(ours, sdpa, exact):
        ours_err = (a.double() - e.double()).norm() / e.double().norm()
        sdpa_err = (s.double() - e.double()).norm() / e.double().norm()
        assert ours_err <= max(2 * sdpa_err, 1e-2), (ours_err, sdpa_err)


def test_the_planner_prices_what_the_chunked_path_holds():
    """Gemma-4-E2B's plan with the chunked path: its wide layers run "chunked", one chunk's scores more of allocator
    slack (the chunks' sizes differ), and the chunk rule the trainer follows is the planner's; Llama (no wide heads)
    prices the same either way."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture, estimate_plan
    from vramplan.memory.activations import chunked_attention_workspace_bytes
    from vramplan.plan import Plan
    from vramplan.stacks.vramplan import attention_kernel_of

    gemma = architecture(resolve_model("gemma-4-e2b-text"))
    plan = Plan(model="gemma-4-e2b-text", seq_len=2048)
    wide = [layer for layer in gemma.layers if layer.head_dim > 256]
    with switches.forced(wide_head_attention=True, wide_head_fused_rows=False):
        on = estimate_plan(plan, resolve_model("gemma-4-e2b-text")).components
        assert {attention_kernel_of(layer, plan) for layer in wide} == {"chunked"}
        assert attention_kernel_of(wide[0], plan.replace(stack="hf")) == "flash"
    with switches.forced(wide_head_attention=False):
        off = estimate_plan(plan, resolve_model("gemma-4-e2b-text")).components
        assert {attention_kernel_of(layer, plan) for layer in wide} == {"flash"}
    assert on["fragmentation"] - off["fragmentation"] == CHUNKED_ATTENTION_SCORE_BYTES
    with switches.forced(wide_head_attention=True):  # the estimate says so, and how to turn it off
        notes = estimate_plan(plan, resolve_model("gemma-4-e2b-text")).notes
    assert any("7 attention layers with 512-wide heads" in n and "VRAMPLAN_DISABLE=wide_head_attention" in n for n in notes)
    assert on["activations"] >= off["activations"]
    # 2,048 tokens, 8 heads: chunks of 1,024 queries, 2.5 buffers of 8 x 1,024 x 2,048 fp32 scores
    assert chunked_attention_workspace_bytes(wide[0], 1, 2048) == int(2.5 * 8 * 1024 * 2048 * 4)
    assert chunked_attention_chunk_rows(1, 8, 2048) == 1024
    with switches.forced(wide_head_attention=True, wide_head_fused_rows=True):  # fused rows: 3 chunks, not 2.5
        assert {attention_kernel_of(layer, plan) for layer in wide} == {"chunked_fused"}
        assert chunked_attention_workspace_bytes(wide[0], 1, 2048, fused=True) == 3 * 8 * 1024 * 2048 * 4
    llama = Plan(model="llama-3.2-1b", seq_len=2048)
    with switches.forced(wide_head_attention=True):
        llama_on = estimate_plan(llama, resolve_model("llama-3.2-1b")).peak_bytes
    with switches.forced(wide_head_attention=False):
        assert estimate_plan(llama, resolve_model("llama-3.2-1b")).peak_bytes == llama_on


#: ops whose output is a view of a tensor that exists already: no bytes of their own
_VIEWS = {"aten::view", "aten::slice", "aten::detach", "aten::transpose", "aten::expand", "aten::as_strided",
          "aten::_unsafe_view", "aten::alias", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
          "aten::t", "aten::_reshape_alias"}


class _LiveBytes(TorchDispatchMode):
    """The most bytes the tensors made under it hold at once, each storage counted once, for as long as a tensor on it
    lives: what a CUDA allocator would hold for them, measured on the CPU."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[list, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() in self.live or func._schema.name not in _VIEWS:
                    refs, size = self.live.get(storage.data_ptr(), ([], storage.nbytes()))
                    self.live[storage.data_ptr()] = (refs + [weakref.ref(tensor)], size)
        self.live = {ptr: ([r for r in refs if r() is not None], size) for ptr, (refs, size) in self.live.items()}
        self.live = {ptr: entry for ptr, entry in self.live.items() if entry[0]}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


@pytest.mark.parametrize("fused", [False, True])
def test_the_backward_holds_the_chunks_the_planner_prices(fused):
    """The widest chunk's backward holds the score-sized buffers the planner prices (``CHUNKED_ATTENTION_PEAK_CHUNKS``,
    ``CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS``) and no more: until session 25 the previous chunk's probabilities and dS
    lived on into the next chunk (3.75 chunks with the fused rows where 3 are priced; Gemma-4-E2B's eager step at 2,048
    tokens allocated 33 MB more than priced for them). Heads 8 wide keep the other buffers (dQ, the fp32 dK and dV, the
    returned bf16 dK and dV) under a tenth of a chunk."""
    from vramplan.memory.activations import CHUNKED_ATTENTION_PEAK_CHUNKS, CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS
    from vramplan_kernels.dispatch import kernel_mode

    torch.manual_seed(0)
    heads, seq, width, rows = 4, 512, 8, 128
    q, k, v = (torch.randn(1, n, seq, width, dtype=torch.bfloat16, requires_grad=True) for n in (heads, 1, 1))
    with switches.forced(wide_head_fused_rows=fused), kernel_mode("triton" if fused else "reference"):
        out = chunked_attention(q, k, v, scale=1.0, causal=True, chunk=rows)
        assert attention.fused_rows_apply(q) == fused
        grad = torch.randn_like(out)
        with _LiveBytes() as live:
            torch.autograd.grad(out, (q, k, v), grad)
    chunks = live.peak / (heads * rows * seq * 4)  # the last chunk's fp32 scores: its rows over every key
    priced = CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS if fused else CHUNKED_ATTENTION_PEAK_CHUNKS
    assert priced <= chunks <= priced + 0.1
