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
from dataclasses import dataclass
from pathlib import Path


import numpy as np

from vramplan.atomic import write_json_atomic
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture
from benchmarks.records import plan_of
from vramplan.plan import Plan
from vramplan.throughput import combine, Factors, step_seconds

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCES = {"vramplan": RESULTS / "trainer_h100.jsonl", "hf": RESULTS / "hf_stack_h100.jsonl"}
CALIBRATION = ROOT / "profiles" / "calibration" / "throughput" / "h100.json"
GPU = "h100"
#: The H100's measured copy bandwidth, ~3.0 of its 3.35 TB/s: fixed, not fitted (the runs
#: we have are not bound by memory traffic, so they could not pin it down).
BANDWIDTH_EFFICIENCY = 0.9


@dataclass(frozen=True)
class Run:
    key: str
    stack: str
    model: str
    plan: Plan
    tok_s: float
    step_s: float


def load_runs(sources: dict[str, Path] = SOURCES) -> list[Run]:
    """Every measured configuration with a tok_s (event lines and failed runs skipped), in file order;
    a configuration measured again counts once, at its latest measurement (no run in both halves)."""
    runs = []
    for stack, path in sources.items():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "tok_s" not in record:
                continue
            plan = plan_of(record, stack)
            key = (f"{stack}:{plan.model}:s{plan.seq_len}:b{plan.micro_batch}:r{plan.lora_rank}:{plan.checkpointing}"
                   f":{plan.quant}:{plan.optimizer}")
            runs = [run for run in runs if run.key != key]
            runs.append(Run(key, stack, plan.model, plan, float(record["tok_s"]), float(record["step_s"])))
    return runs


