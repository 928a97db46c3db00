"""Predicted against measured tokens/s: fit the throughput factors on some runs, judge them on the rest.

Reads the committed H100 measurements (``benchmarks/results/trainer_h100.jsonl`` for
vramplan's trainer, ``hf_stack_h100.jsonl`` for the transformers + PEFT + bitsandbytes
recipe), fits each stack's factors (:mod:`vramplan.throughput`) on a fixed subset, and
reports the error on the configurations the fit never saw. ``--write`` stores the factors
in ``profiles/calibration/throughput/h100.json``; the comparison goes to
``benchmarks/results/throughput.{json,md}``. On a GPU, ``--measure MODEL --grid JSON`` first
runs fresh configurations through benchmarks/trainer.py's functions and adds them (held out).

    python -m benchmarks.throughput --write
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path


import numpy as np

from vramplan.atomic import write_json_atomic
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture
from vramplan.host import host_scale
from benchmarks.records import HELD_OUT, REFERENCE_HOST_RUNS, band_min_windows_ran, plan_of, priced_as_ran, switches_ran
from vramplan.plan import Plan
from vramplan.train import switches
from vramplan.throughput import FLASH_ATTENTION_EFFICIENCY as FLASH_RATE
from vramplan.throughput import MATMUL_EFFICIENCY as MATMUL_RATE
from vramplan.throughput import FACTOR_FIELDS, _recomputes, captured_phases, combine, Factors, factors_for, overlap, step_host_ops, step_seconds

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCES = {"vramplan": RESULTS / "trainer_h100.jsonl", "hf": RESULTS / "hf_stack_h100.jsonl"}
#: vramplan's trainer measured after CUDA graphs were on by default: all held out, never fitted on, and
#: reported by group (:func:`group_of`) apart from the runs above, whose split and errors they leave alone.
#: Session 5's three trainer passes (fresh processes, each line with its same-run MFU) repeat some of
#: trainer_graphs_h100.jsonl's configurations and add two (the flat step with an int8 head, bitsandbytes'
#: unpaged 8-bit AdamW under graphs); a repeated configuration keeps every step time (its median counts).
#: Session 7's lines (``causal_captures``: unpacked captures kept SDPA's causal kernel) test the model's
#: pricing of captured attention as eager, which no earlier run could. Session 8's H100 lines add tiled
#: MLPs and the int8 head's vocabulary-major loss (its H200 call and its run without cuDNN's attention
#: are left out: another GPU, another attention kernel).
LATER_SOURCES = {"vramplan": (RESULTS / "trainer_graphs_h100.jsonl", *(RESULTS / "session5" / f"trainer-{i}.jsonl"
                                                                       for i in (1, 2, 3)),
                              *sorted((RESULTS / "session7").glob("trainer-*.jsonl")),
                              RESULTS / "session8" / "trainer-tiles.jsonl", RESULTS / "session8" / "trainer-spread.jsonl")}
#: Configurations whose kernels were profiled (benchmarks/results/session5/profile-graphs-*.txt: Llama-3.2-1B
#: and Gemma-4-E2B at 2,048 tokens, replayed as CUDA graphs, bitsandbytes stepping each adapter): the
#: model's graph-step constants (vramplan.throughput: MATMUL_EFFICIENCY, MATMUL_KERNEL_S,
#: FLASH_ATTENTION_EFFICIENCY, CAPTURED_WIDE_HEAD_ATTENTION_EFFICIENCY, KERNEL_FLOOR_S) were read off those profiles, so these rows are no test of them; NF4_DEQUANT_KERNEL_S was read off session 8's Llama-3.2-1B profile below. Marked "profiled", not "held_out", and left out of every
#: held-out summary. The same two configurations with causal captures were profiled in session 8
#: (benchmarks/results/session8/profile-graphs-*-2048.txt), where the captured optimizer's cost per adapter
#: tensor (vramplan.throughput.CAPTURED_OPTIMIZER_S_PER_TENSOR) was read: profiled too.
PROFILED = ("vramplan:llama-3.2-1b:s2048:b1:r16:full:nf4:paged_adamw8bit:graphs",
            "vramplan:gemma-4-e2b-text:s2048:b1:r16:full:nf4:paged_adamw8bit:graphs",
            "vramplan:llama-3.2-1b:s2048:b1:r16:full:nf4:paged_adamw8bit:graphs:causal",
            "vramplan:gemma-4-e2b-text:s2048:b1:r16:full:nf4:paged_adamw8bit:graphs:causal")
CALIBRATION = ROOT / "profiles" / "calibration" / "throughput" / "h100.json"
GPU = "h100"
#: The H100's measured copy bandwidth, ~3.0 of its 3.35 TB/s: fixed, not fitted (the runs
#: we have are not bound by memory traffic, so they could not pin it down).
BANDWIDTH_EFFICIENCY = 0.9


@dataclass(frozen=True)
class Run:
    """One configuration of one stack: its measured step times (one per fresh measurement) and their median."""

    key: str
    stack: str
    model: str
    plan: Plan
    step_times: tuple[float, ...]
    group: str = "eager"  # "graphs": replayed as CUDA graphs ("graphs_causal": with causal captures); "eager_later": eager, from LATER_SOURCES
    #: its captured steps ran attention under transformers 5.17's explicit mask, as every graph run recorded
    #: before the trainer kept the causal kernel in captures (a record says ``causal_captures`` since)
    masked_captures: bool = True
    #: the switches it ran under that the speed model prices (``records.switches_ran``; the key marks them)
    ran: dict[str, bool] = field(default_factory=lambda: switches_ran({}))
    #: the band's threshold it ran under (``records.band_min_windows_ran``; the key marks it where the band was on)
    band_min_windows: int = 1
    #: its host's autograd probe (``host_autograd_us``, the median over its measurements), None where any was unprobed
    host_us: float | None = None

    def as_ran(self):
        """The context that prices it as it ran: its switches and its band threshold."""
        return priced_as_ran(self.ran, self.band_min_windows)

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tok_s(self) -> float:
        return self.plan.micro_batch * self.plan.seq_len / self.step_s

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median over its repeats; 0 for a configuration measured once."""
        return (max(self.step_times) - min(self.step_times)) / self.step_s


