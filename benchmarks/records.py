"""The measurement line shared by benchmarks/trainer.py, the hf reference harness and the tables
built from their output (``seq``, ``batch``, ``rank``, ``gc``, optional ``quant``, ``optim``,
``checkpointing``, ``lora_dtype``, ``head_quant``, ``loss_chunk_mb``), read back as the Plan it measured.
Lines without ``loss_chunk_mb`` ran the 256 MB logits chunks of the kernel before it was halved;
``cuda_graphs`` is the number of graphs a line's run captured (absent or 0: its steps ran eagerly,
as every line did before graphs were on by default); ``enabled`` naming ``flat_optimizer`` (or a
grid's ``flat_optimizer``) means the adapters were stepped as one flat tensor."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from vramplan.memory import activations
from vramplan.memory.optimizer import MANAGED_CHUNK_BYTES
from vramplan.plan import Plan
from vramplan.train import switches
from vramplan.train.allocator import EXPANDABLE

_RESULTS = Path(__file__).resolve().parent / "results"
#: Session 9's held-out campaign of vramplan's trainer as it ships (CUDA graphs with causal captures, default
#: settings): 16 configurations over 8 models in fresh processes, measured after the speed model's and the
#: planner's constants were set. benchmarks/throughput.py and benchmarks/accuracy.py report it apart.
CAMPAIGN = tuple(_RESULTS / "session9" / f"trainer-campaign{i}.jsonl" for i in (1, 2))
#: Session 10's runs of the trainer as it then shipped (train_step: the optimizer's step queued before the loss
#: is read), measured after the speed model priced that overlap; held out like CAMPAIGN, reported apart.
OVERLAPPED = (_RESULTS / "session10" / "trainer-overlapped.jsonl",)
#: Session 11: the configurations of the accuracy matrix's vramplan half that sessions 1-3 measured on their
#: eager trainer and no later campaign repeated (13: ranks 8-128, bf16, 8-bit AdamW unpaged, batch 2, no and
#: offloaded checkpointing), re-measured on the trainer as it then shipped (graphs, overlapped step), in fresh
#: processes, after the speed model's attention occupancy was committed; held out like CAMPAIGN.
REMEASURED = tuple(_RESULTS / "session11" / f"matrix-{name}.jsonl" for name in ("llama", "qwen4b-e2b"))
#: Session 11's short rows (Gemma-4-E2B at 512 and 1,024 tokens, E4B and Qwen3-0.6B at 1,024) on the trainer
#: with its step queued whole, after the planner counted the graphs' adapter copies; held out the same way.
SHORT_ROWS = (_RESULTS / "session11" / "trainer-short-rows.jsonl",)
#: Session 11's eager runs of that trainer (``VRAMPLAN_DISABLE=cuda_graphs``; offloaded checkpoints are never
#: captured): Llama-3.2-1B at 2,048 tokens with full and offloaded checkpointing, Qwen3-0.6B at 2,048.
EAGER = (_RESULTS / "session11" / "trainer-eager.jsonl",)
#: Session 12's runs of the trainer as it ships: a rank sweep at 2,048 tokens under CUDA graphs (Llama-3.2-1B and
#: Qwen3-4B at ranks 8-256, Gemma-4-E2B at 32 and 128) and eager runs (Llama-3.2-1B's ranks and shapes, Qwen3-4B,
#: Gemma-4-E2B, offloaded checkpoints at 8,192 tokens). The ``*-fit`` files fitted the planner's allowances beyond
#: the allocated peak (benchmarks/allocator_slack.py); the ``*-held-out`` ones fitted nothing. The speed model
#: fitted none of them.
SESSION12_FIT = tuple(_RESULTS / "session12" / f"{name}-fit.jsonl" for name in ("rank-sweep", "eager"))
SESSION12_HELD_OUT = tuple(_RESULTS / "session12" / f"{name}-held-out.jsonl" for name in ("rank-sweep", "eager"))
#: Session 12's A/Bs (CUDA graphs, fresh processes alternating): Gemma 4's RoPE unfused or through the Triton kernel
#: (Gemma-4-E2B at 2,048 tokens, E4B at 1,024), paged states prefetched every step or once (Llama-3.2-1B, rank 64).
SESSION12_AB = (_RESULTS / "session12" / "ab-rope-prefetch.jsonl",)
#: Session 13's campaign of the trainer as it ships after session 12 (paged states prefetched once, Gemma 4's Triton
#: RoPE on captured steps): Llama-3.2-1B at rank 64 and 1,024 tokens and rank 16 at 4,096, Qwen3-4B at rank 32 and
#: 4,096, Gemma-4-E2B at rank 32 and 1,024 and rank 16 at 4,096, E4B and Qwen3-0.6B at 2,048; CUDA graphs, fresh
#: processes, priced by the commit that ran them (session13/call1.sh) and fitted by nothing.
SESSION13 = (_RESULTS / "session13" / "trainer-campaign13.jsonl",)
#: Session 13's A/B of Gemma 4's wide heads through chunked attention (switch ``wide_head_attention``): Gemma-4-E2B
#: at 2,048 tokens off, on, off, on in fresh processes, then on at E2B 4,096 and E4B 2,048 (the campaign ran both off).
SESSION13_AB = (_RESULTS / "session13" / "ab-wide-heads.jsonl",)
#: Session 14's A/B of the chunked attention's row passes fused in Triton (switch ``wide_head_fused_rows``): Gemma-4-E2B
#: at 2,048 tokens PyTorch rows, fused, PyTorch rows, fused, in fresh processes.
SESSION14_AB = (_RESULTS / "session14" / "call1" / "trainer.jsonl",)
#: Session 14's campaign with the fused rows on: Gemma-4-E2B at 1,024 (rank 32), 4,096 and 8,192 tokens, E4B at 2,048
#: and 4,096, fresh processes, CUDA graphs.
SESSION14 = (_RESULTS / "session14" / "call2" / "trainer.jsonl",)
#: Session 15's A/B of sliding-window layers over their band (switch ``sliding_band_attention``): Gemma-4-E2B at 8,192
#: tokens masked, band, masked, band in fresh processes (call1/trainer.jsonl's 8,192-token lines; its shorter runs took
#: the band below today's threshold, SLIDING_BAND_MIN_WINDOWS, so no shipped configuration ran them).
SESSION15_AB = (_RESULTS / "session15" / "ab-band-8192.jsonl",)
#: Session 15's runs of the band's shipped threshold (call2/trainer.jsonl's lines at SLIDING_BAND_MIN_WINDOWS 12):
#: Gemma-4-E2B at 4,096 tokens (masked), at 6,144 masked and banded, E4B at 8,192 masked and banded; fresh processes.
SESSION15 = (_RESULTS / "session15" / "held-out.jsonl",)
#: Session 16's A/B of the chunks aligned for cuBLAS (switch ``aligned_attention_chunks``) or as sessions 13-15 ran them,
#: band on by default: Gemma-4-E2B at 6,144 and 8,192 tokens, E4B at 8,192; fresh processes (call1/trainer.jsonl).
SESSION16_ALIGNED = (_RESULTS / "session16" / "call1" / "trainer.jsonl",)
#: Session 17's held-out runs of the trainer as it ships (aligned chunks, the band from six windows), chosen where older
#: lines missed most: Gemma-4-E2B at ranks 32 and 128 under graphs and at rank 16 eager, Qwen3-4B without
#: checkpointing, Llama-3.2-1B at 8,192 tokens; fresh processes (call1/held-out.jsonl, the save events dropped).
SESSION17 = (_RESULTS / "session17" / "call1" / "held-out.jsonl",)
#: Session 19's runs of the trainer as it ships: fp16 arithmetic (what fit plans for GPUs without bf16) with its loss
#: scaled, beside bf16, on Llama-3.2-1B and Gemma-4-E2B at 2,048 tokens (call1/fp16.jsonl, call3/fp16-fixed.jsonl), and
#: the band's threshold, E2B at 3,072 tokens over the band and under SDPA's mask (call1/band-threshold.jsonl); fresh
#: processes. Left out: fp16 runs without the scaling (the trainer before session 18) and E2B's fp16 runs, whose every
#: step overflowed and was skipped (the trainer now runs such a step again at half the scale).
SESSION19 = (_RESULTS / "session19" / "held-out.jsonl",)
#: Session 20's campaign of the trainer as it ships, its grid and predictions committed before it ran
#: (session20/campaign.json, predicted.txt): 16 configurations over 8 models, 1,024-8,192 tokens, ranks 8-128, batches
#: 1-4, checkpointing full, none and offloaded, graphs and eager, bf16 and fp16; fresh processes.
SESSION20 = (_RESULTS / "session20" / "call1" / "campaign-1.jsonl", _RESULTS / "session20" / "call2" / "campaign-2.jsonl")
#: Session 20's runs after its campaign, on another machine (call3/host-and-slack.jsonl, the first lines probing the
#: host's dispatch): Llama-3.2-1B at 2,048 tokens eager; Qwen3-1.7B at rank 128 without checkpointing under graphs
#: (the campaign's memory outlier, again) and eager.
SESSION20_FOLLOWUP = (_RESULTS / "session20" / "call3" / "host-and-slack.jsonl",)
#: Session 21's eager campaign, its grid and predictions committed before it ran (session21/campaign.json,
#: predicted.txt): six host-bound plans over four models, each line with its host's probe (call2/eager.jsonl).
SESSION21_EAGER = (_RESULTS / "session21" / "call2" / "eager.jsonl",)
#: Session 21's captured runs without checkpointing as the trainer shipped until then (call1/pools.jsonl: Qwen3-1.7B at
#: 1,024 tokens, ranks 16, 64 and 128, Llama-3.2-1B at rank 128; torch's pools summed per pool after the steps).
SESSION21_SLACK = (_RESULTS / "session21" / "call1" / "pools.jsonl",)
#: Session 21's captured runs with compact captures (call3/compact.jsonl: Llama-3.2-1B, Qwen3-1.7B and Qwen3-4B at
#: ranks 8-256, checkpointed or not, and the rank-128 A/B with the switch off). They set the captured slack's slope to
#: none (benchmarks.allocator_slack.compact_graph_slack_fit), so they are held out for speed only.
SESSION21_COMPACT = (_RESULTS / "session21" / "call3" / "compact.jsonl",)
#: Session 21's held-out campaign of compact captures, its grid and predictions committed before it ran
#: (session21/campaign-compact.json, predicted-compact.txt): Gemma-4-E4B, Llama-3.2-3B twice, Qwen3-0.6B without
#: checkpointing at 4,096 tokens, Llama-3.1-8B (call4/compact-held-out.jsonl; its Gemma-4-E2B line ran past its
#: timeout), and after it Llama-3.2-1B at 2,048 tokens eager beside both host probes (call4/eager-probes.jsonl).
SESSION21_COMPACT_HELD_OUT = (_RESULTS / "session21" / "call4" / "compact-held-out.jsonl",
                              _RESULTS / "session21" / "call4" / "eager-probes.jsonl")
#: Session 22's eager campaign, its grid and predictions committed before it ran (session22/campaign-eager.json,
#: predicted-eager.txt: six plans over six models, ranks 16-128, the eager slack priced by the small-pool gradients),
#: run in session 23 in fresh processes (session23/call1/eager-campaign.jsonl).
SESSION23_EAGER = (_RESULTS / "session23" / "call1" / "eager-campaign.jsonl",)
#: Session 24's eager campaign, its grid and predictions committed before it ran (session24/campaign-eager-timing.json,
#: predicted-eager-timing.txt: an eager step's gradients priced by when they come), fresh processes (call3).
SESSION24_EAGER_TIMING = (_RESULTS / "session24" / "call3" / "eager-timing.jsonl",)
#: Session 25's eager runs on two H100 machines: call 1 ran two of session 24's plans with eight steps and one more
#: (call1/eager-eight-steps.jsonl), call 2 the campaign registered in session25/campaign-eager-steady.json (seven
#: plans of sessions 21-24 with twelve steps, each step's time recorded; call2/eager-steady.jsonl). Call 2's host
#: probed 34-42 µs an op, call 1's 25-31.
SESSION25_EAGER = (_RESULTS / "session25" / "call1" / "eager-eight-steps.jsonl",
                   _RESULTS / "session25" / "call2" / "eager-steady.jsonl")
#: Session 26's H100 call, both campaigns registered before it ran: session 25's host-probe campaign
#: (session25/campaign-host-probe.json: four eager plans no line had run, each to be priced at its own probe;
#: call-h100/host-probe.jsonl) and the two captured Qwen3-1.7B plans without checkpointing whose runs before compact
#: captures were #5's only held-out runs outside 6% (session26/campaign-shipped-captures.json; shipped-captures.jsonl).
SESSION26_HOST_PROBE = (_RESULTS / "session26" / "call-h100" / "host-probe.jsonl",)
SESSION26_SHIPPED_CAPTURES = (_RESULTS / "session26" / "call-h100" / "shipped-captures.jsonl",)
#: The probed eager runs no hold-out counts, which set the host the speed model's host cost holds for
#: (``vramplan.host.REFERENCE_AUTOGRAD_OP_US``, ``benchmarks.throughput.reference_host_fit``): session 24's rank sweep
#: of Qwen3-4B and Qwen3-0.6B (call2/slack-sweep.jsonl).
REFERENCE_HOST_RUNS = (_RESULTS / "session24" / "call2" / "slack-sweep.jsonl",)


@dataclass(frozen=True)
class HeldOut:
    """A set of measured runs no fit or calibration saw, reported apart: ``label`` marks its rows in tables."""

    name: str
    paths: tuple[Path, ...]
    label: str
    description: str
    speed_note: str = ""  # what the speed model's hold-out should add (benchmarks/throughput.py)
    memory: bool = True  # held out from the planner's fits too (False: the speed model's hold-out only)


#: Every held-out campaign of vramplan's trainer since it captures its steps, in the order they were measured.
HELD_OUT = (
    HeldOut("campaign", CAMPAIGN, "session 9 campaign",
            "session 9's campaign of the trainer as it ships, session9/trainer-campaign*.jsonl, 8 models, none "
            "fitted, measured after every constant was set"),
    HeldOut("overlapped", OVERLAPPED, "session 10, overlapped step",
            "session 10's trainer, its optimizer's step queued before the loss is read, "
            "session10/trainer-overlapped.jsonl",
            "measured after the model priced the overlap; not a clean hold-out since: these runs showed less "
            "overlap than priced, and the zeroing after bitsandbytes' last sync was priced after them (its constant "
            "read off the profiles, not fitted; 16.0% mean, 3 within 15% before)"),
    HeldOut("remeasured", REMEASURED, "session 11, matrix re-measured",
            "session 11's re-measurement of the eager matrix's vramplan configurations no campaign had repeated, "
            "on the trainer as it then shipped (session11/matrix-*.jsonl), none fitted",
            "measured after attention's occupancy was priced"),
    HeldOut("short_rows", SHORT_ROWS, "session 11, short rows",
            "session 11's short rows on the trainer with its step queued whole (session11/trainer-short-rows.jsonl: "
            "Gemma-4-E2B at 512 and 1,024 tokens, E4B and Qwen3-0.6B at 1,024), none fitted"),
    HeldOut("eager_11", EAGER, "session 11, eager",
            "session 11's eager runs of the trainer queued whole (session11/trainer-eager.jsonl: CUDA graphs "
            "disabled, or checkpoints offloaded), none fitted"),
    HeldOut("session12", SESSION12_HELD_OUT, "session 12",
            "session 12's runs no fit saw (session12/*-held-out.jsonl: Gemma-4-E2B at ranks 32 and 128 under graphs; "
            "Qwen3-4B and Gemma-4-E2B at 2,048 tokens eager, Llama-3.2-1B's checkpoints offloaded at 8,192)"),
    HeldOut("session12_ab", SESSION12_AB, "session 12, A/B",
            "session 12's A/Bs of Gemma 4's RoPE (transformers' or the Triton kernel) and of paged states prefetched "
            "every step or once (session12/ab-rope-prefetch.jsonl), none fitted",
            "its Llama-3.2-1B pair fitted the prefetches' cost (throughput.PREFETCH_S), so it is no clean "
            "hold-out for them"),
    HeldOut("session12_fit", SESSION12_FIT, "session 12, fitted the allowances",
            "session 12's rank sweep and eager Llama-3.2-1B runs (session12/*-fit.jsonl), which fitted the planner's "
            "allowances beyond the allocated peak and none of the speed model's constants", memory=False),
    HeldOut("session13", SESSION13, "session 13 campaign",
            "session 13's campaign of the trainer with session 12's defaults (session13/trainer-campaign13.jsonl: "
            "five models, ranks 16-64, 1,024-4,096 tokens, CUDA graphs), none fitted"),
    HeldOut("session13_ab", SESSION13_AB, "session 13, chunked wide heads",
            "session 13's A/B of Gemma 4's 512-wide heads through chunked attention or SDPA's memory-efficient kernels "
            "(session13/ab-wide-heads.jsonl: E2B at 2,048 tokens both ways, E2B 4,096 and E4B 2,048 chunked), none "
            "fitted",
            "the chunked attention's efficiency (throughput.CHUNKED_WIDE_HEAD_ATTENTION_EFFICIENCY) was read off the "
            "graph profile of E2B at 2,048 tokens, so only E2B at 4,096 and E4B are a clean hold-out for it"),
    HeldOut("session14_ab", SESSION14_AB, "session 14, fused attention rows",
            "session 14's A/B of the chunked attention's row passes as PyTorch ops or one Triton pass each way "
            "(session14/call1/trainer.jsonl: E2B at 2,048 tokens, both ways twice, fresh processes), none fitted",
            "the fused path's efficiency (throughput.CHUNKED_FUSED_WIDE_HEAD_ATTENTION_EFFICIENCY) was read off this "
            "A/B, so its speed is no clean hold-out"),
    HeldOut("session14", SESSION14, "session 14 campaign",
            "session 14's runs of Gemma 4 with the fused attention rows on (session14/call2/trainer.jsonl: E2B at "
            "1,024, 4,096 and 8,192 tokens, E4B at 2,048 and 4,096), none fitted"),
    HeldOut("session15_ab", SESSION15_AB, "session 15, sliding band",
            "session 15's A/B of Gemma-4-E2B's sliding layers over their band or under SDPA's mask at 8,192 tokens "
            "(session15/ab-band-8192.jsonl, fresh processes), none fitted",
            "the band's efficiency (throughput.CHUNKED_FUSED_BAND_ATTENTION_EFFICIENCY) was read off this A/B, so "
            "its speed is no clean hold-out"),
    HeldOut("session15", SESSION15, "session 15, band threshold",
            "session 15's runs at the band's shipped threshold (session15/held-out.jsonl: E2B at 4,096 tokens under "
            "SDPA's mask, E2B at 6,144 and E4B at 8,192 both ways), none fitted"),
    HeldOut("session16_aligned", SESSION16_ALIGNED, "session 16, aligned chunks",
            "session 16's A/B of the chunked attention's chunks aligned for cuBLAS or not (session16/call1/trainer.jsonl: "
            "E2B at 6,144 and 8,192 tokens, E4B at 8,192, band on, fresh processes), none fitted",
            "the unaligned chunks' cost (throughput.UNALIGNED_CHUNK_SLOWDOWN) was read off kernel tables, and the "
            "band's efficiency off session 15's unaligned 8,192-token A/B: the aligned lines are a clean hold-out"),
    HeldOut("session17", SESSION17, "session 17 campaign",
            "session 17's runs of the trainer as it ships where older lines missed most (session17/call1/held-out.jsonl: "
            "E2B at 2,048 tokens, ranks 32 and 128 under graphs and 16 eager; Qwen3-4B at 1,024 without checkpointing; "
            "Llama-3.2-1B at 8,192), none fitted"),
    HeldOut("session19", SESSION19, "session 19, fp16 and band threshold",
            "session 19's runs of the trainer as it ships (session19/held-out.jsonl: Llama-3.2-1B at 2,048 tokens in "
            "loss-scaled fp16 and in bf16, twice; Gemma-4-E2B in bf16 at 2,048 tokens, twice, and at 3,072 over the band "
            "and under SDPA's mask), none fitted",
            "the fp16 steps' wait before the update (throughput.optimizer_overlapped) was priced after the Llama fp16 "
            "runs were seen, with no constant fitted to them"),
    HeldOut("session20", SESSION20, "session 20 campaign",
            "session 20's campaign of the trainer as it ships, its grid and predictions committed before it ran "
            "(session20/campaign.json: 16 configurations over 8 models, 1,024-8,192 tokens, ranks 8-128, batches 1-4, "
            "checkpointing full, none and offloaded, graphs and eager, bf16 and fp16), none fitted"),
    HeldOut("session20_followup", SESSION20_FOLLOWUP, "session 20, after the campaign",
            "session 20's runs after its campaign, on another machine, its host's dispatch probed "
            "(session20/call3/host-and-slack.jsonl: Llama-3.2-1B at 2,048 tokens eager; Qwen3-1.7B at rank 128 "
            "without checkpointing under graphs and eager), none fitted"),
    HeldOut("session21_eager", SESSION21_EAGER, "session 21, eager campaign",
            "session 21's eager campaign, its grid and predictions committed before it ran (session21/campaign.json: "
            "Llama-3.2-1B three ways, Qwen3-0.6B, Qwen3-4B and Gemma-4-E2B, graphs off or checkpoints offloaded), none "
            "fitted"),
    HeldOut("session21_slack", SESSION21_SLACK, "session 21, captures before compact",
            "session 21's captured runs without checkpointing as the trainer shipped before compact captures "
            "(session21/call1/pools.jsonl: Qwen3-1.7B at ranks 16, 64 and 128, Llama-3.2-1B at 128), none fitted"),
    HeldOut("session21_compact", SESSION21_COMPACT, "session 21, compact captures",
            "session 21's captured runs with compact captures (session21/call3/compact.jsonl: Llama-3.2-1B, Qwen3-1.7B "
            "and Qwen3-4B at ranks 8-256), which set the captured slack's slope and none of the speed model's "
            "constants", memory=False),
    HeldOut("session21_compact_held_out", SESSION21_COMPACT_HELD_OUT, "session 21, compact captures held out",
            "session 21's campaign of compact captures, registered before it ran (session21/call4: Gemma-4-E4B at rank "
            "64, Llama-3.2-3B at rank 256 and without checkpointing, Qwen3-0.6B at 4,096 tokens without checkpointing, "
            "Llama-3.1-8B at rank 128), and Llama-3.2-1B eager with both host probes, none fitted"),
    HeldOut("session23_eager", SESSION23_EAGER, "session 23, eager campaign",
            "session 22's eager campaign, registered before it ran and run in session 23 (session22/campaign-eager.json: "
            "Llama-3.2-3B, Qwen3-1.7B, Gemma-4-E4B and Llama-3.1-8B at rank 16, Qwen3-4B at 64, Qwen3-0.6B at 128, "
            "eager, checkpointed), none fitted"),
    HeldOut("session24_eager_timing", SESSION24_EAGER_TIMING, "session 24, eager gradients' timing",
            "session 24's eager campaign, registered before it ran (session24/campaign-eager-timing.json: Llama-3.2-3B at "
            "ranks 128 and 32, Qwen3-1.7B at 64 and 128, Llama-3.2-1B at 128 and at 64 with batch 2, checkpointed), "
            "its backward's peak and slack priced by when the gradients come, none fitted"),
    HeldOut("session25_eager", SESSION25_EAGER, "session 25, eager on two hosts",
            "session 25's eager runs of plans from sessions 21-24 on two H100 machines (call1/eager-eight-steps.jsonl: "
            "eight steps; call2/eager-steady.jsonl: the twelve-step campaign registered in "
            "session25/campaign-eager-steady.json), none fitted"),
    HeldOut("session26_host_probe", SESSION26_HOST_PROBE, "session 26, host-probe campaign",
            "session 25's registered host-probe campaign, run in session 26 (session25/campaign-host-probe.json: "
            "Llama-3.2-1B offloaded at rank 32, Qwen3-1.7B at 2,048 tokens, Llama-3.2-3B and Gemma-4-E2B at 4,096, "
            "eager), none fitted"),
    HeldOut("session26_shipped_captures", SESSION26_SHIPPED_CAPTURES, "session 26, compact captures again",
            "session 26's registered campaign (session26/campaign-shipped-captures.json: Qwen3-1.7B at 1,024 tokens, "
            "ranks 128 and 64, no checkpointing, captured as the trainer ships), none fitted"),
)

#: The chunked loss's budget before it became a plan field (kernels/linear_cross_entropy.py, until head_quant)
HISTORICAL_LOSS_CHUNK_MB = 256

#: The harnesses' optimizer names -> the plan's
OPTIMIZERS = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit", "adamw": "adamw"}


def plan_of(record: dict, stack: str = "vramplan") -> Plan:
    """The plan a measurement line (or a benchmark grid entry with its ``model``) describes."""
    return Plan(model=record["model"].removesuffix(".json"), quant=record.get("quant") or "nf4",
                lora_rank=record["rank"], seq_len=record["seq"], micro_batch=record["batch"],
                checkpointing=record.get("checkpointing") or ("full" if record["gc"] else "none"),
                optimizer=OPTIMIZERS[record.get("optim") or "paged_adamw_8bit"], stack=stack,
                loss="full" if stack == "hf" else "chunked", lora_dtype=record.get("lora_dtype") or "fp32",
                head_quant=record.get("head_quant") or "bf16", cuda_graphs=bool(record.get("cuda_graphs")),
                compute_dtype=record.get("compute_dtype") or "bf16",
                flat_optimizer="flat_optimizer" in (record.get("enabled") or "") or bool(record.get("flat_optimizer")),
                mlp_tiles=record.get("mlp_tiles") or 1,
                **({"loss_chunk_mb": record.get("loss_chunk_mb") or HISTORICAL_LOSS_CHUNK_MB} if stack == "vramplan" else {}))


def switches_ran(record: dict) -> dict[str, bool]:
    """The switches a measured line ran under that change what the planner and the speed model price
    (``switches.forced(**switches_ran(line))`` prices it as it ran). The fused 8-bit AdamW: the line
    says so since session 7, and before that only ``VRAMPLAN_ENABLE=fused_optimizer`` turned it on.
    The vocabulary-major int8 head: every line before session 8 walked it token-major. The whole step
    queued (``queued_optimizer``): only lines that say so, none before session 11. Gemma 4's RoPE through the
    Triton kernel (``rope_gemma4``): lines that say so, or whose ``enabled`` names it. Paged states prefetched
    before every step (``prefetch_paged``): every line that does not say otherwise (bitsandbytes' own behaviour).
    Wide heads through chunked matmuls (``wide_head_attention``) and their fused row passes (``wide_head_fused_rows``):
    only lines that say so, none before session 13; sliding windows' bands the same way (``sliding_band_attention``),
    none before session 15. Chunks aligned for cuBLAS (``aligned_attention_chunks``): lines whose ``chunk_alignment``
    says so, none before session 16. Captures made compact (``compact_captures``): lines that say so, none before
    session 21. Expandable segments (``expandable_segments``): lines whose ``alloc_conf`` names them, every line since
    session 9 and none of sessions 2-3's."""
    return {"fused_optimizer": bool(record.get("fused_optimizer")) or "fused_optimizer" in (record.get("enabled") or ""),
            "int8_vocab_major": bool(record.get("int8_vocab_major")),
            "overlap_optimizer": bool(record.get("overlap_optimizer")),
            "queued_optimizer": bool(record.get("queued_optimizer")),
            "rope_gemma4": record.get("rope_gemma4", "rope_gemma4" in (record.get("enabled") or "")),
            "prefetch_paged": record.get("prefetch_paged", True),
            "wide_head_attention": bool(record.get("wide_head_attention")),
            "wide_head_fused_rows": bool(record.get("wide_head_fused_rows")),
            "sliding_band_attention": bool(record.get("sliding_band_attention")),
            "aligned_attention_chunks": record.get("chunk_alignment", [1, 1]) != [1, 1],
            "compact_captures": bool(record.get("compact_captures")),
            "expandable_segments": EXPANDABLE in (record.get("alloc_conf") or "")}


def band_min_windows_ran(record: dict) -> int:
    """The band's threshold a line ran under (``activations.SLIDING_BAND_MIN_WINDOWS``, recorded since session 15's
    call 2); session 15's call 1, before the threshold, took the band at any length (1). Lines that never ran the band
    do not care."""
    return int(record.get("sliding_band_min_windows") or 1)


@contextlib.contextmanager
def priced_as_ran(ran: dict[str, bool], band_min_windows: int):
    """The planner and the speed model as a line ran: its switches (:func:`switches_ran`) and its band threshold
    (:func:`band_min_windows_ran`)."""
    with switches.forced(**ran), activations.band_threshold(band_min_windows):
        yield


#: How much NVML's reading outside torch's pool grows over a fresh process's first step beyond its paged states'
#: 128 MiB chunks (``memory.optimizer.MANAGED_CHUNK_BYTES``): kernel images, cuBLAS, the first chunk's bookkeeping;
#: on the H100 148 MiB eager and 218 MiB captured, to the MiB over sessions 9-21's lines (202-204 for Gemma 4's
#: captured steps from 3,072 tokens), its steps eager or captured (``cuda_graphs``) the key.
OUTSIDE_GROWTH_BEYOND_CHUNKS = {False: 148 * 2**20, True: 218 * 2**20}
#: What the host's autograd probe (``host_autograd_us``, on every line since session 21's call 4; after the steps since
#: session 23's call 3) maps before the first driver reading: its matmuls load cuBLAS, 132 MiB of that growth. Such
#: lines start 132 MiB higher outside the pool (1,954 MiB against 1,822 on a clean device) and grow that much less over
#: their first step: session 23's eager Qwen3-1.7B, which pages nothing, grew 16 MiB; the captured lines of session
#: 21's call 4 grew 86-88 beyond their chunks.
HOST_PROBE_LOADED_BYTES = 132 * 2**20


def took_over_chunk(record: dict, managed: int) -> bool:
    """Whether a run paged its optimizer states (``managed`` bytes of them) into a managed chunk a process before it
    left on the device. benchmarks/trainer.py runs a parent's configurations one child process after another; a
    child that pages can leave part of its chunk behind, counted in later children's baselines (36-188 MiB above the
    lowest), and a later run that pages sometimes takes that chunk over instead of mapping one of its own: then its
    reading outside the pool grows one chunk less than its states need (16-20 MiB beyond them eager, 76-108
    captured, against 148 and 218; 132 MiB less on lines that probed the host first, ``HOST_PROBE_LOADED_BYTES``).
    A reading that starts high does not say it happened: a leftover from the process before, or the probe's cuBLAS
    (session 22 took Llama-3.1-8B at rank 128 and Llama-3.2-3B at rank 256, which probed, for runs that started high
    on a leftover; until session 23 every eager line that probed counted as having taken a chunk over, 9 lines).
    Lines without the driver's readings (``driver.outside``, recorded since session 9) never count as having taken
    one over."""
    outside = (record.get("driver") or {}).get("outside")
    if not managed or not outside or len(outside) < 2 or not record.get("fresh_process"):
        return False
    expected = OUTSIDE_GROWTH_BEYOND_CHUNKS[bool(record.get("cuda_graphs"))] - host_probe_loaded_bytes(record)
    return outside_growth_beyond_chunks(record, managed) < expected - MANAGED_CHUNK_BYTES // 2


def host_probe_loaded_bytes(record: dict) -> int:
    """What a line's host probes had loaded before its first driver reading: ``HOST_PROBE_LOADED_BYTES`` where the
    autograd probe ran before the steps (session 21's call 4 to session 23's call 2), nothing where it ran after them
    (``host_probes_after_steps``) or not at all."""
    probed_first = "host_autograd_us" in record and not record.get("host_probes_after_steps")
    return HOST_PROBE_LOADED_BYTES if probed_first else 0


def outside_growth_beyond_chunks(record: dict, managed: int) -> int:
    """How much a line's reading outside torch's pool (``driver.outside``) grew over its first step beyond the
    ceil(``managed`` / 128 MiB) chunks its paged states need."""
    before, after = record["driver"]["outside"][:2]
    return after - before - math.ceil(managed / MANAGED_CHUNK_BYTES) * MANAGED_CHUNK_BYTES


def previous_process_bytes(record: dict, managed: int) -> int:
    """What a run's memory above its own baseline misses of its footprint on a clean device: one chunk where it took
    over a chunk a process before it left (:func:`took_over_chunk`), else nothing. Session 19 ran one Llama-3.2-1B
    plan in fp16 as a parent's first child and in bf16 after a paging child, the same torch peak: above their
    baselines they read 128 MiB apart, and the bf16 runs' outside growth was one chunk short."""
    return MANAGED_CHUNK_BYTES if took_over_chunk(record, managed) else 0
