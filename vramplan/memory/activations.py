"""Activations: what autograd keeps between a layer's forward and its backward.

Counted per token (bytes), per layer, from the operations a decoder layer runs: the
normed inputs the projections save, the attention kernel's saved tensors, the MLP's
intermediates. Attention implementations differ in kind, not degree: flash and
memory-efficient SDPA keep O(s) (q, k, v, the output and a log-sum-exp), while the
math/eager path keeps the b·heads·s² probabilities and, while computing them, holds
the scores, the probabilities and a boolean mask at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

from vramplan.train import switches

#: Kernels an attention call can run on; "math" is SDPA's composite fallback, "chunked" vramplan's attention for heads
#: wider than the flash kernels take (vramplan.train.attention): O(s) saved like flash, plus a few score chunks.
KERNELS = ("flash", "efficient", "math", "eager", "chunked", "chunked_fused")

#: The widest head SDPA's flash and cuDNN kernels take: wider ones (Gemma 4's full-attention layers: 512) run its
#: memory-efficient kernels, or vramplan's chunked attention.
FLASH_MAX_HEAD_DIM = 256
#: The chunked attention's budget for one chunk's fp32 scores [batch, heads, queries, keys] (vramplan.train.attention).
CHUNKED_ATTENTION_SCORE_BYTES = 64 * 2**20
#: Score-sized buffers its backward holds at once, in chunks: the fp32 probabilities, their fp32 gradient and its bf16
#: copy (the probabilities' bf16 copy is freed before); the forward holds 1.5. With the fused row passes
#: (``chunked_fused``): the fp32 scores and their fp32 gradient, and the bf16 probabilities and dS the pass writes.
CHUNKED_ATTENTION_PEAK_CHUNKS = 2.5
CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS = 3.0


#: The shortest row, in windows, whose sliding-window layers run the chunked attention over their band instead of SDPA
#: under the band mask. SDPA computes the whole masked square (time ∝ tokens²), the band about two windows of keys per
#: query (∝ tokens · window). On the H100, Gemma-4-E2B's sliding layer (8 heads of 256, window 512, fused rows, chunks
#: aligned) took 0.55 ms forward and backward over the band against SDPA's 0.61 at 2,048 tokens (four windows), 1.12
#: against 2.24 at 4,096, 2.26 against 8.62 at 8,192; E4B's (two K/V heads) 2.17 against 8.62 at 8,192
#: (benchmarks/results/session16/call1/kernels/). The step adds the chunks' host and recompute work: the speed model,
#: within 1.6% of session 15's unaligned band at 2,048 and 4,096 tokens and of session 16's aligned one at 8,192,
#: puts E2B's step with the band even with the measured masked step at four windows (113.5 against 114.5 ms) and
#: ahead from there (E2B 1.12x at six windows with the masked step measured 7% over its price, as at four and eight;
#: 1.19x at eight). Six windows (3,072 tokens on Gemma 4) keeps a margin at the crossing; measured there (session 19,
#: fresh processes, rank 16): E2B's step 1.12x with the band, 18,786 against 16,743 tok/s. Twelve until session 16,
#: when the band's unaligned 1,023-key chunks ran it 1.8x slower.
SLIDING_BAND_MIN_WINDOWS = 6


@contextlib.contextmanager
def band_threshold(windows: int):
    """:data:`SLIDING_BAND_MIN_WINDOWS` at ``windows`` for the duration: a measured line is priced at the threshold it
    ran under, whatever today's is."""
    global SLIDING_BAND_MIN_WINDOWS
    saved, SLIDING_BAND_MIN_WINDOWS = SLIDING_BAND_MIN_WINDOWS, windows
    try:
        yield
    finally:
        SLIDING_BAND_MIN_WINDOWS = saved


def band_pays(window: int, seq: int) -> bool:
    """Whether a row of ``seq`` tokens is long enough for its ``window``'s band to beat SDPA's masked square
    (:data:`SLIDING_BAND_MIN_WINDOWS`): the one rule the trainer's steps and the planner read."""
    return 0 < window and seq >= SLIDING_BAND_MIN_WINDOWS * window


