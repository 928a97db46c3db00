"""``vramplan calibrate``: a few real steps of a plan on this GPU, predicted vs measured, stored as a correction."""

from __future__ import annotations

import sys

import click

from vramplan.calibrate import CalibrationResult, predicted_allocated_by_phase, run_calibration
from vramplan.cli import main
from vramplan.cli.output import emit_json, gb, json_option, table
from vramplan.plan import STACKS, read_plan

_PHASES = {"forward": "forward", "backward": "backward", "optimizer": "optimizer_step"}


def _pct(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%" if measured else "-"


def report_lines(result: CalibrationResult) -> list[str]:
    """Predicted vs measured: the load, each phase (torch's allocator) and the whole process (NVML)."""
    run, est = result.run, result.predicted
    lines = [f"{run.plan.model} on {result.key.gpu} ({result.key.stack} stack), batch {run.batch_shape[0]} × "
             f"{run.batch_shape[1]} tokens, {run.steps} step(s)"]
    if not run.fitted:
        lines.append(f"did NOT fit at {gb(result.gpu_free_bytes)} free: {run.error}; peak seen "
                     f"{gb(run.measured_process_bytes)} above the CUDA context "
                     f"(predicted {gb(result.predicted_above_context)})")
        return lines
    predicted_phases = predicted_allocated_by_phase(est)
    loaded = predicted_phases.get("load", 0)
    rows = [("after load (allocated)", gb(loaded), gb(run.after_load_allocated), _pct(loaded, run.after_load_allocated))]
    for measured_name, phase in _PHASES.items():
        if measured_name in run.allocated_by_phase:
            p, m = predicted_phases.get(phase, 0), run.allocated_by_phase[measured_name]
            rows.append((f"{measured_name} peak (allocated)", gb(p), gb(m), _pct(p, m)))
    total_p, total_m = result.predicted_above_context, run.measured_process_bytes
    rows.append(("process peak above CUDA context (NVML)", gb(total_p), gb(total_m), _pct(total_p, total_m)))
    if result.shorter_run is not None and result.shorter_predicted is not None:
        short, short_est = result.shorter_run, result.shorter_predicted
        label = f"  at half the sequence ({short.plan.seq_len} tokens)"
        if short.fitted:
            p = short_est.peak_bytes - short_est.components.get("cuda_context", 0)
            rows.append((label, gb(p), gb(short.measured_process_bytes), _pct(p, short.measured_process_bytes)))
        else:
            rows.append((label, "", "out of memory", ""))
    calibrated = result.calibrated
    if calibrated is not None:
        c = calibrated.peak_bytes - calibrated.components.get("cuda_context", 0)
        rows.append(("  calibrated prediction", gb(c), gb(total_m), _pct(c, total_m)))
    lines.append(table(rows, ["", "predicted", "measured", "error"], colalign=("left", "right", "right", "right")))
    if result.calibration is not None:
        lines.append(f"stored in {result.calibration.source}: {result.calibration.describe()}")
    if result.host is not None:
        lines.append(result.host.describe())
    return lines


@main.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The model folder to run (its config.json is what gets priced).")
@click.option("--stack", type=click.Choice(STACKS), default=None, help="Run with this stack (default: the plan's).")
@click.option("--steps", type=int, default=3, show_default=True, help="Optimizer steps to run.")
@click.option("--data", "data_path", default=None, type=click.Path(dir_okay=False),
              help="Run the dataset's worst micro-batch instead of random token ids.")
@click.option("--one-shape", is_flag=True,
              help="Measure only the plan's shape, not also half its sequence (one point: the correction is one ratio).")
@click.option("--no-store", is_flag=True, help="Measure and print only; keep no calibration point.")
@click.option("--also-in", "also_in", default=None, type=click.Path(file_okay=False),
              help="Also store the point in this folder (e.g. profiles/calibration, to commit it).")
@json_option
def calibrate(plan_path, model_dir, stack, steps, data_path, one_shape, no_store, also_in, as_json):
    """A short profiled dry run of PLAN on this GPU: predicted vs measured, stored as a correction.

    Runs the plan's shape and the same plan at half the sequence: two points separate the
    static bytes from the per-token ones, so the correction holds at other lengths too."""
    plan = read_plan(plan_path)
    if stack:
        plan = plan.replace(stack=stack, loss="full" if stack == "hf" else "chunked")
    batch = None
    if data_path:
        from vramplan.check import load_tokenizer, worst_batch_tensors, worst_micro_batch
        from vramplan.train.data import read_jsonl

        worst = worst_micro_batch(read_jsonl(data_path), load_tokenizer(model_dir), plan)
        batch = worst_batch_tensors(worst, plan.stack)
        plan = plan.replace(seq_len=worst.width, micro_batch=worst.rows)
    result = run_calibration(plan, model_dir, steps=steps, batch=batch, store=not no_store, also_in=also_in,
                             shapes=1 if one_shape else 2)
    if as_json:
        emit_json({"key": result.key.to_dict(), "predicted": result.predicted.to_dict(), "run": result.run.to_record(),
                   "shorter_run": result.shorter_run.to_record() if result.shorter_run else None,
                   "calibration": result.calibration.to_dict() if result.calibration else None,
                   "host": result.host.__dict__ if result.host is not None else None})
    else:
        click.echo("\n".join(report_lines(result)))
    if not result.run.fitted:
        sys.exit(1)
