"""Monotonicity the memory model must keep whatever the settings."""

from hypothesis import given, settings, strategies as st

from vramplan.catalog import resolve_model
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan

MODELS = st.sampled_from(["llama-3.2-1b", "gemma-4-e2b-text"])
STACKS = st.sampled_from(["vramplan", "hf"])
CKPT = st.sampled_from(["none", "full", "offload"])
QUANT = st.sampled_from(["bf16", "int8", "nf4"])
SEQ = st.integers(64, 8192)
RANK = st.sampled_from([4, 8, 16, 32, 64, 128])
FAST = settings(max_examples=60, deadline=None)


def _peak(**kw) -> int:
    return estimate_plan(Plan(**kw), resolve_model(kw["model"])).peak_bytes


@FAST
@given(MODELS, STACKS, CKPT, QUANT, SEQ, st.integers(1, 64))
def test_grows_with_sequence_length(model, stack, ckpt, quant, seq, extra):
    kw = dict(model=model, stack=stack, checkpointing=ckpt, quant=quant)
    assert _peak(seq_len=seq + extra, **kw) >= _peak(seq_len=seq, **kw)


@FAST
@given(MODELS, STACKS, CKPT, SEQ, st.integers(1, 4))
def test_grows_with_batch(model, stack, ckpt, seq, batch):
    kw = dict(model=model, stack=stack, checkpointing=ckpt, seq_len=min(seq, 2048))
    assert _peak(micro_batch=batch + 1, **kw) >= _peak(micro_batch=batch, **kw)


@FAST
@given(MODELS, STACKS, RANK, SEQ)
def test_grows_with_rank(model, stack, rank, seq):
    kw = dict(model=model, stack=stack, seq_len=seq)
    assert _peak(lora_rank=rank * 2, **kw) > _peak(lora_rank=rank, **kw)


@FAST
@given(MODELS, STACKS, QUANT, SEQ)
def test_checkpointing_shrinks(model, stack, quant, seq):
    kw = dict(model=model, stack=stack, quant=quant, seq_len=seq)
    assert _peak(checkpointing="full", **kw) <= _peak(checkpointing="none", **kw)
    assert _peak(checkpointing="offload", **kw) <= _peak(checkpointing="full", **kw)


@FAST
@given(MODELS, STACKS, CKPT, SEQ)
def test_quantization_shrinks(model, stack, ckpt, seq):
    kw = dict(model=model, stack=stack, checkpointing=ckpt, seq_len=seq)
    assert _peak(quant="nf4", **kw) < _peak(quant="int8", **kw) or stack == "hf"
    assert _peak(quant="nf4", double_quant=True, **kw) < _peak(quant="nf4", double_quant=False, **kw)
    if stack == "vramplan":
        assert _peak(quant="int8", **kw) < _peak(quant="bf16", **kw)