def sliding_window_of(layer, seq: int) -> int:
    """The layer's sliding window where it is shorter than the sequence (its queries then see fewer keys), else 0."""
    window = layer.sliding_window if layer.attention == "sliding" and layer.sliding_window else 0
    return window if window < seq else 0


#: Chunk heights of 256 rows and more are whole multiples of this, shorter ones of 16. A chunk's keys are a multiple
#: of its height, and an odd count leaves the bf16 scores' rows unaligned for cuBLAS: on the H100, Gemma-4-E2B's full
#: layer at 6,144 tokens took 20.0 ms forward and backward in 341-row chunks (the 64 MiB budget's) against 10.6 in
#: 320-row ones (benchmarks/results/session15/call3/chunk_rows.jsonl, eager timings).
CHUNK_ROW_MULTIPLE = 64


def chunk_multiples() -> tuple[int, int]:
    """(chunk height multiple, band first-key multiple): :data:`CHUNK_ROW_MULTIPLE` and :data:`BAND_KEY_MULTIPLE`, or
    (1, 1) with switch ``aligned_attention_chunks`` off, the chunks sessions 13-15 ran (their lines priced as run)."""
    return (CHUNK_ROW_MULTIPLE, BAND_KEY_MULTIPLE) if switches.enabled("aligned_attention_chunks") else (1, 1)