def run_key(stack: str, plan: Plan) -> str:
    """One configuration's name; the settings no eager run of SOURCES varies (an int8 head, bf16 adapters,
    captured steps, the flat optimizer step) are named only where they differ from the default. A measured
    plan's ``cuda_graphs`` says whether its run captured any graph (``records.plan_of``), so
    ``plan.captures_steps`` is what happened, an MoE model's eager run included: no architecture needed."""
    return (f"{stack}:{plan.model}:s{plan.seq_len}:b{plan.micro_batch}:r{plan.lora_rank}:{plan.checkpointing}"
            f":{plan.quant}:{plan.optimizer}" + (f":head-{plan.head_quant}" if plan.head_quant != "bf16" else "")
            + (f":lora-{plan.lora_dtype}" if plan.lora_dtype != "fp32" else "") + (":graphs" if plan.captures_steps else "")
            + (":flat" if plan.steps_flat else "") + (f":tiles-{plan.mlp_tiles}" if plan.mlp_tiles > 1 else "")
            + (f":{plan.compute_dtype}" if plan.compute_dtype != "bf16" else ""))


def group_of(plan: Plan, later: bool) -> str:
    """``graphs`` where the run captured its steps (as in :func:`run_key`, the record says so), else eager."""
    return "graphs" if plan.captures_steps else "eager_later" if later else "eager"


CAUSAL = ":causal"  # a key's mark for a graph run recorded with causal captures (``causal_captures``)
FUSED = ":fused"  # a key's mark for a run the fused 8-bit AdamW stepped
VOCAB_MAJOR = ":vocab-major"  # a key's mark for a run whose int8 head's loss ran vocabulary-major
OVERLAP_MARK = ":overlapped"  # a key's mark for a run whose optimizer step was queued before the loss was read
QUEUED_MARK = ":queued"  # a key's mark for a run whose bitsandbytes step was queued whole (no last sync)
ROPE_GEMMA4_MARK = ":rope-gemma4"  # a key's mark for a run whose Gemma 4 RoPE ran through the Triton kernel
NO_PREFETCH_MARK = ":no-prefetch"  # a key's mark for a run that prefetched its paged states on their first step only
CHUNKED_WIDE_MARK = ":wide-chunked"  # heads over 256 through vramplan's chunked attention (switch wide_head_attention)
FUSED_ROWS_MARK = ":fused-rows"  # its row passes fused in Triton (switch wide_head_fused_rows)
BAND_MARK = ":sliding-band"  # sliding windows through the chunked attention over their band (sliding_band_attention)
ALIGNED_MARK = ":aligned-chunks"  # its chunks' heights and band keys aligned for cuBLAS (aligned_attention_chunks)
#: Each switch a key marks, with its mark and the state the mark stands for (``prefetch_paged`` marks its off
#: state: every line before session 12 prefetched), in the order the marks follow each other
SWITCH_MARKS = {"fused_optimizer": (FUSED, True), "int8_vocab_major": (VOCAB_MAJOR, True),
                "overlap_optimizer": (OVERLAP_MARK, True), "queued_optimizer": (QUEUED_MARK, True),
                "rope_gemma4": (ROPE_GEMMA4_MARK, True), "prefetch_paged": (NO_PREFETCH_MARK, False),
                "wide_head_attention": (CHUNKED_WIDE_MARK, True), "wide_head_fused_rows": (FUSED_ROWS_MARK, True),
                "sliding_band_attention": (BAND_MARK, True), "aligned_attention_chunks": (ALIGNED_MARK, True)}


def switch_marks(ran: dict[str, bool]) -> str:
    """The key's marks for the switches a run ran under (``records.switches_ran``)."""
    return "".join(mark for name, (mark, state) in SWITCH_MARKS.items() if ran[name] == state)


