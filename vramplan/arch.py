"""Architecture: the facts of a model that decide its memory, read from a Hugging Face config.

The planner never trusts a parameter count: it rebuilds every weight matrix from the
config (hidden size, per-layer head dims and intermediate sizes, shared-KV layers,
per-layer embeddings, experts, tied embeddings) so that it knows which bytes are
quantizable linears, which stay in 16 bits, and which an adapter touches. The totals
are checked against transformers' own count on the ``meta`` device in the tests.

Multimodal configs nest ``text_config`` / ``vision_config`` / ``audio_config``; the text
decoder is read exactly, the towers are counted as plain transformer encoders (they stay
off the GPU unless a plan trains on images or audio).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vramplan.errors import VramplanError

#: Linear layers of a decoder layer, in the names PEFT targets use.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")

_GELU_FAMILY_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2"}
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "olmo2"}
_FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text"}


@dataclass(frozen=True)
class Linear:
    """One weight matrix ``out × in`` (plus an optional bias) inside a decoder layer."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its attention shape, its MLP, and everything else it holds."""

    attention: str  # "full" | "sliding"
    sliding_window: int | None
    heads: int
    kv_heads: int
    head_dim: int
    has_kv: bool  # False on Gemma 4's shared-KV layers: they read K/V computed by an earlier layer
    linears: tuple[Linear, ...]
    mlp_intermediate: int  # the dense MLP's width (0 without one)
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    expert_params: int = 0  # fused 3-D expert tensors plus the router: not nn.Linear, not LoRA targets
    per_layer_input: int = 0  # Gemma 4: width of the per-layer embedding fed into this layer
    norm_params: int = 0
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        return sum(lin.params for lin in self.linears)


@dataclass(frozen=True)
class Architecture:
    """The text decoder of a model (and the size of any vision/audio towers beside it)."""

    model_type: str
    hidden_size: int
    vocab_size: int
    layers: tuple[Layer, ...]
    tied_embeddings: bool
    gated_mlp: bool
    final_logit_softcapping: float | None = None
    per_layer_vocab: int = 0  # Gemma 4: rows of the per-layer embedding table
    per_layer_dim: int = 0  # Gemma 4: hidden_size_per_layer_input
    extra_linears: tuple[Linear, ...] = ()  # model-level linears, e.g. Gemma 4's per_layer_model_projection
    extra_norm_params: int = 0  # final norm and other model-level vectors
    tower_params: dict[str, int] = field(default_factory=dict)  # "vision"/"audio" -> parameters
    tower_configs: dict[str, dict] = field(default_factory=dict)  # "vision"/"audio" -> the tower's config (vramplan.memory.towers)
    image_soft_tokens: int = 0  # soft tokens one image becomes (Gemma 4: vision_soft_tokens_per_image)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def scales_embeddings(self) -> bool:
        """Gemma's embeddings multiply the looked-up rows by a scale: the lookup and its product exist at once."""
        return self.model_type.startswith("gemma")

    @cached_property
    def embedding_params(self) -> int:
        """The token embedding; an untied LM head is counted separately (``lm_head_params``)."""
        return self.vocab_size * self.hidden_size

    @cached_property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @cached_property
    def per_layer_embedding_params(self) -> int:
        return self.per_layer_vocab * self.per_layer_dim * self.num_layers

    @cached_property
    def linear_params(self) -> int:
        """Every nn.Linear of the decoder but the LM head: what bitsandbytes quantizes."""
        return sum(layer.linear_params for layer in self.layers) + sum(lin.params for lin in self.extra_linears)

    @cached_property
    def largest_linear_params(self) -> int:
        return max(lin.params for layer in self.layers for lin in layer.linears)

    @cached_property
    def expert_params(self) -> int:
        return sum(layer.expert_params for layer in self.layers)

    @cached_property
    def routes_experts(self) -> bool:
        """Whether any decoder layer routes tokens to MoE experts (Qwen3-MoE, Gemma 4 26B-A4B): the planner's
        side of the trainer's ``vramplan.train.graphs.routes_experts``, which reads it off the loaded model."""
        return any(layer.experts for layer in self.layers)

    @cached_property
    def norm_params(self) -> int:
        return sum(layer.norm_params for layer in self.layers) + self.extra_norm_params

    @cached_property
    def text_params(self) -> int:
        return (
            self.embedding_params + self.lm_head_params + self.per_layer_embedding_params
            + self.linear_params + self.expert_params + self.norm_params
        )

    @cached_property
    def total_params(self) -> int:
        return self.text_params + sum(self.tower_params.values())


# ------------------------------------------------------------------ reading configs


