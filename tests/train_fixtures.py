"""Tiny real models and a tiny tokenizer for the trainer tests: built here, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "birds sing in the morning light",
    "the quick brown fox jumps over the lazy dog",
    "we train small models on small data",
    "what is the answer",
    "the answer is forty two",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
VOCAB = 300
# Larger than the usual 0.02: with a frozen random LM head of std 0.02 and hidden 64, logits cannot
# spread past ~1, so no adapter could bring the loss far below log(vocab) and "the loss falls" would test nothing.
INIT = 0.2


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama_config() -> dict:
    return {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": INIT, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}


def qwen3_config() -> dict:
    """Qwen3's structure (q/k norms, explicit head_dim), shrunk."""
    return dict(llama_config(), model_type="qwen3", head_dim=16, tie_word_embeddings=True)


def mistral_config() -> dict:
    return dict(llama_config(), model_type="mistral", sliding_window=None)


def gemma3_config() -> dict:
    """Gemma 3's text structure (four norms a layer, (1+w) norms, sliding + global layers, scaled
    embeddings, tied head), shrunk."""
    return {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16,
            "initializer_range": INIT, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
            "tie_word_embeddings": True}


def gemma4_config(num_kv_shared_layers: int = 2) -> dict:
    """Gemma-4-E2B's text architecture shrunk: sliding + full layers, shared KV, per-layer embeddings, double-wide MLP."""
    return {
        "model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 32, "sliding_window": 8,
        "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
        "num_kv_shared_layers": num_kv_shared_layers, "use_double_wide_mlp": True, "intermediate_size": 96,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "tie_word_embeddings": True, "initializer_range": INIT,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }


def build_model(config: dict, folder: Path, seed: int = 0) -> Path:
    """A random-weight model + the tiny tokenizer saved as a local Hugging Face folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def unpacked_and_packed_steps(steps: int = 6, seed: int = 0, device: str = "cuda") -> list[list[dict]]:
    """``steps`` optimizer steps of the same two micro-batches (so the loss must fall): two unpacked rows of 24 tokens,
    and two of 16 whose second packs two sequences (positions restart halfway)."""
    generator = torch.Generator().manual_seed(seed)

    def micro_batch(width, packed):
        ids = torch.randint(4, 300, (2, width), generator=generator)
        positions = torch.arange(width).expand(2, -1).clone()
        if packed:
            positions[1, width // 2:] = torch.arange(width - width // 2)
        labels = ids.roll(-1, dims=1)
        labels[:, -1] = -100
        return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}

    return [[micro_batch(24, False), micro_batch(16, True)]] * steps


def attention_inputs(b=2, h=4, h_kv=2, s=13, d=8, dtype=torch.float64, device="cpu", seed=0):
    """Random q [b, h, s, d] and k, v [b, h_kv, s, d] that want gradients: the attention tests' inputs."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, dtype=dtype, device=device, generator=g).requires_grad_()
               for n in (h, h_kv, h_kv))
    return q, k, v


def attention_grads(fn, q, k, v, seed=1):
    """fn(q, k, v) and the gradients of q, k and v under one random output gradient (the same values any dtype)."""
    out = fn(q, k, v)
    grad = torch.randn(out.shape, dtype=torch.float64, device=out.device,
                       generator=torch.Generator(out.device.type).manual_seed(seed)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_records(n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        s = SENTENCES[i % len(SENTENCES)]
        if i % 3 == 0:
            out.append({"messages": [{"role": "user", "content": "what is the answer"},
                                     {"role": "assistant", "content": s}]})
        elif i % 3 == 1:
            out.append({"prompt": "what is the answer", "completion": s})
        else:
            out.append({"text": s})
    return out


def compute_in_fp16(monkeypatch) -> None:
    """The trainer's CPU path in real fp16 arithmetic (as a T4 computes) where a plan says fp16: the CPU otherwise
    computes in fp32 (``train.model.compute_dtype``)."""
    from vramplan.train import model, recipe

    fp32 = model.compute_dtype
    in_fp16 = lambda plan, device: torch.float16 if plan.compute_dtype == "fp16" else fp32(plan, device)  # noqa: E731
    monkeypatch.setattr(model, "compute_dtype", in_fp16)
    monkeypatch.setattr(recipe, "compute_dtype", in_fp16)


def models_with_data(root: Path, configs: dict) -> Path:
    """A folder with a tiny chat dataset (``train.jsonl``) and one random model per named config."""
    write_jsonl(root / "train.jsonl", chat_records(24))
    for name, config in configs.items():
        build_model(config(), root / name)
    return root


def load_with_random_adapters(folder: Path, plan, device, std: float = 0.05, seed: int = 1):
    """The trainer's model with nonzero adapters (B starts at zero, and A gets no gradient until it is not)."""
    from vramplan.train.model import load_for_training, lora_parameters

    model, _ = load_for_training(folder, plan, torch.device(device) if isinstance(device, str) else device)
    params = lora_parameters(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(std=std)
    return model, params