def load_runs(sources: dict[str, Path | tuple[Path, ...]] = SOURCES, later: bool = False) -> list[Run]:
    """Every measured configuration with a tok_s (event lines and failed runs skipped), in the order
    of its first measurement; a configuration measured again keeps all its step times (its repeats).
    A line whose run stepped the adapters as one flat tensor reads back as a plan with
    ``flat_optimizer`` (``records.plan_of``). ``later``:
    the runs are LATER_SOURCES', grouped by :func:`group_of`."""
    times: dict[str, list[float]] = {}
    probes: dict[str, list[float | None]] = {}
    plans: dict[str, tuple[str, Plan, dict[str, bool]]] = {}
    for stack, paths in sources.items():
        lines = [line for path in (paths if isinstance(paths, tuple) else (paths,)) for line in path.read_text().splitlines()]
        for line in lines:
            record = json.loads(line)
            if "tok_s" not in record:
                continue
            plan = plan_of(record, stack)
            causal = bool(record.get("causal_captures")) and plan.captures_steps
            ran = switches_ran(record)
            band_from = band_min_windows_ran(record)
            key = (run_key(stack, plan) + switch_marks(ran) + (f":band-from-{band_from}" if ran["sliding_band_attention"]
                                                               else "") + (CAUSAL if causal else ""))
            plans.setdefault(key, (stack, plan, ran, band_from))
            times.setdefault(key, []).append(float(record["step_s"]))
            probes.setdefault(key, []).append(record.get("host_autograd_us"))
    return [Run(key, stack, plan.model, plan, tuple(times[key]),
                "graphs_causal" if key.endswith(CAUSAL) else group_of(plan, later),
                masked_captures=not key.endswith(CAUSAL), ran=ran, band_min_windows=band_from,
                host_us=statistics.median(probes[key]) if None not in probes[key] else None)
            for key, (stack, plan, ran, band_from) in plans.items()]


def load_later_runs() -> list[Run]:
    """LATER_SOURCES' runs, reported per :func:`group_of` group, and each ``records.HELD_OUT`` campaign's as its own
    group: all held out by the fit."""
    return load_runs(LATER_SOURCES, later=True) + [
        replace(run, group=held.name) for held in HELD_OUT for run in load_runs({"vramplan": held.paths}, later=True)]


#: One configuration in FIT_EVERY of each stack is fitted on.
FIT_EVERY = 3


def split(runs: list[Run], offset: int = 0) -> tuple[list[Run], list[Run]]:
    """The fitting set: of each stack's configurations, in the order they were first measured, the
    1st, 4th, 7th, ... (a third); the rest held out. That order interleaves models and settings, so
    the fit sees host-bound small models and device-bound long sequences (Qwen3-4B at 8,192,
    Llama-3.1-8B) without choosing configurations by their error. One rule on top: a stack whose
    third holds no run without checkpointing also fits on its first such run, since nothing else
    shows what checkpointing's hooks cost. ``offset`` 1 and 2 fit the other two thirds instead: the
    report's rotations, which show how much a result owes to its split."""
    fit, held = [], []
    index: dict[str, int] = {}
    for run in runs:
        i = index.get(run.stack, 0)
        (fit if i % FIT_EVERY == offset else held).append(run)
        index[run.stack] = i + 1
    for stack in index:
        if not any(r.stack == stack and not _recomputes(r.plan) for r in fit):
            first = next((r for r in held if r.stack == stack and not _recomputes(r.plan)), None)
            if first is not None:
                held.remove(first)
                fit.append(first)
    return fit, held


def _checkpointed(run: Run) -> float:
    arch = architecture(resolve_model(run.model))
    if "checkpointed" in captured_phases(arch, run.plan):  # the hooks ran once, while capturing
        return 0.0
    with run.as_ran():
        return step_host_ops(arch, run.plan)["checkpointed"]


def _terms(run: Run) -> dict[str, float]:
    """The model's terms for ``run`` with unit factors (1 s per host op, efficiencies 1), bandwidth fixed."""
    unit = Factors(seconds_per_host_op=1.0, checkpoint_host_ops=0.0, matmul_efficiency=1.0, attention_efficiency=1.0,
                   bandwidth_efficiency=BANDWIDTH_EFFICIENCY)
    return run_seconds(run, unit)


def run_seconds(run: Run, factors: Factors) -> dict[str, float]:
    """The model's step-time terms for ``run`` with ``factors``, its plan priced as it ran (which optimizer stepped it)
    on the host it ran on (its probe where it has one)."""
    with run.as_ran():
        return step_seconds(architecture(resolve_model(run.model)), run.plan, resolve_gpu(GPU),
                            replace(factors, host_scale=host_scale(run.host_us)), run.masked_captures)


