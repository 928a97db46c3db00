"""The CUDA-graph step's body, run eagerly on the CPU: what a graph would replay computes the same
loss and gradients as the eager step, for Llama and for Gemma 4 (per-layer inputs, shared K/V),
packed and unpacked, under checkpointing. The capture itself needs a GPU (tests/test_train_gpu.py)."""

import pytest
import torch

from train_fixtures import build_model, gemma4_config, llama_config, load_with_random_adapters
from vramplan.plan import Plan
from vramplan.train.graphs import StaticInputs, StepGraphs, graph_safe_checkpoints, is_packed, packing_decided
from vramplan.train.loss import summed_loss


def _batch(vocab: int, packed: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (2, 24), generator=generator)
    positions = torch.arange(24).expand(2, -1).clone()
    if packed:  # row 0: two sequences (10 + 14 tokens)
        positions[0, 10:] = torch.arange(14)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, 9] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _eager_step(model, params, batch):
    """The eager step's denominator, summed loss and gradients (left cleared): what a graph's body must match."""
    denominator = (batch["labels"] != -100).sum().float()
    loss, _ = summed_loss(model, batch)
    (loss / denominator).backward()
    grads = _grads(params)
    for p in params:
        p.grad = None
    return denominator, loss, grads


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
@pytest.mark.parametrize("packed", [False, True])
def test_graph_body_equals_eager_step(tmp_path, arch, packed):
    config = llama_config() if arch == "llama" else gemma4_config()
    folder = build_model(config, tmp_path / arch)
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    batch = _batch(model.config.get_text_config().vocab_size, packed)
    assert is_packed(batch["position_ids"]) == packed
    denominator, eager_loss, eager_grads = _eager_step(model, params, batch)

    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    assert (per_layer is not None) == (arch == "gemma4")
    static = StaticInputs.like(embeds, per_layer, batch)
    static.fill(embeds, per_layer, batch, denominator)
    graphs._grads_in_place()
    with packing_decided(packed), graph_safe_checkpoints(model):
        graphs.body(static)
    torch.testing.assert_close(static.loss, eager_loss.detach())
    for got, want in zip(_grads(params), eager_grads):
        torch.testing.assert_close(got, want)
    assert any(g.abs().sum() > 0 for g in eager_grads)


def test_body_accumulates_into_existing_gradients(tmp_path):
    """Two replays of one micro-batch add up, as two eager backward passes do: gradients are never replaced."""
    folder = build_model(llama_config(), tmp_path / "llama")
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=24, checkpointing="full")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    batch = _batch(model.config.vocab_size, packed=False)
    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    static.fill(embeds, per_layer, batch, torch.tensor(10.0))
    graphs._grads_in_place()
    with packing_decided(False):
        graphs.body(static)
    once = _grads(params)
    with packing_decided(False):
        graphs.body(static)
    for got, single in zip(_grads(params), once):
        torch.testing.assert_close(got, 2 * single)


def test_graphs_are_only_offered_where_a_capture_can_hold_the_step():
    from torch import nn

    class Text(nn.Module):
        def get_decoder(self):
            return self

    plan = Plan(model="tiny")
    assert not StepGraphs.available(Text(), plan, torch.device("cpu"))
    assert StepGraphs.available(Text(), plan, torch.device("cuda"))
    assert not StepGraphs.available(Text(), plan, torch.device("cuda"), world_size=2)
    assert not StepGraphs.available(Text(), Plan(model="tiny", checkpointing="offload"), torch.device("cuda"))


def test_a_run_gets_graphs_when_its_plan_asks_and_they_are_possible(monkeypatch):
    from torch import nn

    class Text(nn.Module):
        def get_decoder(self):
            return self

    plan = Plan(model="tiny")
    monkeypatch.delenv("VRAMPLAN_DISABLE", raising=False)
    assert plan.captures_steps
    assert isinstance(StepGraphs.for_run(Text(), [], plan, torch.device("cuda")), StepGraphs)
    assert StepGraphs.for_run(Text(), [], plan, torch.device("cpu")) is None
    assert StepGraphs.for_run(Text(), [], plan, torch.device("cuda"), world_size=2) is None
    for off in (plan.replace(cuda_graphs=False), plan.replace(checkpointing="offload"), plan.replace(stack="hf"),
                plan.replace(gpus=2, parallel="ddp"), plan.replace(modalities=("text", "image"))):
        assert not off.captures_steps
        assert StepGraphs.for_run(Text(), [], off, torch.device("cuda")) is None
    monkeypatch.setenv("VRAMPLAN_DISABLE", "cuda_graphs")
    assert StepGraphs.for_run(Text(), [], plan, torch.device("cuda")) is None


