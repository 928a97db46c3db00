"""The trainer's loss: fused LM head + CE matches the plain loss, and accumulation is exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train_fixtures import build_model, llama_config, make_tokenizer
from vramplan.plan import Plan
from vramplan.train import data, ops
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import load_for_training, lora_parameters


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_linear_cross_entropy_equals_full_logits_loss(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100
    loss, n = ops.linear_cross_entropy(hidden, weight, labels, softcap=softcap, reduction="sum", chunk_size=8)
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="sum")
    assert int(n) == 2 * 37 - 5
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_qlora_linear_is_base_plus_scaled_low_rank(quant):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=True)
    module = ops.QLoRALinear.from_linear(linear, rank=4, alpha=8, quant=quant)
    x = torch.randn(3, 64)
    base = F.linear(x, module.base_weight(torch.float32), linear.bias)
    torch.testing.assert_close(module(x), base)  # B starts at zero
    if quant == "nf4":
        assert (module.base_weight(torch.float32) - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()
    with torch.no_grad():
        module.lora_B.weight.normal_()
    expected = base + 2.0 * (x @ module.lora_A.weight.T) @ module.lora_B.weight.T
    torch.testing.assert_close(module(x), expected)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_accumulated_micro_batches_match_one_batch(tmp_path):
    """4 micro-batches of 1 example and 1 batch of 4, examples of different lengths: same gradients."""
    folder = build_model(llama_config(), tmp_path / "llama")
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=32, checkpointing="none")
    model, _ = load_for_training(folder, plan, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_(std=0.1)  # B nonzero so A gets a gradient too
    tok = make_tokenizer()
    texts = ["the cat", "a dog ran in the park", "birds sing in the morning light and the cat sat on the mat", "we train"]
    rows = [[data.to_example(*data.tokenize({"text": t}, tok))] for t in texts]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        loss, n = accumulate_gradients(model, micro_batches)
        return loss, n, [p.grad.clone() for p in lora_parameters(model)]

    loss_a, n_a, g_a = grads([data.collate([row], 0) for row in rows])
    loss_b, n_b, g_b = grads([data.collate(rows, 0)])
    assert n_a == n_b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the per-micro-batch mean (the common bug) gives a different gradient on these lengths
    model.zero_grad(set_to_none=True)
    for row in rows:
        accumulate_gradients(model, [data.collate([row], 0)])
    wrong = [p.grad.clone() / len(rows) for p in lora_parameters(model)]
    assert max((w - b).abs().max() for w, b in zip(wrong, g_b)) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_offloaded_layer_inputs_give_the_same_gradients(tmp_path, family):
    """checkpointing=offload recomputes each layer from a host copy of its input: same loss, same gradients."""
    from train_fixtures import gemma4_config

    folder = build_model(llama_config() if family == "llama" else gemma4_config(), tmp_path / "m")
    ids = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14]])
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(ids.shape[1])[None]}
    results = []
    for mode in ("full", "offload"):
        model, _ = load_for_training(folder, Plan(model="t", lora_rank=4, seq_len=32, checkpointing=mode), torch.device("cpu"))
        torch.manual_seed(1)
        with torch.no_grad():
            for param in lora_parameters(model):
                param.normal_(std=0.1)
        loss, _ = accumulate_gradients(model, [batch])
        results.append((loss, [p.grad.clone() for p in lora_parameters(model)]))
    (loss_full, g_full), (loss_off, g_off) = results
    assert loss_full == pytest.approx(loss_off, rel=1e-6)
    for a, b in zip(g_full, g_off):
        torch.testing.assert_close(a, b)
