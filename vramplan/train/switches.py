"""Turning single speed-ups on or off, for side-by-side benchmarks:
``VRAMPLAN_DISABLE=rope,cuda_graphs`` and ``VRAMPLAN_ENABLE=flat_optimizer,fused_optimizer``.

A change that is faster in a launch count can still be slower, or cost memory, on a GPU;
measuring it means running the same trainer with and without it in one session. Nothing here
changes results: each switch selects between two implementations that the tests hold equal.
"""

from __future__ import annotations

import contextlib
import os

DISABLE_ENV = "VRAMPLAN_DISABLE"
ENABLE_ENV = "VRAMPLAN_ENABLE"
#: Each switch and whether it is on unless the environment says otherwise. The flat optimizer
#: step is a plan choice (``Plan.flat_optimizer``, which fit makes where memory allows); the
#: switch forces it on for every plan, as the benchmarks did before the plan could say it.
#: CUDA graphs are on (where the plan asks for them, ``Plan.captures_steps``): on the H100 they made
#: Llama-3.2-1B 2.4x and Gemma-4-E2B 2.0x faster at 2,048 tokens, for about 0.1 GB.
#: The fused optimizer (``VRAMPLAN_ENABLE=fused_optimizer``: one Triton launch, no host sync, instead
#: of bitsandbytes for 8-bit AdamW plans on one process; under FSDP2, where bitsandbytes takes no
#: shards, the same kernel on each rank's shards instead of torch AdamW, which the planner then prices
#: and fit may choose) stays off: on the H100 it made Llama-3.2-1B 1.16x faster but used 0.07 GB more
#: (22 MB of states in the pool, and the freed per-adapter storage stays reserved; made in one buffer
#: before the layers since, it still read 1.78 GB on the H200 in session 8), and memory is what a plan
#: promises.
#: An int8 LM head's loss walks the vocabulary outside and the tokens inside (``int8_vocab_major``):
#: the head dequantized once per micro-batch instead of twice per chunk of tokens. Timed in session 8:
#: 5.1 ms against the token-major pass's 13.9 (H100, Llama-3.2-1B's 2,048 tokens), and the int8-head
#: trainer at 38,197 tok/s beside the bf16 head's 38,784; ``VRAMPLAN_DISABLE=int8_vocab_major`` for the A/B.
#: The optimizer step overlapped (``overlap_optimizer``): the trainer reads the loss and the gradient norm
#: after queueing the step, not before, so the host's per-tensor step runs while the GPU still computes
#: the backward; a non-finite loss or norm still stops the run before anything is saved.
#: ``queued_optimizer`` goes further: bitsandbytes' step without its last sync and the gradients zeroed in one
#: foreach launch, so the host queues the whole step before its one wait. Timed in session 11 (H100, rounds
#: alternating in one process, benchmarks/results/session11/queued-ab.jsonl): Llama-3.2-1B at 1,024 tokens
#: 28.9 ms against the overlapped step's 29.7 (1.03x), Qwen3-0.6B at 2,048 41.1 against 43.3 (1.05x);
#: ``VRAMPLAN_DISABLE=queued_optimizer`` for the A/B.
#: ``prefetch_paged``: bitsandbytes' paged states prefetched to the GPU before every step (its own behaviour), or on
#: their first step only (off, the default; ``train.optim._OneSyncPerStep``). Session 12's A/B on the H100
#: (Llama-3.2-1B, rank 64: 192 paged tensors, 2,048 tokens, CUDA graphs, fresh processes alternating,
#: benchmarks/results/session12/ab-rope-prefetch.jsonl): 60.6 ms a step with them, 45.7 without (1.33x), the same
#: memory and losses; each ``cudaMemPrefetchAsync`` held the stream ~39 µs though the pages were resident.
#: Gemma 4's RoPE through the Triton kernel (``rope_gemma4``, on): session 5 kept transformers' RoPE on an eager
#: A/B, where host work decided (4,820 tok/s patched, 5,254 not); under CUDA graphs only the kernels' time counts,
#: and transformers' RoPE runs ~5 kernels a call where the Triton one runs one. Session 12's A/B (same file):
#: Gemma-4-E2B at 2,048 tokens 173.6 -> 165.9 ms (1.05x), E4B at 1,024 137.2 -> 130.1 (1.05x), 4 MB less.
#: Heads wider than 256 (Gemma 4's full-attention layers) through chunked cuBLAS attention (``wide_head_attention``,
#: vramplan.train.attention) instead of SDPA's memory-efficient kernels, whose backward took 6.6 ms a call at 2,048
#: tokens on the H100 (46 ms of Gemma-4-E2B's 160 ms step, session 13's graph profile); 1.26x on E2B's step there.
#: ``wide_head_fused_rows``: its causal chunks' scale, mask, softmax and dS in one Triton pass each way
#: (vramplan_kernels.attention_rows) instead of six to eight PyTorch passes. Session 14's H100 A/B in fresh processes
#: (benchmarks/results/session14/call1/trainer.jsonl): Gemma-4-E2B at 2,048 tokens 124.9 -> 114.5 ms a step (1.09x),
#: the same process memory; the attention alone (kernel_cases/wide_attention.py) 1.70 -> 0.78 ms a layer.
#: ``sliding_band_attention``: sliding-window layers (Gemma 2/3/4's local layers) whose window is shorter than the row,
#: in unpadded, unpacked rows, through the same chunked attention over the window's band (each chunk of queries reads the
#: keys from ``window - 1`` before its first query to its last), where SDPA gets an explicit mask and computes the
#: whole square, at rows of at least ``memory.activations.SLIDING_BAND_MIN_WINDOWS`` windows, where it pays. Session
#: 15's H100 A/B in fresh processes (benchmarks/results/session15/call1/trainer.jsonl): Gemma-4-E2B at 8,192 tokens
#: 674.3 -> 516.5 ms a step (1.31x), 0.15 GB less reserved; at 2,048 tokens (four windows) it cost 13 ms. With its
#: chunks aligned (below), 674.3 -> 443.6 ms (1.52x).
#: ``aligned_attention_chunks``: the chunked attention's chunk heights in whole multiples of 64 rows and a band's first
#: key on a multiple of 8 (``memory.activations.chunk_multiples``), so cuBLAS reads the bf16 scores in aligned rows; off,
#: heights straight off the score budget and a band from ``window - 1`` keys back, as sessions 13-15 ran them. Session
#: 16's H100 A/B in fresh processes (benchmarks/results/session16/call1/trainer.jsonl): Gemma-4-E2B at 6,144 tokens
#: 439.4 -> 324.7 ms a step (1.35x: 341-row chunks became 320), at 8,192 514.8 -> 443.6 (1.16x: the band's 1,023 keys
#: became 1,024), E4B at 8,192 851.8 -> 683.6 (1.25x); the same memory.
#: ``expandable_segments``: `vramplan train` and `vramplan calibrate` ask torch's allocator for expandable segments
#: (``train.allocator``) unless the user configured it; every trainer line since session 9 ran with them. Off, the
#: allocator caches separately allocated segments: sessions 2-3's eager runs (the accuracy matrix) held 0.11-0.34 GB
#: beyond their allocations, where today's hold 0.01-0.35 in step with their small-pool gradients.
SWITCHES = {"rope": True, "flat_optimizer": False, "cuda_graphs": True, "fused_optimizer": False,
            "int8_vocab_major": True, "overlap_optimizer": True, "queued_optimizer": True, "rope_gemma4": True,
            "prefetch_paged": False, "wide_head_attention": True, "wide_head_fused_rows": True,
            "sliding_band_attention": True, "aligned_attention_chunks": True, "expandable_segments": True}