def _aligned_rows(rows: int) -> int:
    """``rows`` down to a whole multiple of :data:`CHUNK_ROW_MULTIPLE` from 256 rows, of 16 below (at least 16)."""
    multiple = chunk_multiples()[0]
    step = multiple if rows >= 256 else min(16, multiple)
    return max(16, rows // step * step)


def chunked_attention_chunk_rows(batch: int, heads: int, seq: int, window: int = 0) -> int:
    """Queries in each chunk of a layer's chunked attention over ``seq`` tokens: as many as keep one chunk's fp32
    scores within :data:`CHUNKED_ATTENTION_SCORE_BYTES`, aligned (:func:`_aligned_rows`), the whole row when it
    fits. Under a sliding ``window`` at most ``window`` queries, which read about 2·window keys at most."""
    if window and window < seq:
        budget_rows = CHUNKED_ATTENTION_SCORE_BYTES // max(1, 4 * batch * heads * min(seq, 2 * window))
        return min(window, _aligned_rows(budget_rows))
    return min(seq, _aligned_rows(CHUNKED_ATTENTION_SCORE_BYTES // max(1, 4 * batch * heads * seq)))


#: A band chunk's first key, rounded down to a whole multiple of this: its keys then run from an aligned first to its
#: last query (a multiple of its aligned height), so the bf16 rows cuBLAS reads are aligned, as the chunk heights are
#: (:data:`CHUNK_ROW_MULTIPLE`); a window of 512 otherwise gives 1,023 keys. The up to seven keys more lie before
#: the window and are masked like any other. On the H100 (session 16, call 1's kernel table): E2B's sliding layer at
#: 8,192 tokens 4.11 -> 2.26 ms forward and backward, E4B's 5.77 -> 2.17.
BAND_KEY_MULTIPLE = 8


def chunked_attention_chunks(queries: int, keys: int, chunk: int, causal: bool = True, window: int = 0):
    """(start, stop, first key, keys end) of each chunk of queries in the chunked attention (vramplan.train.attention
    walks these): a causal chunk reads the keys up to its last query, under a sliding ``window`` only from
    ``window - 1`` keys before its first query (from the multiple of :data:`BAND_KEY_MULTIPLE` at or before that);
    any other chunk reads every key."""
    key_multiple = chunk_multiples()[1]
    for start in range(0, queries, chunk):
        stop = min(queries, start + chunk)
        first = max(0, (start - window + 1) // key_multiple * key_multiple) if causal and window else 0
        yield start, stop, first, (min(keys, stop) if causal else keys)


def chunked_attention_keys_per_query(seq: int, rows: int, window: int = 0) -> float:
    """Mean keys a query's chunk computes under the causal (and ``window``) mask."""
    return sum((stop - start) * (upto - first)
               for start, stop, first, upto in chunked_attention_chunks(seq, seq, rows, True, window)) / seq


def chunked_attention_workspace_bytes(layer, batch: int, seq: int, fused: bool = False, window: int = 0) -> int:
    """The chunked attention's transient buffers at a layer's backward: :data:`CHUNKED_ATTENTION_PEAK_CHUNKS` (or, with
    ``fused`` row passes, :data:`CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS`) score chunks of b·heads·rows·keys fp32 values
    (the chunk that reads the most keys: every key, or over a sliding ``window``'s band about rows + window)."""
    rows = chunked_attention_chunk_rows(batch, layer.heads, seq, window)
    keys = max(upto - first for _, _, first, upto in chunked_attention_chunks(seq, seq, rows, True, window))
    chunks = CHUNKED_FUSED_ATTENTION_PEAK_CHUNKS if fused else CHUNKED_ATTENTION_PEAK_CHUNKS
    return int(chunks * batch * layer.heads * rows * keys * 4)


def attention_saved_bytes_per_token(layer, hidden: int, act_bytes: int, kernel: str, *,
                                    four_norms: bool = False) -> int:
    """Bytes autograd saves per token for a layer's attention half (without its input and without s² scores).

    The normed input (LoRA's A matrices save it), q/k normalisation outputs where the model
    has them (Qwen3, Gemma 3/4); flash/efficient SDPA saves q, k, v and the output, the
    math/eager paths the scaled q and K/V repeated to every query head and the output;
    then the output projection's input, the mid-layer residual, and Gemma's extra norms.
    """
    a = act_bytes
    h, qd, kvd = hidden, layer.q_dim, layer.kv_dim
    total = h * a
    if layer.qk_norm:
        total += (qd + (kvd if layer.has_kv else 0)) * a
    if kernel in ("flash", "efficient", "chunked", "chunked_fused"):
        total += (qd + 2 * kvd + qd) * a + layer.heads * 4
    else:
        total += 4 * qd * a
    total += qd * a + h * a
    if four_norms:
        total += h * a  # Gemma: the post-attention norm saves its input
    return total


def mlp_saved_bytes_per_token(layer, hidden: int, act_bytes: int, *, fused_glu: bool = False,
                              four_norms: bool = False) -> int:
    """Bytes autograd saves per token for a layer's MLP half.

    The normed input; a gated MLP saves gate, up, the activation and their product (a fused
    GLU kernel recomputes the activation: three), an ungated one the up projection and the
    activation; MoE layers each token's top-k expert inputs and intermediates plus router
    logits; Gemma 4's per-layer input path (gate, activation, product, projection, norm).
    """
    a, h = act_bytes, hidden
    total = h * a + gated_mlp_intermediate_bytes_per_token(layer, a, fused_glu=fused_glu)
    if four_norms:
        total += h * a  # the post-feedforward norm's input
    if layer.experts:
        total += layer.top_k * (h + 4 * layer.expert_intermediate) * a + layer.experts * 4
    if layer.per_layer_input:
        total += (3 * layer.per_layer_input + 2 * h) * a
    return total


def gated_mlp_intermediate_bytes_per_token(layer, act_bytes: int, *, fused_glu: bool = False) -> int:
    """What a dense gated MLP saves per token between its projections: gate, up, the activation and
    their product (a fused GLU kernel recomputes the activation: three). A tiled MLP holds these for
    one tile at a time (``ActivationRecipe.mlp_tiles``)."""
    return (3 if fused_glu else 4) * layer.mlp_intermediate * act_bytes


def mlp_backward_transient_bytes_per_token(layer, act_bytes: int, *, inplace_glu_backward: bool = False) -> int:
    """Gradients of the MLP intermediates alive at once during its backward.

    Autograd's GLU makes d(gate) and d(up) as new tensors: two of width I beside the saved
    ones. A fused GLU whose backward writes d(gate) and d(up) over the saved gate and up
    (kernels/glu.py, ``inplace_backward``) adds only the gradient of its output, the one
    down_proj's backward hands it: one of width I.
    """
    width = max(layer.mlp_intermediate, layer.top_k * layer.expert_intermediate)
    return (1 if inplace_glu_backward else 2) * width * act_bytes


def attention_scores_bytes(layer, batch: int, seq: int, score_bytes: int) -> int:
    """One copy of the attention probabilities, b·heads·s·s: only the math/eager paths build it.

    A sliding window does not shrink it there: the mask hides entries, the matrix is full size.
    """
    return batch * layer.heads * seq * seq * score_bytes


#: While computing softmax, SDPA's math path holds the scores, the probabilities, a boolean
#: mask (¼ of a copy) and the masked probabilities it returns: 3.25 copies at once; the
#: backward holds the probabilities, their gradient and the scores' gradient: 3.
MATH_ATTENTION_PEAK_COPIES = 3.25


def checkpoint_bytes(num_layers: int, tokens: int, hidden: int, act_bytes: int) -> int:
    """Gradient checkpointing keeps each decoder layer's input, b·s·h per layer, and recomputes the rest."""
    return num_layers * tokens * hidden * act_bytes


def per_layer_input_bytes(arch, tokens: int, act_bytes: int, copies: int) -> int:
    """Gemma 4's per-layer inputs: the looked-up rows b·s·layers·d_pl (and the copies the model derives from them).

    The rows are gathered from the per-layer embedding table, a projection of the token
    embedding of the same shape is added, and the sum is normed: ``copies`` of them live
    through the step.
    """
    return copies * tokens * arch.num_layers * arch.per_layer_dim * act_bytes


def captured_prologue_bytes(arch, tokens: int, act_bytes: int) -> int:
    """The most a replayed step's eager prologue holds at once (vramplan.train.graphs.StepGraphs.prologue): the token
    embeddings, then Gemma 4's per-layer rows beside them, each lookup with its scaled copy where the model scales
    (:attr:`Architecture.scales_embeddings`). It runs in the allocator's regular pool every step; freed, its blocks
    stay cached there, where the graph's private pool never reuses them."""
    copies = 2 if arch.scales_embeddings else 1
    embeds = tokens * arch.hidden_size * act_bytes
    per_layer = tokens * arch.num_layers * arch.per_layer_dim * act_bytes
    return max(copies * embeds, embeds + copies * per_layer)


def shared_kv_bytes(arch, tokens: int, act_bytes: int) -> int:
    """Gemma 4's shared K/V: the last non-shared layer of each attention type keeps K and V
    for the whole sequence alive until the shared layers have read them."""
    if all(layer.has_kv for layer in arch.layers):
        return 0
    producers: dict[str, object] = {}
    for layer in arch.layers:
        if layer.has_kv:
            producers[layer.attention] = layer
    return sum(2 * tokens * layer.kv_dim * act_bytes for layer in producers.values())


@dataclass(frozen=True)
class ActivationRecipe:
    """How a trainer runs a decoder layer: what decides the bytes its activations take."""

    act_bytes: int  # dtype of the residual stream and most activations
    kernel: Callable[[Any], str]  # the attention kernel a layer runs on (see KERNELS)
    fused_glu: bool = False
    inplace_glu_backward: bool = False  # the fused GLU's backward overwrites the saved gate and up
    lora_input_copy_bytes: int = 0  # >0: each LoRA layer saves its own copy of its input in this dtype
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_inner_bytes: int = 4  # dtype of the r-wide product x·A that B saves
    four_norms: bool = False
    mlp_tiles: int = 1  # >1: the dense gated MLP runs over the tokens in tiles (kernels/glu.py TiledMLPFunction)
    band_window: Callable[[Any], int] = lambda layer: 0  # the sliding window a layer's chunked attention bands, or 0


def activation_bytes(arch, batch: int, seq: int, checkpointing: str, recipe: ActivationRecipe,
                     layers_kept: int | None = None) -> tuple[int, int]:
    """(persistent, working set): the activation bytes held through the backward, and the most
    one layer adds on top at any moment of its forward (or recompute) and backward.

    With checkpointing only each layer's input persists (``layers_kept`` of them on the GPU
    when checkpoints are offloaded) and the working set is one layer recomputed: its attention
    half at the softmax (saved tensors + the scores' peak copies), or the whole layer's saved
    tensors plus the MLP's gradient buffers, whichever is larger. Without checkpointing every
    layer's saved tensors persist and the working set is only the transients.
    """
    tokens = batch * seq
    h, a = arch.hidden_size, recipe.act_bytes
    targets = set(recipe.lora_targets)
    persistent_layers, peaks = 0, []
    for layer in arch.layers:
        kernel = recipe.kernel(layer)
        lora_attn = lora_mlp = 0
        for lin in layer.linears:
            if lin.name in targets:
                copy = recipe.lora_input_copy_bytes * lin.d_in + recipe.lora_inner_bytes * recipe.lora_rank
                if lin.name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    lora_attn += copy
                else:
                    lora_mlp += copy
        attn = tokens * (attention_saved_bytes_per_token(layer, h, a, kernel, four_norms=recipe.four_norms) + lora_attn)
        mlp = tokens * (mlp_saved_bytes_per_token(layer, h, a, fused_glu=recipe.fused_glu,
                                                  four_norms=recipe.four_norms) + lora_mlp)
        scores = attention_scores_bytes(layer, batch, seq, a) if kernel in ("math", "eager") else 0
        workspace = chunked_attention_workspace_bytes(layer, batch, seq, fused=kernel == "chunked_fused",
                                                      window=recipe.band_window(layer)) \
            if kernel.startswith("chunked") else 0
        mlp_grads = tokens * mlp_backward_transient_bytes_per_token(layer, a, inplace_glu_backward=recipe.inplace_glu_backward)
        if recipe.mlp_tiles > 1 and layer.mlp_intermediate and not layer.experts:
            # only the MLP's input (saved whole, the same tensor the norm output is) outlives a tile
            tiled = tokens * (gated_mlp_intermediate_bytes_per_token(layer, a, fused_glu=recipe.fused_glu) + lora_mlp)
            tile_tokens = -(-tokens // recipe.mlp_tiles)
            mlp += tile_tokens * tiled // tokens - tiled
            mlp_grads = tile_tokens * mlp_grads // tokens
        persistent_layers += attn + mlp + scores
        if checkpointing == "none":
            peaks.append(max(int(scores * (MATH_ATTENTION_PEAK_COPIES - 1)), mlp_grads, workspace))
        else:
            peaks.append(max(attn + int(scores * MATH_ATTENTION_PEAK_COPIES) + workspace, attn + scores + mlp + mlp_grads))
    grad_flow = 2 * tokens * h * a  # the gradient arriving at a layer's output and the one leaving its input
    if checkpointing == "none":
        persistent = persistent_layers + checkpoint_bytes(arch.num_layers, tokens, h, a)
    else:
        kept = arch.num_layers if layers_kept is None else min(layers_kept, arch.num_layers)
        persistent = checkpoint_bytes(kept, tokens, h, a)
    return persistent, grad_flow + max(peaks)


def model_level_activations(arch, tokens: int, act_bytes: int, per_layer_copies: int) -> dict[str, int]:
    """Activations that belong to the model rather than to a layer, as components (absent when zero)."""
    parts = {
        "per_layer_inputs": per_layer_input_bytes(arch, tokens, act_bytes, per_layer_copies),
        "shared_kv": shared_kv_bytes(arch, tokens, act_bytes),
    }
    return {name: n for name, n in parts.items() if n}