#: The grids searched. Matmul efficiency stops at the H100's measured bf16 GEMM rate (702-798 of
#: its 989 TFLOP/s): a stack cannot run its matmuls faster than cuBLAS alone.
HOST_OP_SECONDS = np.linspace(1e-6, 150e-6, 150)
CHECKPOINT_HOST_OPS = np.linspace(0.0, 4.0, 41)
MATMUL_EFFICIENCY = np.linspace(0.02, 0.80, 40)
#: in 1% steps from 1%: hf's fp32 attention sits at 2-4%, where 2% steps are 50-100% jumps that the
#: matmul efficiency then trades against
ATTENTION_EFFICIENCY = np.linspace(0.01, 1.0, 100)


def _fit_stack(mine: list[Run], hooks: float) -> tuple[float, Factors]:
    """The mean relative step-time error and the factors that minimise it on ``mine``, hooks fixed."""
    terms = [_terms(r) for r in mine]
    column = lambda values: np.array(values)[:, None, None, None]  # noqa: E731
    term = lambda name: column([t[name] for t in terms])  # noqa: E731
    # vramplan's matmuls and attention run at profiled rates (vramplan.throughput.MATMUL_EFFICIENCY,
    # FLASH_ATTENTION_EFFICIENCY), already in its terms: nothing to search, the rates are recorded as they are
    profiled = all(r.stack == "vramplan" for r in mine)
    matmul_grid, attention_grid = (np.array([1.0]), np.array([1.0])) if profiled else (MATMUL_EFFICIENCY, ATTENTION_EFFICIENCY)
    host_op = HOST_OP_SECONDS[None, :, None, None]
    mm_eff = matmul_grid[None, None, :, None]
    att_eff = attention_grid[None, None, None, :]
    host = (term("host") + column([_checkpointed(r) for r in mine]) * hooks) * host_op
    # the wide-head and flash attention terms carry their own fixed efficiencies, the memory term the fixed bandwidth
    device = (term("matmul") / mm_eff + term("attention") / att_eff + term("attention_wide") + term("attention_flash")
              + term("memory") + term("kernels"))
    predicted = overlap(host, device) + term("host_after_sync") * host_op + term("pcie")
    measured = column([r.step_s for r in mine])
    error = np.mean(np.abs(predicted - measured) / measured, axis=0)
    k, m, a = np.unravel_index(np.argmin(error), error.shape)
    return float(error[k, m, a]), Factors(
        seconds_per_host_op=float(HOST_OP_SECONDS[k]), checkpoint_host_ops=hooks,
        matmul_efficiency=MATMUL_RATE if profiled else float(matmul_grid[m]),
        attention_efficiency=FLASH_RATE if profiled else float(attention_grid[a]), bandwidth_efficiency=BANDWIDTH_EFFICIENCY)


def fit_factors(runs: list[Run]) -> dict[str, Factors]:
    """Each stack's factors, minimising the mean relative step-time error of its runs.

    Per stack: seconds per host op, matmul efficiency and attention efficiency (vramplan's stack: its host
    op only; its matmul and attention rates are profiled, see :func:`_fit_stack`). Shared by the
    stacks: the checkpoint hooks' host ops per checkpointed op (both run torch.utils.checkpoint,
    non-reentrant, around each decoder layer: the same Python per saved tensor), chosen to
    minimise the two stacks' summed error. The step time (``vramplan.throughput.combine``) is
    not linear in the factors, so this searches grids; each configuration weighs once, at its
    median step time.
    """
    stacks = sorted({r.stack for r in runs})
    best = None
    for hooks in CHECKPOINT_HOST_OPS:
        fits = {stack: _fit_stack([r for r in runs if r.stack == stack], float(hooks)) for stack in stacks}
        total = sum(error for error, _ in fits.values())
        if best is None or total < best[0]:
            best = (total, {stack: factors for stack, (_, factors) in fits.items()})
    return best[1]


#: The held-out group whose eager runs fit vramplan's seconds per host op instead of sessions 1-3's third: the trainer
#: that ran those first runs no longer ships (its optimizer step waited on the loss, nothing was queued), and at the
#: 44 µs an op they fitted every eager step of today's trainer read ~1.25x slow (session 17). Session 12's eager
#: Llama-3.2-1B runs (ranks 8-256, 1,024-4,096 tokens) are the trainer as it ships and had fitted no speed constant.
#: The checkpoint hooks' ops stay fitted jointly with the hf stack on the split's thirds, which keeps hf's factors
#: as they were: refitted with these runs instead, hf's matmul and attention rates traded against each other.
HOST_OP_FIT_GROUP = "session12_fit"


def fitted_factors(fit: list[Run], later: list[Run]) -> dict[str, Factors]:
    """:func:`fit_factors` on ``fit``, then vramplan's seconds per host op refitted on ``later``'s eager runs of
    :data:`HOST_OP_FIT_GROUP` (:func:`host_op_fitted`), the checkpoint hooks' ops as the joint fit set them."""
    factors = fit_factors(fit)
    host = [r for r in later if host_op_fitted(r)]
    if host:
        factors["vramplan"] = _fit_stack(host, factors["vramplan"].checkpoint_host_ops)[1]
    return factors