def test_a_model_with_routed_experts_trains_eagerly(tmp_path):
    """Routing reads on the host which experts got tokens: no capture is attempted for MoE models,
    NF4 (experts swapped for NF4Experts) or bf16 (transformers' fused experts kept)."""
    import json

    from test_train_moe import qwen3_moe_config
    from train_fixtures import build_model, llama_config
    from vramplan.arch import from_config
    from vramplan.train.graphs import routes_experts
    from vramplan.train.model import load_for_training

    moe = build_model(qwen3_moe_config(), tmp_path / "moe")
    # the planner reads the same saved config and agrees (vramplan.stacks.vramplan.graphs_apply)
    assert from_config(json.loads((moe / "config.json").read_text())).routes_experts
    for quant in ("nf4", "bf16"):
        model, _ = load_for_training(moe, Plan(model="tiny", quant=quant, lora_rank=4, seq_len=24), torch.device("cpu"))
        assert routes_experts(model)
        assert StepGraphs.for_run(model, [], Plan(model="tiny"), torch.device("cuda")) is None
    dense, _ = load_for_training(build_model(llama_config(), tmp_path / "llama"), Plan(model="tiny", lora_rank=4, seq_len=24),
                                 torch.device("cpu"))
    assert not routes_experts(dense)
    assert not from_config(json.loads((tmp_path / "llama" / "config.json").read_text())).routes_experts


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_unpacked_capture_keeps_the_causal_kernel_and_the_same_loss(tmp_path, monkeypatch, arch):
    """While a graph is captured transformers 5.17 counts as tracing and materialises an s×s mask
    (a masked kernel over the whole square); an unpacked capture keeps SDPA's ``is_causal`` path
    instead, with the same loss and gradients. Stream capture is imitated by making ``is_tracing``
    true, as 5.17's is during a capture; a packed batch still gets its mask."""
    from transformers import masking_utils

    config = llama_config() if arch == "llama" else gemma4_config()
    folder = build_model(config, tmp_path / arch)
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=24, checkpointing="full")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    model.config.get_text_config()._attn_implementation = "sdpa"
    batch = _batch(model.config.get_text_config().vocab_size, packed=False)
    denominator = (batch["labels"] != -100).sum().float()
    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    static.fill(embeds, per_layer, batch, denominator)
    graphs._grads_in_place()
    with packing_decided(False):
        graphs.body(static)
    want_loss, want = static.loss.clone(), _grads(params)
    for p in params:
        p.grad.zero_()

    monkeypatch.setattr(masking_utils, "is_tracing", lambda tensor=None: True)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask") is None and kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with packing_decided(False):
        graphs.body(static)
    assert seen and any(seen)  # full-attention layers ran causal, without a mask
    torch.testing.assert_close(static.loss, want_loss)
    for got, expected in zip(_grads(params), want):
        torch.testing.assert_close(got, expected)
    with packing_decided(False):
        assert masking_utils._ignore_causal_mask_sdpa(None, 24, 24, 0, 0) is True
        assert masking_utils._ignore_causal_mask_sdpa(None, 24, 24, 0, 0, 8) is False  # a sliding window's mask stays


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_filling_the_static_inputs_keeps_no_step_alive(tmp_path, arch):
    """Each replay fills the buffers from a fresh lookup, whose output transformers' input hook marks
    as requiring grad: the copy must record no history, or every replayed step's embeddings stay
    referenced from the buffer's growing autograd chain (a leak measured at 8 MiB a step on the H100)."""
    import weakref

    folder = build_model(llama_config() if arch == "llama" else gemma4_config(), tmp_path / arch)
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    batch = _batch(model.config.get_text_config().vocab_size, packed=False)
    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    lookups = []
    for _ in range(3):
        embeds, per_layer = graphs.prologue(batch)
        lookups += [weakref.ref(t) for t in (embeds, per_layer) if t is not None]
        static.fill(embeds, per_layer, batch, torch.tensor(10.0))
        del embeds, per_layer
    assert lookups and all(ref() is None for ref in lookups)
    assert static.embeds.grad_fn is None and not static.embeds.requires_grad


def test_first_eager_pass_adds_into_one_buffer_made_before_it(tmp_path):
    """A shape's first pass runs eagerly; its backward adds into gradients made before it, views of one buffer,
    rather than leaving a tensor per adapter among its activations (whose pages they would keep mapped through
    the capture), and computes the eager step's gradients."""
    folder = build_model(llama_config(), tmp_path / "llama")
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="none")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    batch = _batch(model.config.vocab_size, packed=False)
    denominator, eager_loss, eager_grads = _eager_step(model, params, batch)

    graphs = StepGraphs(model, params)
    graphs._grads_in_place()  # what summed_loss does before a run's first pass (its eager pass needs a CUDA stream)
    assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 1
    loss, _ = summed_loss(model, batch)
    (loss / denominator).backward()
    torch.testing.assert_close(loss, eager_loss)
    assert all(p.grad is held for p, held in zip(params, graphs.grad_tensors))  # added into, not replaced
    for got, want in zip(_grads(params), eager_grads):
        torch.testing.assert_close(got, want)


def test_capture_drops_the_eager_passes_adapter_copies(tmp_path):
    folder = build_model(llama_config(), tmp_path / "llama")
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="none")
    model, params = load_with_random_adapters(folder, plan, "cpu")
    modules = [m for m in model.modules() if getattr(m, "_lora_copies", None) is not None]
    for m in modules:  # what a bf16 forward makes (this CPU model computes in fp32, which needs no copies)
        m._lora_copies.get(m.lora_A.weight, m.lora_B.weight, torch.bfloat16)
    holders = [m._lora_copies for m in modules]
    assert holders and all(h._copies is not None for h in holders)
    StepGraphs(model, params)._drop_eager_copies()
    assert all(h._copies is None and h._key is None for h in holders)
