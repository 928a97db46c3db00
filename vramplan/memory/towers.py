"""The vision and audio towers of a multimodal model: weights, adapters, activations, soft tokens.

A text-only plan never builds the towers (the trainer loads the text model alone), so every
function here returns 0 unless the plan's modalities reach the tower. What a tower costs:

- its weights, frozen in bf16 (not quantized: NF4 on the towers is not measured safe yet);
- LoRA on its linears when the plan trains it (``train_parts``), and the projector into the
  text width when ``train_projectors``;
- its activations per image / per second of audio: a frozen tower saves nothing for the
  backward (no input or weight of it needs a gradient), so only one layer's forward working
  set exists at a time; a trained tower keeps every layer's saved tensors (or, checkpointed,
  each layer's input);
- the soft tokens each image or clip adds to the decoder's sequence.

Gemma 4's numbers come from its processor (transformers ``processing_gemma4.py``): an image
becomes ``max_soft_tokens`` (280 by default) soft tokens between a begin and an end token, made
by pooling 3×3 patches of 16 px, so the vision tower sees 9 × 280 = 2,520 patches; audio is
framed every 10 ms and subsampled 4× by two stride-2 convolutions: one soft token per 40 ms,
at most 750 (30 s) per clip, also between a begin and an end token.
"""

from __future__ import annotations

import math

from vramplan.plan import EXPERT_TARGETS

#: Which tower reads which modality.
TOWER_OF = {"image": "vision", "audio": "audio"}
AUDIO_MS_PER_TOKEN = 40
AUDIO_MAX_TOKENS_PER_CLIP = 750
AUDIO_MEL_FRAMES_PER_S = 100
BOUNDARY_TOKENS = 2  # <boi>…<eoi>, <boa>…<eoa>