def host_op_fitted(run: Run) -> bool:
    """Whether ``run`` is one of the eager runs vramplan's seconds per host op is fitted on (:func:`fitted_factors`)."""
    return run.group == HOST_OP_FIT_GROUP and run.stack == "vramplan" and not run.plan.captures_steps


#: The probe readings searched for the reference host (µs an op; H100 machines read 21-42).
REFERENCE_HOST_US = np.arange(15.0, 45.05, 0.1)


def step_at_host_scale(terms: dict[str, float], scale: float) -> float:
    """A step's seconds from its terms priced on the reference host, on a host ``scale`` times as slow: its host terms
    grow linearly with ``Factors.host_scale`` (``vramplan.throughput.host_seconds_split``), the rest not at all."""
    return combine(dict(terms, host=terms["host"] * scale, host_after_sync=terms["host_after_sync"] * scale))


def reference_host_fit(paths: tuple[Path, ...] = REFERENCE_HOST_RUNS) -> tuple[float, float]:
    """The probe reading the calibrated host cost per op holds for (``vramplan.host.REFERENCE_AUTOGRAD_OP_US``) and
    the mean relative step-time error there: the reading that minimises that error over ``paths``' probed eager runs,
    each priced on its own host (its probe over the reading), the calibration's factors as they are."""
    runs = [r for r in load_runs({"vramplan": paths}) if r.host_us and not r.plan.captures_steps]
    factors = factors_for("vramplan")
    # priced once at the reference and scaled here, rather than through step_seconds at every reading searched (the
    # same fit, 100x slower)
    terms = [run_seconds(replace(r, host_us=None), factors) for r in runs]

    def error(reference: float) -> float:
        return statistics.mean(abs(step_at_host_scale(t, r.host_us / reference) - r.step_s) / r.step_s
                               for r, t in zip(runs, terms))

    best = min(REFERENCE_HOST_US, key=error)
    return round(float(best), 1), float(error(best))


def host_residuals(paths: tuple[Path, ...] | None = None) -> list[dict]:
    """What each probed eager line's host did beyond its probe: the host scale that prices its step exactly (the
    calibration's factors, its plan as it ran) over the one its probe gives (``vramplan.host.host_scale``). One file is
    one call, one machine, its configurations in fresh processes; 1 is a host exactly as fast as its probe says.
    ``paths``: every held-out campaign's files and the reference host's runs."""
    paths = paths or (*(path for held in HELD_OUT for path in held.paths), *REFERENCE_HOST_RUNS)
    factors = factors_for("vramplan")
    out = []
    for path in paths:
        for run in load_runs({"vramplan": path}):
            if not run.host_us or run.plan.captures_steps:
                continue
            terms = run_seconds(replace(run, host_us=None), factors)
            low, high = 0.01, 100.0  # the step grows with the host's scale: bisect for the one that prices it exactly
            while high - low > 1e-4:
                middle = (low + high) / 2
                low, high = (low, middle) if step_at_host_scale(terms, middle) > run.step_s else (middle, high)
            exact = (low + high) / 2
            out.append({"file": str(path.relative_to(RESULTS)), "model": run.model, "seq": run.plan.seq_len,
                        "rank": run.plan.lora_rank, "checkpointing": run.plan.checkpointing, "probe_us": run.host_us,
                        "residual": round(exact / host_scale(run.host_us), 3)})
    return out


def residual_spread(rows: list[dict]) -> dict:
    """Per machine (file) with three lines or more: its residuals' median and range."""
    by_file: dict[str, list[float]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row["residual"])
    return {file: {"lines": len(values), "median": statistics.median(values), "low": min(values), "high": max(values)}
            for file, values in by_file.items() if len(values) >= 3}


def predicted_tok_s(run: Run, factors: Factors) -> float:
    return run.plan.micro_batch * run.plan.seq_len / combine(run_seconds(run, factors))


def _summary(errors: list[float]) -> dict:
    return {"count": len(errors), "mean_abs_error": round(statistics.mean(errors), 4),
            "median_abs_error": round(statistics.median(errors), 4), "max_abs_error": round(max(errors), 4),
            "within_15_percent": sum(e <= 0.15 for e in errors)}


#: Configurations whose predicted step times lie within this fraction of each other count as the same work.
SAME_WORK = 0.03


def same_work_spread(rows: list[dict]) -> dict:
    """The measured spread among configurations the model gives the same step time (one stack and model,
    predictions within :data:`SAME_WORK`): host-bound steps whose settings change no host op (rank,
    sequence, batch at small sizes). No model of the settings can tell them apart, so their spread
    is a floor under its error: (slowest - fastest) / median step time of the largest such group."""
    best: dict = {"configurations": 0, "spread": 0.0}
    for row in rows:
        step = row["batch"] * row["seq"] / row["predicted_tok_s"]
        group = [r for r in rows if (r["stack"], r["model"]) == (row["stack"], row["model"])
                 and abs(r["batch"] * r["seq"] / r["predicted_tok_s"] / step - 1) <= SAME_WORK]
        measured = [r["batch"] * r["seq"] / r["measured_tok_s"] for r in group]
        if len(group) > best["configurations"]:
            best = {"stack": row["stack"], "model": row["model"], "configurations": len(group),
                    "spread": round((max(measured) - min(measured)) / statistics.median(measured), 4),
                    "fastest_s": round(min(measured), 3), "slowest_s": round(max(measured), 3)}
    return best


