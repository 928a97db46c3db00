"""Monotonicity the memory model must keep whatever the settings."""

from hypothesis import example, given, settings, strategies as st

from vramplan.catalog import resolve_model
from vramplan.estimate import architecture, estimate_plan
from vramplan.memory.activations import CHUNK_ROW_MULTIPLE, CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS
from vramplan.plan import Plan
from vramplan.stacks.vramplan import attention_kernel_of

MODELS = st.sampled_from(["llama-3.2-1b", "gemma-4-e2b-text"])
STACKS = st.sampled_from(["vramplan", "hf"])
CKPT = st.sampled_from(["none", "full", "offload"])
QUANT = st.sampled_from(["bf16", "int8", "nf4"])
SEQ = st.integers(64, 8192)
RANK = st.sampled_from([4, 8, 16, 32, 64, 128])
FAST = settings(max_examples=60, deadline=None)


def _peak(**kw) -> int:
    return estimate_plan(Plan(**kw), resolve_model(kw["model"])).peak_bytes


def _chunk_row_step_bytes(plan: Plan) -> int:
    """What a plan's estimate may lose when tokens are added. The chunked attention holds each chunk's scores within a
    fixed budget, its height aligned down to 64 rows (activations.CHUNK_ROW_MULTIPLE), so a few more tokens can take
    the chunks 64 rows shorter and their peak scores with them: the trainer's kernel does so, and the planner prices
    the chunks it runs. One such step of the widest chunked layer; 0 where no layer runs chunked."""
    chunked = [layer for layer in architecture(resolve_model(plan.model)).layers
               if attention_kernel_of(layer, plan).startswith("chunked")]
    heads = max((layer.heads for layer in chunked), default=0)
    return int(CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS * plan.micro_batch * heads * CHUNK_ROW_MULTIPLE * plan.seq_len * 4)


@FAST
@given(MODELS, STACKS, CKPT, QUANT, SEQ, st.integers(1, 64))
@example("gemma-4-e2b-text", "vramplan", "full", "bf16", 1695, 30)
def test_grows_with_sequence_length(model, stack, ckpt, quant, seq, extra):
    """Never falls by more than one aligned chunk-row step (Gemma-4-E2B in bf16 at 1,695 -> 1,725 tokens: its chunks
    1,216 -> 1,152 rows, 0.22 MB less in 6.58 GB)."""
    kw = dict(model=model, stack=stack, checkpointing=ckpt, quant=quant)
    longer = Plan(seq_len=seq + extra, **kw)
    assert _peak(seq_len=seq + extra, **kw) >= _peak(seq_len=seq, **kw) - _chunk_row_step_bytes(longer)
    if model == "llama-3.2-1b":  # flash attention, no chunks: strictly monotone
        assert _chunk_row_step_bytes(longer) == 0


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