def split(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """The fitting set: every other run of each stack in file order, so host-bound small models and
    compute-bound large ones (Llama-3.1-8B, Gemma-4-E4B) fall in both halves; the rest is held out."""
    fit, held = [], []
    index: dict[str, int] = {}
    for run in runs:
        i = index.get(run.stack, 0)
        (fit if i % 2 == 0 else held).append(run)
        index[run.stack] = i + 1
    return fit, held


def _terms(run: Run) -> dict[str, float]:
    """The model's terms for ``run`` with unit factors (1 s per kernel, efficiency 1), bandwidth fixed."""
    unit = Factors(seconds_per_kernel=1.0, matmul_efficiency=1.0, attention_efficiency=1.0,
                   bandwidth_efficiency=BANDWIDTH_EFFICIENCY)
    return step_seconds(architecture(resolve_model(run.model)), run.plan, resolve_gpu(GPU), unit)


def fit_factors(runs: list[Run], stack: str) -> Factors:
    """The factors that minimise the mean relative step-time error of ``stack``'s runs.

    The step time is max(launch floor, device work) + PCIe (``vramplan.throughput.combine``),
    which is not linear in the factors, so this searches a grid: seconds per kernel 1–100 µs,
    matmul efficiency 2–100%, and (hf only, whose attention runs in fp32) a separate attention
    efficiency; vramplan's stack runs bf16 flash attention, so its two efficiencies are one.
    """
    mine = [r for r in runs if r.stack == stack]
    terms = [_terms(r) for r in mine]
    launch = np.array([t["launch"] for t in terms])[:, None, None, None]
    matmul = np.array([t["matmul"] for t in terms])[:, None, None, None]
    attention = np.array([t["attention"] for t in terms])[:, None, None, None]
    fixed_device = np.array([t["memory"] for t in terms])[:, None, None, None]
    pcie = np.array([t["pcie"] for t in terms])[:, None, None, None]
    measured = np.array([r.step_s for r in mine])[:, None, None, None]
    kernel = np.linspace(1e-6, 100e-6, 199)[None, :, None, None]
    mm_eff = np.linspace(0.02, 1.0, 99)[None, None, :, None]
    att_eff = np.linspace(0.02, 1.0, 50)[None, None, None, :] if stack == "hf" else mm_eff[..., None][..., 0]
    device = matmul / mm_eff + attention / att_eff + fixed_device
    predicted = np.maximum(launch * kernel, device) + pcie
    error = np.mean(np.abs(predicted - measured) / measured, axis=0)
    k, m, a = np.unravel_index(np.argmin(error), error.shape)
    attention_efficiency = float(att_eff[0, 0, 0, a]) if stack == "hf" else float(mm_eff[0, 0, m, 0])
    return Factors(seconds_per_kernel=float(kernel[0, k, 0, 0]), matmul_efficiency=float(mm_eff[0, 0, m, 0]),
                   attention_efficiency=attention_efficiency, bandwidth_efficiency=BANDWIDTH_EFFICIENCY)


def predicted_tok_s(run: Run, factors: Factors) -> float:
    seconds = step_seconds(architecture(resolve_model(run.model)), run.plan, resolve_gpu(GPU), factors)
    return run.plan.micro_batch * run.plan.seq_len / combine(seconds)


def evaluate(runs: list[Run] | None = None) -> dict:
    """Fit on the fitting set, predict every run; errors are (predicted - measured) / measured."""
    runs = runs if runs is not None else load_runs()
    fit, held = split(runs)
    factors = {stack: fit_factors(fit, stack) for stack in sorted({r.stack for r in runs})}
    rows = []
    for run in runs:
        predicted = predicted_tok_s(run, factors[run.stack])
        rows.append({"key": run.key, "stack": run.stack, "model": run.model, "seq": run.plan.seq_len,
                     "batch": run.plan.micro_batch, "measured_tok_s": round(run.tok_s, 1),
                     "predicted_tok_s": round(predicted, 1), "error": round((predicted - run.tok_s) / run.tok_s, 4),
                     "set": "fit" if run in fit else "held_out"})
    held_errors = [abs(r["error"]) for r in rows if r["set"] == "held_out"]
    return {
        "gpu": GPU,
        "factors": {stack: f.__dict__ for stack, f in factors.items()},
        "rows": rows,
        "held_out": {"count": len(held_errors), "mean_abs_error": round(statistics.mean(held_errors), 4),
                     "median_abs_error": round(statistics.median(held_errors), 4),
                     "max_abs_error": round(max(held_errors), 4)},
        "fit": {"count": len(fit)},
    }


def markdown(result: dict) -> str:
    lines = ["# Predicted vs measured tokens/s (H100)", "",
             "| stack | model | seq | batch | measured | predicted | error | set |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stack']} | {r['model']} | {r['seq']} | {r['batch']} | {r['measured_tok_s']:,.0f} | "
                     f"{r['predicted_tok_s']:,.0f} | {100 * r['error']:+.1f}% | {r['set']} |")
    held = result["held_out"]
    lines += ["", f"Held out: {held['count']} configurations, mean |error| {100 * held['mean_abs_error']:.1f}%, "
                  f"median {100 * held['median_abs_error']:.1f}%, "
                  f"max {100 * held['max_abs_error']:.1f}%.", "", "Factors:", ""]
    for stack, f in result["factors"].items():
        lines.append(f"- {stack}: {f['seconds_per_kernel'] * 1e6:.1f} µs per kernel, matmul {100 * f['matmul_efficiency']:.1f}%, "
                     f"attention {100 * f['attention_efficiency']:.1f}%, bandwidth {100 * f['bandwidth_efficiency']:.0f}% of peak")
    return "\n".join(lines) + "\n"


def calibration_file(result: dict, date: str) -> dict:
    return {
        "date": date,
        "gpu": "H100 80GB HBM3 (measured bf16 matmul 702-798 TFLOP/s, copy ~3.0 TB/s)",
        "source": "benchmarks/results/trainer_h100.jsonl (vramplan stack), benchmarks/results/hf_stack_h100.jsonl "
                  "(transformers + PEFT + bitsandbytes); fitted by benchmarks/throughput.py on the runs marked 'fit' "
                  "in benchmarks/results/throughput.json",
        "held_out": result["held_out"],
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
            runs.append(Run(f"fresh:{plan.model}:s{plan.seq_len}", "vramplan", plan.model, plan, record["tok_s"], record["step_s"]))
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