def rotation(runs: list[Run], offset: int, later: list[Run] = ()) -> dict:
    """Held-out errors when another third of each stack is fitted (``split(runs, offset)``)."""
    fit, held = split(runs, offset)
    factors = fitted_factors(fit, list(later))
    return dict(offset=offset, **_summary([abs(predicted_tok_s(r, factors[r.stack]) - r.tok_s) / r.tok_s for r in held]))


def evaluate(runs: list[Run] | None = None, rotate: bool = True, later: list[Run] | None = None) -> dict:
    """Fit on the fitting set, predict every run and the ``later`` ones (default :func:`load_later_runs`:
    held out, reported by group); errors are (predicted - measured) / measured tok/s."""
    runs = runs if runs is not None else load_runs()
    later = later if later is not None else load_later_runs()
    fit, held = split(runs)
    factors = fitted_factors(fit, later)
    fitted = {r.key for r in fit}
    rows = []
    for run in runs + later:
        predicted = predicted_tok_s(run, factors[run.stack])
        plan = run.plan
        rows.append({"key": run.key, "stack": run.stack, "model": run.model, "seq": plan.seq_len,
                     "batch": plan.micro_batch, "rank": plan.lora_rank, "checkpointing": plan.checkpointing,
                     "quant": plan.quant, "optimizer": plan.optimizer, "repeats": len(run.step_times),
                     "spread": round(run.spread, 4), "measured_tok_s": round(run.tok_s, 1),
                     "predicted_tok_s": round(predicted, 1), "error": round((predicted - run.tok_s) / run.tok_s, 4),
                     "head_quant": plan.head_quant, "lora_dtype": plan.lora_dtype, "compute_dtype": plan.compute_dtype,
                     "group": run.group,
                     "cuda_graphs": plan.cuda_graphs,
                     "fused_optimizer": run.ran["fused_optimizer"],
                     "set": "fit" if run.key in fitted or host_op_fitted(run) else "profiled" if run.key in PROFILED else "held_out"})
    held_rows = [r for r in rows if r["set"] == "held_out" and r["group"] == "eager"]
    groups = {}
    held_out_names = [held.name for held in HELD_OUT]
    for group in ("eager", "graphs", "graphs_causal", "eager_later", *held_out_names):
        errors = [abs(r["error"]) for r in rows if r["set"] == "held_out" and r["group"] == group]
        if errors:
            groups[group] = _summary(errors)
    shipped = [r for r in rows if r["set"] == "held_out" and r["group"] in held_out_names]
    shipped_summary = {name: _summary([abs(r["error"]) for r in part]) for name, part in
                       (("all", shipped), ("captured", [r for r in shipped if r["cuda_graphs"]]),
                        ("eager", [r for r in shipped if not r["cuda_graphs"]])) if part}
    rotations = [rotation(runs, offset, later) for offset in range(1, FIT_EVERY)] if rotate else []
    repeated = [r["spread"] for r in rows if r["repeats"] > 1 and r["group"] == "eager"]
    return {
        "gpu": GPU,
        "split": f"per stack, in order of first measurement, configurations 1, 1+{FIT_EVERY}, 1+2*{FIT_EVERY}, ... fitted",
        "factors": {stack: {name: getattr(f, name) for name in FACTOR_FIELDS} for stack, f in factors.items()},
        "rows": rows,
        "held_out": _summary([abs(r["error"]) for r in held_rows]),
        "held_out_by_stack": {stack: _summary([abs(r["error"]) for r in held_rows if r["stack"] == stack])
                              for stack in factors},
        "held_out_by_group": groups,
        "shipped_trainer_held_out": shipped_summary,
        "profiled": _summary([abs(r["error"]) for r in rows if r["set"] == "profiled"]) if any(
            r["set"] == "profiled" for r in rows) else None,
        "fit": {"count": len(fit)},
        "repeats": {"configurations": len(repeated), "max_spread": round(max(repeated, default=0.0), 4)},
        "same_work": same_work_spread([r for r in rows if r["group"] == "eager"]),
        "rotations": rotations,
        "host_residuals": residual_spread(host_residuals()),
    }