def _listed(env: str) -> set[str]:
    return {part.strip() for part in os.environ.get(env, "").split(",") if part.strip()}


#: Switches whose A/B ended for good: the trainer always runs the state given here and the environment no longer turns
#: them, but a benchmark still prices a line measured the other way as it ran (:func:`forced`).
#: ``compact_captures``: under CUDA graphs, the gradients made as one buffer before a shape's first, eager, pass and that
#: pass's adapter copies dropped before the capture, so the pages the pass mapped go back before the graph's pool grows
#: (``train.graphs``). Through session 20 that pass's backward made the gradients among its activations. Session 21's A/B
#: (H100, Qwen3-1.7B at rank 128 without checkpointing, benchmarks/results/session21/call3/compact.jsonl): 7.17 GB
#: reserved for 5.20 GB allocated before, 5.35 after, at the same speed (28,114 and 28,107 tok/s). Retired in session 26:
#: the old path cost up to 2 GB and bought nothing, and the planner priced it 10% low.
RETIRED = {"compact_captures": True}
_forced_retired: dict[str, bool] = {}


def enabled(name: str) -> bool:
    """The switch's default, unless ``$VRAMPLAN_DISABLE`` or ``$VRAMPLAN_ENABLE`` lists it (a retired switch: its
    state, unless a benchmark has :func:`forced` it)."""
    if name in RETIRED:
        return _forced_retired.get(name, RETIRED[name])
    default = SWITCHES[name]
    if name in _listed(DISABLE_ENV):
        return False
    return default or name in _listed(ENABLE_ENV)


@contextlib.contextmanager
def forced(**states: bool):
    """The named switches on (True) or off (False) for the duration, whatever the environment says:
    a benchmark prices a measured run under the switches it ran with, not today's defaults."""
    unknown = set(states) - set(SWITCHES) - set(RETIRED)
    if unknown:
        raise KeyError(f"unknown switch {', '.join(sorted(unknown))}; known: {', '.join([*SWITCHES, *RETIRED])}")
    saved = {env: os.environ.get(env) for env in (ENABLE_ENV, DISABLE_ENV)}
    saved_retired = dict(_forced_retired)
    _forced_retired.update({name: on for name, on in states.items() if name in RETIRED})
    enable, disable = _listed(ENABLE_ENV), _listed(DISABLE_ENV)
    for name, on in ((name, on) for name, on in states.items() if name not in RETIRED):
        (enable if on else disable).add(name)
        (disable if on else enable).discard(name)
    os.environ[ENABLE_ENV], os.environ[DISABLE_ENV] = ",".join(sorted(enable)), ",".join(sorted(disable))
    try:
        yield
    finally:
        _forced_retired.clear()
        _forced_retired.update(saved_retired)
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def gemma4_rope_fused(captured: bool) -> bool:
    """Whether the trainer runs Gemma 4's RoPE through the Triton kernel: on steps it replays as CUDA graphs, unless
    ``rope_gemma4`` (or ``rope``) is switched off; eager, its per-call host work loses to transformers' RoPE."""
    return captured and enabled("rope") and enabled("rope_gemma4")
