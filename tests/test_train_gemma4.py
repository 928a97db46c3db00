"""Gemma 4 correctness under the trainer's patching, on a tiny random text model with E2B's features:
sliding + full layers, shared-KV layers, per-layer embeddings, double-wide MLP, logit softcapping."""

import pytest
import torch

from train_fixtures import build_model, gemma4_config
from vramplan.plan import Plan
from vramplan.train import data, patching
from vramplan.train.loss import accumulate_gradients, hidden_states, lm_head_of
from vramplan.train.model import enable_checkpointing, load_base_model, load_for_training, lora_parameters, prepare_for_qlora

IDS = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14, 9, 3, 7, 22, 17, 40, 11, 10]])


def training_logits(model, ids):
    """The trainer's path: decoder hidden states without cache (checkpointed in train mode), then head + softcap."""
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None]}
    hidden = hidden_states(model, batch)
    logits = hidden @ lm_head_of(model).weight.T
    cap = model.config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def trainer_model(folder, **plan_fields):
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=64, checkpointing="full", **plan_fields)
    model = load_base_model(folder, torch.float32)
    prepare_for_qlora(model, plan, torch.device("cpu"), host_per_layer_embeddings=True)
    enable_checkpointing(model)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(gemma4_config(), tmp_path_factory.mktemp("gemma4") / "m")


def test_patched_training_forward_equals_cached_inference(folder):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = trainer_model(folder)
    assert isinstance(model.model.embed_tokens_per_layer, patching.HostResidentEmbedding)
    with torch.no_grad():
        reference = original(input_ids=IDS, use_cache=True).logits
    model.train()
    trained_path = training_logits(model, IDS)
    torch.testing.assert_close(trained_path, reference, atol=1e-5, rtol=1e-5)  # B = 0: the patched model is the base
    trained_path.float().logsumexp(-1).sum().backward()  # backward through the checkpointed layers
    assert all(p.grad is not None for p in lora_parameters(model))

    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_(std=0.2)
        model.train()
        trained_path = training_logits(model, IDS)
        model.eval()
        cached = model(input_ids=IDS, use_cache=True).logits
        # decode the last 4 tokens one by one: the shared-KV layers must read K/V from the cache
        prefix = model(input_ids=IDS[:, :-4], use_cache=True)
        name = _cache_kw()  # transformers 5.2x names the cache `cache` (`past_key_values` goes in 5.40)
        cache, steps = getattr(prefix, name, None) or prefix.past_key_values, []
        for t in range(IDS.shape[1] - 4, IDS.shape[1]):
            out = model(input_ids=IDS[:, t:t + 1], use_cache=True, **{name: cache})
            cache = getattr(out, name, None) or out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(trained_path, cached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), cached[:, -4:], atol=1e-4, rtol=1e-4)


def test_no_shared_kv_layers(tmp_path):
    """num_kv_shared_layers = 0 (26B-A4B, 31B): `layer_types[:-0]` must not leave the cache empty."""
    folder = build_model(gemma4_config(num_kv_shared_layers=0), tmp_path / "m")
    model, _ = load_for_training(folder, Plan(model="tiny", lora_rank=4, seq_len=64), torch.device("cpu"))
    batch = {"input_ids": IDS, "labels": IDS.roll(-1, 1), "position_ids": torch.arange(IDS.shape[1])[None]}
    loss, n = accumulate_gradients(model, [batch])
    assert n == IDS.numel() and 0 < loss < 20
    model.eval()
    with torch.no_grad():
        cached = model(input_ids=IDS, use_cache=True).logits
        model.train()
        torch.testing.assert_close(training_logits(model, IDS), cached, atol=1e-5, rtol=1e-5)