#: LoRA targets per tower and kind, as module names (the towers' linears sit inside
#: Gemma4ClippableLinear wrappers: the adapted module is ``<name>.linear``).
TOWER_TARGETS = {
    "vision": {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")},
    "audio": {"attention": ("q_proj", "k_proj", "v_proj", "post"), "mlp": ("ffw_layer_1", "ffw_layer_2")},
}
_TEXT_KINDS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
#: ``--targets experts``: the routed experts' fused matrices (no tower has them)
_EXPERT_WORD = {"experts": EXPERT_TARGETS}


def lora_targets_from(spec: str) -> tuple[str, ...]:
    """``--targets attention,mlp`` (Unsloth's words) or module names, as the plan's ``lora_targets``."""
    names: list[str] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        names += list({**_TEXT_KINDS, **_EXPERT_WORD}.get(word, (word,)))
    return tuple(dict.fromkeys(names))


def target_kinds(lora_targets) -> tuple[str, ...]:
    """Which kinds (attention / mlp) the plan's text LoRA targets name: the towers get the same kinds."""
    wanted = set(lora_targets)
    return tuple(kind for kind, names in _TEXT_KINDS.items() if wanted & set(names))


def towers_in_use(arch, plan) -> tuple[str, ...]:
    return tuple(TOWER_OF[m] for m in plan.modalities if m in TOWER_OF and TOWER_OF[m] in arch.tower_params)


def image_soft_tokens(arch) -> int:
    """Decoder tokens one image takes: its soft tokens and the two around them."""
    return arch.image_soft_tokens + BOUNDARY_TOKENS if arch.image_soft_tokens else 0


def audio_soft_tokens(seconds: float) -> int:
    """Decoder tokens of ``seconds`` of audio: one per 40 ms, in clips of at most 30 s, each between two."""
    if seconds <= 0:
        return 0
    tokens = math.ceil(seconds * 1000 / AUDIO_MS_PER_TOKEN)
    clips = math.ceil(tokens / AUDIO_MAX_TOKENS_PER_CLIP)
    return tokens + BOUNDARY_TOKENS * clips


def soft_tokens(arch, plan) -> int:
    """Tokens the images and audio of one example add to the sequence."""
    used = towers_in_use(arch, plan)
    images = plan.images_per_example * image_soft_tokens(arch) if "vision" in used else 0
    audio = audio_soft_tokens(plan.audio_seconds_per_example) if "audio" in used else 0
    return images + audio


def decoder_seq_len(arch, plan) -> int:
    """The sequence the decoder runs on: the plan's text tokens plus every image's and clip's soft tokens."""
    return plan.seq_len + soft_tokens(arch, plan)


def _vision_shape(config: dict) -> tuple[int, int, int, int]:
    h = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    q = heads * int(config.get("head_dim") or h // heads)
    inter = int(config.get("intermediate_size") or 4 * h)
    return h, q, inter, int(config.get("num_hidden_layers") or 0)


def vision_patches_per_image(arch) -> int:
    pool = int(arch.tower_configs.get("vision", {}).get("pooling_kernel_size") or 1)
    return arch.image_soft_tokens * pool * pool


def audio_frames(seconds: float) -> int:
    """Frames the audio conformer runs on (after the 4× subsampling): one per soft token."""
    return math.ceil(seconds * 1000 / AUDIO_MS_PER_TOKEN) if seconds > 0 else 0


def tower_linears(arch, tower: str) -> list[tuple[str, str, int, int]]:
    """(kind, name, d_in, d_out) of every LoRA-targetable linear of one tower layer."""
    config = arch.tower_configs.get(tower, {})
    if tower == "vision":
        h, q, inter, _ = _vision_shape(config)
        return [("attention", "q_proj", h, q), ("attention", "k_proj", h, q), ("attention", "v_proj", h, q),
                ("attention", "o_proj", q, h), ("mlp", "gate_proj", h, inter), ("mlp", "up_proj", h, inter),
                ("mlp", "down_proj", inter, h)]
    h = int(config.get("hidden_size") or 0)
    # two macaron feed-forwards (h -> 4h -> h) per conformer layer
    return [("attention", n, h, h) for n in ("q_proj", "k_proj", "v_proj", "post")] + \
        [("mlp", "ffw_layer_1", h, 4 * h), ("mlp", "ffw_layer_2", 4 * h, h)] * 2


def tower_lora_params(arch, plan) -> int:
    """r·(d_in + d_out) per adapted linear of each tower the plan trains."""
    kinds = set(target_kinds(plan.lora_targets))
    total = 0
    for tower in towers_in_use(arch, plan):
        if tower not in plan.train_parts:
            continue
        layers = int(arch.tower_configs[tower].get("num_hidden_layers") or 0)
        per_layer = sum(plan.lora_rank * (a + b) for kind, _, a, b in tower_linears(arch, tower) if kind in kinds)
        total += layers * per_layer
    return total


def projector_params(arch, plan) -> int:
    """The multimodal embedders (tower width -> text width, plus a norm), trained in full when asked."""
    if not plan.train_projectors:
        return 0
    total = 0
    for tower in towers_in_use(arch, plan):
        config = arch.tower_configs[tower]
        width = int(config.get("output_proj_dims") or config.get("hidden_size") or 0) if tower == "audio" \
            else int(config.get("hidden_size") or 0)
        total += width * arch.hidden_size + width
    return total


def tower_weight_params(arch, plan) -> int:
    return sum(arch.tower_params[t] for t in towers_in_use(arch, plan))


def vision_saved_bytes_per_patch(config: dict, act_bytes: int) -> int:
    """What one vision encoder layer saves per patch for its backward (SDPA attention, gated MLP).

    Input norm, q/k/v, their norms and rotary outputs, the attention output and the output
    projection's input, the residual, the post-attention and MLP norms, and the gated MLP's gate,
    up, activation and product (the tower is not kernel-patched: four intermediates of width I).
    """
    h, q, inter, _ = _vision_shape(config)
    return (6 * h + 9 * q + 4 * inter) * act_bytes


def audio_saved_bytes_per_frame(config: dict, act_bytes: int) -> int:
    """What one conformer layer saves per frame: two macaron feed-forwards (norm, 4h up, activation,
    4h down input, clipping), attention computed in fp32 with K/V gathered into overlapping
    context blocks (chunk 12, context 24: twice the frames) and heads × context logits, probabilities
    and mask, and the light conv module (2h gated input, h conv, norms)."""
    h = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    chunk = int(config.get("attention_chunk_size") or 12)
    context = chunk + int(config.get("attention_context_left") or 13) - 1 + int(config.get("attention_context_right") or 0)
    ffw = 2 * (3 * h + 3 * 4 * h) * act_bytes
    attention = (2 * h) * act_bytes + (h + 2 * 2 * h) * 4 + 3 * heads * context * 4
    conv = (2 * h + 3 * h + 2 * h) * act_bytes
    return ffw + attention + conv + 2 * h * act_bytes


def tower_activation_bytes(arch, plan, act_bytes: int = 2) -> tuple[int, int]:
    """(persistent, working set) of the towers' activations for one micro-batch.

    Frozen tower: nothing persists; the working set is one layer's forward intermediates over all
    the micro-batch's patches (or frames). Trained tower (LoRA in it): every layer's saved tensors
    persist, or with checkpointing each layer's input, and one layer is rebuilt in the backward.
    The inputs (pixel patches in fp32, mel frames) and the projected soft tokens count as persistent.
    """
    persistent = working = 0
    b = plan.micro_batch
    for tower in towers_in_use(arch, plan):
        config = arch.tower_configs[tower]
        layers = int(config.get("num_hidden_layers") or 0)
        h = int(config.get("hidden_size") or 0)
        if tower == "vision":
            units = b * plan.images_per_example * vision_patches_per_image(arch)
            per_unit = vision_saved_bytes_per_patch(config, act_bytes)
            patch = int(config.get("patch_size") or 16)
            inputs = units * (3 * patch * patch * 4 + 2 * 8)  # fp32 pixels and 2-D positions
        else:
            units = b * audio_frames(plan.audio_seconds_per_example)
            per_unit = audio_saved_bytes_per_frame(config, act_bytes)
            channels = config.get("subsampling_conv_channels") or [128, 32]
            # 128 mel bins at 100 frames/s in fp32, the first conv's output at 50 frames/s x 64 bins
            inputs = b * math.ceil(plan.audio_seconds_per_example * AUDIO_MEL_FRAMES_PER_S) * 128 * 4 \
                + units * 2 * int(channels[0]) * 64 * act_bytes
        if not units:
            continue
        trained = tower in plan.train_parts or plan.train_projectors
        layer = units * per_unit
        if tower in plan.train_parts:
            # transformers checkpoints the vision encoder's layers (GradientCheckpointingLayer) but not the
            # audio conformer's (plain nn.Module): a trained audio tower keeps every layer's tensors
            if plan.checkpointing == "none" or tower == "audio":
                persistent += layers * layer
                working = max(working, 2 * units * h * act_bytes)
            else:
                persistent += layers * units * h * act_bytes
                working = max(working, layer + 2 * units * h * act_bytes)
        else:
            working = max(working, layer)
        persistent += inputs + (units * arch.hidden_size * act_bytes if trained else 0)
    return persistent, working