def _need(config: dict[str, Any], key: str, where: str) -> Any:
    value = config.get(key)
    if value is None:
        raise VramplanError(f"{where}: field '{key}' is missing; a decoder config needs it")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise VramplanError(f"{where}: field '{key}' must be a positive number, got {value!r}")
    return int(value)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = dict(text)
        # tie_word_embeddings often lives on the outer config of a multimodal model
        if "tie_word_embeddings" in config:
            merged.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
        merged.setdefault("model_type", config.get("model_type", ""))
        return merged
    return config


def _layer_types(config: dict[str, Any], n_layers: int) -> list[str]:
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return ["sliding" if "sliding" in str(t) else "full" for t in types]
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0 and config.get("sliding_window"):
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)]
    if config.get("sliding_window") and config.get("use_sliding_window", config.get("model_type") == "mistral"):
        return ["sliding"] * n_layers
    return ["full"] * n_layers


def _tower_params(config: dict[str, Any] | None, text_hidden: int) -> int:
    """A vision or audio encoder, counted from its config's shape (approximate, within ~1%; text plans keep it off the GPU).

    Vision (ViT / SigLIP-style): per layer q, k, v, o and a (gated for Gemma) MLP, plus the
    patch embedding, Gemma 4's 2-D position table and the projection into the text width.
    Audio conformers (Gemma 3n/4): per layer two macaron feed-forwards (8h² each),
    attention with a relative-position projection (5h²) and a light conv module (3h²).
    """
    if not isinstance(config, dict):
        return 0
    h = int(config.get("hidden_size") or config.get("d_model") or 0)
    n = int(config.get("num_hidden_layers") or config.get("encoder_layers") or 0)
    if not h or not n:
        return 0
    kind = str(config.get("model_type", ""))
    if "audio" in kind and "gemma" in kind:
        kernel = int(config.get("conv_kernel_size") or 5)
        out = int(config.get("output_proj_dims") or text_hidden)
        per_layer = 24 * h * h + kernel * h + 10 * h
        return n * per_layer + (h * out + out) + out * text_hidden
    inter = int(config.get("intermediate_size") or config.get("encoder_ffn_dim") or 4 * h)
    mlp = (3 if "gemma" in kind else 2) * h * inter
    total = n * (4 * h * h + mlp + 4 * h)
    patch = int(config.get("patch_size") or 0)
    if patch:
        total += 3 * patch * patch * h
    total += 2 * int(config.get("position_embedding_size") or 0) * h
    return total + h * text_hidden


def _kv_shared_flags(config: dict[str, Any], n_layers: int) -> list[bool]:
    shared = int(config.get("num_kv_shared_layers") or 0)
    # `layer_types[:-0]` is empty: with 0 shared layers every layer computes its own K/V
    first_shared = n_layers - shared if shared > 0 else n_layers
    return [i >= first_shared for i in range(n_layers)]


def _per_layer_overrides(config: dict[str, Any], where: str) -> dict[int, dict[str, Any]]:
    raw = config.get("per_layer_config") or {}
    if not isinstance(raw, dict):
        raise VramplanError(f"{where}: field 'per_layer_config' must map layer indices to settings")
    try:
        return {int(k): v for k, v in raw.items() if isinstance(v, dict)}
    except ValueError:
        raise VramplanError(f"{where}: field 'per_layer_config' has a key that is not a layer index") from None