def markdown(result: dict) -> str:
    lines = ["# Predicted vs measured tokens/s (H100)", "",
             "Measured: median step time over a configuration's fresh measurements (repeats; spread = "
             "(slowest - fastest) / median). Error: (predicted - measured) / measured tokens/s.", ""]
    shipped = result.get("shipped_trainer_held_out")
    if shipped:
        part = {name: f"{held['count']} configurations, mean |error| {100 * held['mean_abs_error']:.1f}%, "
                      f"{held['within_15_percent']} within 15%" for name, held in shipped.items()}
        lines += [f"**The trainer as it shipped** (every held-out run of vramplan's trainer since session 9, the groups "
                  f"`records.HELD_OUT` names below, each priced with the switches it ran under and, where its line "
                  f"probed its host (`host_autograd_us`, since session 21's call 4), for that host: "
                  f"`vramplan.host.host_scale`): {part['all']}; its steps "
                  f"replayed as CUDA graphs (the default): {part.get('captured', 'none')}; eager (graphs off, or checkpoints "
                  f"offloaded): {part.get('eager', 'none')}.", ""]
    lines += ["| stack | model | seq | batch | rank | ckpt | quant | optimizer | repeats (spread) | measured | predicted "
              "| error | set |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {"graphs": " (graphs)", "graphs_causal": " (graphs, causal)", "eager_later": " (eager, later)",
              **{held.name: f" ({held.label})" for held in HELD_OUT}}
    for r in result["rows"]:
        repeats = f"{r['repeats']} ({100 * r['spread']:.0f}%)" if r["repeats"] > 1 else "1"
        model = r["model"] + "".join(f", {v} {name}" for name, v, default in
                                     (("head", r.get("head_quant"), "bf16"), ("LoRA", r.get("lora_dtype"), "fp32"),
                                      ("arithmetic", r.get("compute_dtype"), "bf16"))
                                     if v and v != default) + (", fused AdamW" if r.get("fused_optimizer") else "")
        lines.append(f"| {r['stack']} | {model} | {r['seq']} | {r['batch']} | {r['rank']} | {r['checkpointing']} | "
                     f"{r['quant']} | {r['optimizer']} | {repeats} | {r['measured_tok_s']:,.0f} | "
                     f"{r['predicted_tok_s']:,.0f} | {100 * r['error']:+.1f}% | {r['set']}{groups.get(r.get('group'), '')} |")
    lines += ["", f"Split: {result['split']}; {result['fit']['count']} fitted."]
    for name, held in [("all stacks", result["held_out"]), *result["held_out_by_stack"].items()]:
        lines.append(f"Held out ({name}): {held['count']} configurations, mean |error| {100 * held['mean_abs_error']:.1f}%, "
                     f"median {100 * held['median_abs_error']:.1f}%, max {100 * held['max_abs_error']:.1f}%, "
                     f"{held['within_15_percent']} within 15%.")
    for rot in result["rotations"]:
        lines.append(f"Held out with the split rotated by {rot['offset']} (another third fitted): {rot['count']} "
                     f"configurations, mean {100 * rot['mean_abs_error']:.1f}%, median {100 * rot['median_abs_error']:.1f}%, "
                     f"max {100 * rot['max_abs_error']:.1f}%, {rot['within_15_percent']} within 15%.")
    names = {"eager": "eager steps, the fit's own held-out third", "graphs": "steps replayed as CUDA graphs, "
             "trainer_graphs_h100.jsonl and session5/trainer-*.jsonl, none fitted, the profiled two left out",
             "graphs_causal": "steps replayed as CUDA graphs whose attention kept SDPA's causal kernel, "
             "session7/trainer-*.jsonl and session8/trainer-{tiles,spread}.jsonl, none fitted",
             "eager_later": "eager steps of trainer_graphs_h100.jsonl, none fitted",
             **{held.name: ", ".join(filter(None, (held.description, held.speed_note))) for held in HELD_OUT}}
    for group, held in result.get("held_out_by_group", {}).items():
        lines.append(f"Held out by group ({names[group]}): {held['count']} configurations, mean |error| "
                     f"{100 * held['mean_abs_error']:.1f}%, median {100 * held['median_abs_error']:.1f}%, "
                     f"max {100 * held['max_abs_error']:.1f}%, {held['within_15_percent']} within 15%.")
    if result.get("profiled"):
        prof = result["profiled"]
        lines.append(f"Profiled (graph-step constants read off their kernels, so not held out): {prof['count']} "
                     f"configurations, mean |error| {100 * prof['mean_abs_error']:.1f}%, max {100 * prof['max_abs_error']:.1f}%.")
    rep = result["repeats"]
    lines += [f"Repeats: {rep['configurations']} configurations measured more than once; largest spread "
              f"{100 * rep['max_spread']:.0f}%."]
    same = result.get("same_work")
    if same and same["configurations"] > 1:
        lines.append(f"Same predicted work: {same['configurations']} {same['stack']} {same['model']} configurations the model "
                     f"gives one step time (within {100 * SAME_WORK:.0f}%) measured {same['fastest_s']}-{same['slowest_s']} s, "
                     f"a spread of {100 * same['spread']:.0f}%: host-bound steps whose settings change no host op"
                     + (" (slowest/fastest above 1.15/0.85: no one prediction is within 15% of all of them)."
                        if same["slowest_s"] / same["fastest_s"] > 1.15 / 0.85 else "."))
    residuals = result.get("host_residuals")
    if residuals:
        lines += ["", "**What a host did beyond its probe** (`host_residuals`: the host scale that prices a probed eager "
                  "line exactly over the one its probe gives; one file is one machine, its plans in fresh processes). "
                  f"On {sum(r['high'] / r['low'] > 1.15 / 0.85 for r in residuals.values())} of {len(residuals)} "
                  "machines the highest is more than 1.15 / 0.85 times the lowest: no one host scale, a probe's or a "
                  "measured one, prices each of that machine's lines within 15%:", "",
                  "| machine (file) | lines | median | low | high |", "|---|---|---|---|---|"]
        lines += [f"| {file} | {r['lines']} | {r['median']:.2f} | {r['low']:.2f} | {r['high']:.2f} |"
                  for file, r in residuals.items()]
    lines += ["", "Factors (vramplan's seconds per host op fitted on the eager runs of `records.HELD_OUT`'s "
              f"`{HOST_OP_FIT_GROUP}`, the trainer as it ships, marked fit above; sessions 1-3's vramplan rows marked fit "
              "set only the checkpoint hooks' ops, with hf's. They measured a trainer whose host work cost more, and "
              "are priced faster than they ran):", ""]
    for stack, f in result["factors"].items():
        lines.append(f"- {stack}: {f['seconds_per_host_op'] * 1e6:.1f} µs per host op, checkpoint hooks "
                     f"{f['checkpoint_host_ops']:.1f} host ops per checkpointed op, matmul "
                     f"{100 * f['matmul_efficiency']:.1f}%, attention {100 * f['attention_efficiency']:.1f}%, "
                     f"bandwidth {100 * f['bandwidth_efficiency']:.0f}% of peak")
    return "\n".join(lines) + "\n"