def test_fp16_masks_do_not_overflow(folder):
    """fp16 with eager attention and a packed batch (a real mask): finite loss, mask at fp16's own minimum."""
    from transformers.masking_utils import create_causal_mask

    model = load_base_model(folder, torch.float16, attention="eager")
    plan = Plan(model="tiny", lora_rank=4, seq_len=64, compute_dtype="fp16", checkpointing="none", quant="bf16")
    prepare_for_qlora(model, plan, torch.device("cpu"))
    model.train()
    texts = [[2, 12, 30, 25, 9], [2, 40, 33, 12, 30, 18, 21], [2, 14, 9, 3]]
    rows = [[data.Example(input_ids=t, labels=t[1:] + [-100]) for t in texts]]
    batch = data.collate(rows, 0)
    loss, n = accumulate_gradients(model, [batch])
    assert torch.isfinite(torch.tensor(loss)) and n == sum(len(t) - 1 for t in texts)
    embeds = torch.zeros(1, batch["input_ids"].shape[1], 64, dtype=torch.float16)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                              position_ids=batch["position_ids"], **{_cache_kw(): None})
    assert mask.dtype == torch.float16 and mask.min() == torch.finfo(torch.float16).min
    assert mask[0, 0, 5, 4] == torch.finfo(torch.float16).min and mask[0, 0, 5, 5] == 0  # packed: block-diagonal


def _cache_kw() -> str:
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def test_multimodal_checkpoint_loads_as_text_model_only(tmp_path):
    """A Gemma 4 checkpoint with a vision tower loads as Gemma4ForCausalLM: towers never built, same text logits."""
    from transformers.models.gemma4 import Gemma4Config, Gemma4ForConditionalGeneration

    text = gemma4_config()
    text.pop("model_type")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16}
    torch.manual_seed(0)
    full = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision, audio_config=None)).eval()
    full.save_pretrained(tmp_path / "mm")
    model = load_base_model(tmp_path / "mm", torch.float32).eval()
    assert type(model).__name__ == "Gemma4ForCausalLM"
    assert not any("vision" in name for name, _ in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, full(input_ids=IDS).logits)


def test_kernel_patches_are_in_place_and_attention_is_untouched(folder):
    from vramplan_kernels.glu import GatedMLP
    from vramplan_kernels.rmsnorm import RMSNorm

    model = trainer_model(folder)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Gemma4RMSNorm" not in kinds and "Gemma4TextMLP" not in kinds
    assert any(isinstance(m, RMSNorm) for m in model.modules()) and any(isinstance(m, GatedMLP) for m in model.modules())
    assert "Gemma4TextAttention" in kinds  # the shared-KV path stays transformers' own


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_resident_embedding_equals_the_scaled_lookup(device):
    """Gathered into (pinned, on a GPU machine) memory and scaled after the copy: the same values
    as the module it replaces, ``embedding(ids) * scale`` in bf16."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(300, 40, padding_idx=0).to(torch.bfloat16)
    table.scalar_embed_scale = 40**0.5  # not a power of two: the bf16 product rounds
    ids = torch.randint(0, 300, (2, 17))
    ids[0, 0] = 0
    expected = torch.nn.functional.embedding(ids, table.weight.detach(), 0)
    expected = expected * torch.tensor(40**0.5, dtype=torch.bfloat16)
    got = patching.HostResidentEmbedding(table)(ids.to(device))
    assert got.device.type == device and torch.equal(got.cpu(), expected)


def test_checkpointing_records_no_frozen_path_from_the_embeddings(folder):
    """transformers' checkpointing marks the input embeddings' output as requiring grad (a hook reentrant checkpoints
    need); the trainer's are non-reentrant and drop it (``model.drop_input_grad_hooks``). Without the hook no autograd
    node holds the per-layer projection's norm input (b·s·layers·d_pl values, 36.7 MB on Gemma-4-E2B at 2,048 tokens),
    and every adapter's gradient is what it is with the hook, the shared-KV layers' included."""
    from vramplan.train.model import drop_input_grad_hooks

    def gradients(model):
        torch.manual_seed(3)
        with torch.no_grad():
            for param in lora_parameters(model):
                param.normal_(std=0.2)
        model.train()
        training_logits(model, IDS).float().logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in lora_parameters(model)]

    model = trainer_model(folder)
    assert not model.get_input_embeddings()(IDS).requires_grad
    without = gradients(model)
    model.enable_input_require_grads()  # as transformers leaves it
    assert model.get_input_embeddings()(IDS).requires_grad
    model.zero_grad(set_to_none=True)
    with_hook = gradients(model)
    assert all(g.abs().sum() > 0 for g in without)
    for a, b in zip(without, with_hook):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    drop_input_grad_hooks(model)
    drop_input_grad_hooks(model)  # once is enough; again does nothing
    assert not model.get_input_embeddings()(IDS).requires_grad