def from_config(config: dict[str, Any], where: str = "config") -> Architecture:
    """Build the Architecture of a Hugging Face config dict (plain or multimodal)."""
    if not isinstance(config, dict):
        raise VramplanError(f"{where}: expected a JSON object (a Hugging Face config.json)")
    text = _text_config(config)
    model_type = str(text.get("model_type", ""))
    h = _need(text, "hidden_size", where)
    n_layers = _need(text, "num_hidden_layers", where)
    vocab = _need(text, "vocab_size", where)
    heads = _need(text, "num_attention_heads", where)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)
    global_head_dim = int(text.get("global_head_dim") or head_dim)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    global_kv_heads = int(text.get("num_global_key_value_heads") or kv_heads) if k_eq_v else kv_heads
    attn_bias = bool(text.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))
    mlp_bias = bool(text.get("mlp_bias", False))
    gated = model_type not in _GELU_FAMILY_UNGATED
    per_layer_dim = int(text.get("hidden_size_per_layer_input") or 0)
    per_layer_vocab = int(text.get("vocab_size_per_layer_input") or vocab) if per_layer_dim else 0
    double_wide = bool(text.get("use_double_wide_mlp", False))
    types = _layer_types(text, n_layers)
    shared = _kv_shared_flags(text, n_layers)
    is_gemma4 = model_type.startswith("gemma4")

    experts = int(text.get("num_experts") or text.get("num_local_experts") or 0)
    top_k = int(text.get("num_experts_per_tok") or text.get("top_k_experts") or 0)
    expert_inter = int(text.get("moe_intermediate_size") or 0)
    shared_expert_inter = int(text.get("shared_expert_intermediate_size") or 0)
    sparse_step = int(text.get("decoder_sparse_step") or 1)
    mlp_only = set(text.get("mlp_only_layers") or [])
    gemma4_moe = is_gemma4 and bool(text.get("enable_moe_block"))

    overrides = _per_layer_overrides(text, where)
    layers = []
    for i in range(n_layers):
        kind = types[i]
        is_full = kind == "full"
        hd = global_head_dim if (is_gemma4 and is_full) else head_dim
        kvh = global_kv_heads if (is_gemma4 and is_full) else kv_heads
        if i in overrides:  # transformers' saved form of Gemma 4's global head dim / kv heads
            hd = int(overrides[i].get("head_dim", hd))
            kvh = int(overrides[i].get("num_key_value_heads", kvh))
        has_kv = not shared[i]
        linears = [Linear("q_proj", h, heads * hd, attn_bias)]
        if has_kv:
            linears.append(Linear("k_proj", h, kvh * hd, attn_bias))
            if not (k_eq_v and is_full):
                linears.append(Linear("v_proj", h, kvh * hd, attn_bias))
        linears.append(Linear("o_proj", heads * hd, h, attn_bias and model_type not in ("qwen2", "qwen2_moe")))

        moe_layer = experts > 0 and not is_gemma4 and i not in mlp_only and (i + 1) % sparse_step == 0
        inter = 0
        expert_params = 0
        if moe_layer:
            # Mixtral / Qwen3-MoE: the experts replace the dense MLP (fused 3-D tensors in transformers 5)
            expert_params = experts * 3 * h * expert_inter + experts * h
            if shared_expert_inter:
                linears += [Linear(n, a, b) for n, a, b in (
                    ("gate_proj", h, shared_expert_inter), ("up_proj", h, shared_expert_inter),
                    ("down_proj", shared_expert_inter, h))]
                expert_params += h  # the shared expert's gate
        else:
            inter = int(text.get("intermediate_size") or 4 * h)
            if double_wide and shared[i]:
                inter *= 2  # Gemma 4: the shared-KV layers spend the saved K/V budget on a wider MLP
            if gated:
                linears += [Linear("gate_proj", h, inter, mlp_bias), Linear("up_proj", h, inter, mlp_bias)]
            else:
                linears.append(Linear("up_proj", h, inter, mlp_bias))
            linears.append(Linear("down_proj", inter, h, mlp_bias))
        if gemma4_moe:
            # Gemma 4 26B-A4B: a routed expert block beside the dense MLP
            expert_params = experts * 3 * h * expert_inter + h * experts + h + experts

        norms = (4 if model_type in _FOUR_NORMS else 2) * h
        qk_norm = model_type in _QK_NORM
        if qk_norm:
            norms += hd * (2 if has_kv else 1)
        if gemma4_moe:
            norms += 3 * h
        if per_layer_dim:
            linears += [Linear("per_layer_input_gate", h, per_layer_dim), Linear("per_layer_projection", per_layer_dim, h)]
            norms += h
        window = text.get("sliding_window") if kind == "sliding" else None
        layers.append(Layer(
            attention=kind, sliding_window=int(window) if window else None, heads=heads, kv_heads=kvh,
            head_dim=hd, has_kv=has_kv, linears=tuple(linears), mlp_intermediate=inter,
            experts=experts if (moe_layer or gemma4_moe) else 0, top_k=top_k if (moe_layer or gemma4_moe) else 0,
            expert_intermediate=expert_inter if (moe_layer or gemma4_moe) else 0, expert_params=expert_params,
            per_layer_input=per_layer_dim, norm_params=norms, qk_norm=qk_norm,
        ))

    extra_linears: tuple[Linear, ...] = ()
    extra_norms = h
    if per_layer_dim:
        extra_linears = (Linear("per_layer_model_projection", h, n_layers * per_layer_dim),)
        extra_norms += per_layer_dim
    towers = {name: _tower_params(config.get(f"{name}_config"), h) for name in ("vision", "audio")}
    softcap = text.get("final_logit_softcapping")
    return Architecture(
        model_type=model_type, hidden_size=h, vocab_size=vocab, layers=tuple(layers),
        tied_embeddings=bool(text.get("tie_word_embeddings", model_type.startswith("gemma"))), gated_mlp=gated,
        final_logit_softcapping=float(softcap) if softcap else None,
        per_layer_vocab=per_layer_vocab, per_layer_dim=per_layer_dim,
        extra_linears=extra_linears, extra_norm_params=extra_norms,
        tower_params={k: v for k, v in towers.items() if v},
        tower_configs={k: dict(config[f"{k}_config"]) for k, v in towers.items() if v},
        image_soft_tokens=int(config.get("vision_soft_tokens_per_image") or (280 if towers.get("vision") else 0)),
    )