def calibration_file(result: dict, date: str) -> dict:
    return {
        "date": date,
        "gpu": "H100 80GB HBM3 (measured bf16 matmul 702-798 TFLOP/s, copy ~3.0 TB/s)",
        "source": "benchmarks/results/trainer_h100.jsonl (vramplan stack), benchmarks/results/hf_stack_h100.jsonl "
                  "(transformers + PEFT + bitsandbytes), benchmarks/results/session12/*-fit.jsonl (vramplan's seconds per "
                  "host op); fitted by benchmarks/throughput.py on the runs marked 'fit' in benchmarks/results/throughput.json",
        # what `vramplan buy` quotes: every held-out run of the trainer as it shipped since session 9
        "held_out": result["shipped_trainer_held_out"]["all"],
        # ... split by how the steps ran: replayed as CUDA graphs, or eagerly (host-bound: graphs off, or offloaded
        # checkpoints), whose error is the host's as much as the model's
        "held_out_captured": result["shipped_trainer_held_out"]["captured"],
        "held_out_eager": result["shipped_trainer_held_out"]["eager"],
        "held_out_first_matrix": result["held_out"],
        "stacks": result["factors"],
    }


def measure(model: str, grid: list[dict], steps: int) -> list[dict]:
    """Fresh runs of vramplan's trainer on this machine's GPU (benchmarks/trainer.py's functions)."""
    import shutil
    import tempfile

    import torch

    from benchmarks.trainer import build_random_model, run_one

    folder = tempfile.mkdtemp(dir="/tmp")
    build_random_model(model, folder)
    config = resolve_model(model).config
    vocab = config.get("text_config", config)["vocab_size"]
    records = []
    for g in grid:
        _, times = run_one(g, folder, vocab, steps, torch.device("cuda"))
        tail = sorted(times[1:]) or times
        step_s = tail[len(tail) // 2]
        records.append(dict(g, model=model, stack="vramplan", step_s=step_s, tok_s=g["batch"] * g["seq"] / step_s))
    shutil.rmtree(folder, ignore_errors=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="also write profiles/calibration/throughput/h100.json")
    parser.add_argument("--date", default=None, help="the calibration's date (default: today, UTC)")
    parser.add_argument("--measure", default=None, metavar="MODEL", help="on a GPU: measure MODEL with --grid first")
    parser.add_argument("--grid", default='[{"seq": 2048, "batch": 1, "rank": 16, "gc": true}]')
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    runs = load_runs()
    if args.measure:
        fresh = measure(args.measure, json.loads(args.grid), args.steps)
        for record in fresh:
            plan = plan_of(record, "vramplan")
            runs.append(Run("fresh:" + run_key("vramplan", plan), "vramplan", plan.model, plan, (record["step_s"],),
                            masked_captures=False))
    result = evaluate(runs)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "throughput.json", result)
    (RESULTS / "throughput.md").write_text(markdown(result))
    print(markdown(result))
    if args.write:
        import datetime

        date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(CALIBRATION, calibration_file(result, date))
        print(f"wrote {CALIBRATION}")


if __name__ == "__main__":
    main()
