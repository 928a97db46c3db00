"""The Triton RoPE patched into transformers' apply_rotary_pos_emb (Llama and Gemma 4, in the
interpreter, float64): the same logits and gradients as the unpatched model, with checkpointing."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from train_fixtures import gemma4_config, llama_config
from vramplan.train import ops, patching
from vramplan.train.model import enable_checkpointing
from vramplan_kernels.dispatch import kernel_mode

# two packed sequences in the first row: positions restart mid-row
POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])


def _logits_and_grads(model, ids, mode):
    model.zero_grad(set_to_none=True)
    with kernel_mode(mode):
        logits = model(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
        (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [llama_config(), gemma4_config()], ids=["llama", "gemma4"])
def test_patched_rope_keeps_logits_and_grads_with_checkpointing(config, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float64,
                                             attn_implementation="sdpa")
    model.train()
    ids = torch.randint(0, config["vocab_size"], POSITIONS.shape, generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _logits_and_grads(model, ids, "reference")  # the patch runs the original here

    patching.patch_rope(model)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    assert hasattr(modeling.apply_rotary_pos_emb, "vramplan_original")
    assert patching.patch_rope(model) == []  # idempotent: never wraps its own wrapper
    calls = []
    for name in ("apply_rope", "apply_rope_one"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(k["same_halves"]) or _real(*a, **k))
    enable_checkpointing(model)
    got_logits, got_grads = _logits_and_grads(model, ids, "triton")

    layers = config["num_hidden_layers"]
    # forward + recompute per layer; Gemma 4 rotates q and k in separate calls, its shared-KV layers only q
    shared = config.get("num_kv_shared_layers", 0)
    assert len(calls) == 2 * (layers if "gemma" not in config["model_type"] else 2 * layers - shared)
    assert all(calls)  # the model's rotary embedding builds cat(f, f): the kernel reads one half of cos/sin
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [llama_config(), gemma4_config()], ids=["llama", "gemma4"])
def test_patched_rope_on_the_gpu_in_bf16(config):
    """On CUDA the patch runs the kernel: its bf16 logits and grads are as close to the float64
    truth as the original bf16 rotation's are (two bf16 runs differ from each other by rounding
    noise that grows through the layers, so each is judged against the truth, not the other)."""
    torch.manual_seed(0)
    truth_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float64,
                                                   attn_implementation="sdpa").cuda().train()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16,
                                             attn_implementation="sdpa").cuda().train()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in truth_model.state_dict().items()})
    ids = torch.randint(0, config["vocab_size"], POSITIONS.shape).cuda()
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])

    def run(m):
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, position_ids=POSITIONS.cuda(), use_cache=False).logits
        logits.double().square().mean().backward()
        return logits.double(), {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}

    truth = run(truth_model)  # unpatched, float64
    want = run(model)  # unpatched, bf16
    patching.patch_rope(model)
    try:
        assert hasattr(modeling.apply_rotary_pos_emb, "vramplan_original")
        got = run(model)
    finally:
        modeling.apply_rotary_pos_emb = getattr(modeling.apply_rotary_pos_emb, "vramplan_original",
                                                modeling.apply_rotary_pos_emb)

    def error(pair):
        return (pair[0] - truth[0]).abs().max().item()

    assert error(got) <= 2 * error(want) + 1e-3, (error(got), error(want))
    for name, grad in truth[1].items():  # relative norm error: a single element's bf16 error is too noisy to judge by
        scale = grad.norm().item() + 1e-12
        got_err = (got[1][name] - grad).norm().item() / scale
        want_err = (want[1][name] - grad).norm().item() / scale
        assert got_err <= 2 * want_err + 1e-2, (name, got_err, want_err)
