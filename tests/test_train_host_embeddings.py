"""An untied token embedding lives on the host: the GPU keeps only the LM head, and nothing changes."""

import torch

from train_fixtures import build_model, gemma4_config, llama_config
from vramplan.plan import Plan
from vramplan.train import patching
from vramplan.train.model import load_base_model, prepare_for_qlora

IDS = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14]])


def _prepared(folder):
    model = load_base_model(folder, torch.float32)
    plan = Plan(model="tiny", quant="bf16", lora_rank=4, seq_len=32)
    prepare_for_qlora(model, plan, torch.device("cpu"), host_per_layer_embeddings=True)
    return model


def test_untied_embedding_moves_to_host_and_logits_do_not_change(tmp_path):
    folder = build_model(dict(llama_config(), tie_word_embeddings=False), tmp_path / "m")
    reference = load_base_model(folder, torch.float32).eval()
    model = _prepared(folder).eval()
    assert isinstance(model.model.embed_tokens, patching.HostResidentEmbedding)
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())  # off the device placement
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_tied_and_scaled_embeddings_stay(tmp_path):
    tied = _prepared(build_model(dict(llama_config(), tie_word_embeddings=True), tmp_path / "tied"))
    assert isinstance(tied.model.embed_tokens, torch.nn.Embedding)
    gemma = _prepared(build_model(gemma4_config(), tmp_path / "gemma"))
    assert not isinstance(gemma.model.embed_tokens, patching.HostResidentEmbedding)  # tied, and scaled by sqrt(h)
