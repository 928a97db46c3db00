"""``vramplan check``: pre-flight for a job script. Exit 0 fits, 1 does not fit, 2 bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vramplan.cli import main
from vramplan.cli.output import emit_json, gb, json_option
from vramplan.errors import VramplanError
from vramplan.plan import read_plan


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _report(result, seq_len: int) -> list[str]:
    est = result.estimate
    verdict = "FITS" if result.fits else "does NOT fit"
    lines = [f"data: {result.worst.n_examples} examples, {result.worst.total_tokens} tokens, "
             f"{result.worst.n_micro_batches} micro-batches",
             result.worst.describe(seq_len),
             f"{verdict} {est.gpu or 'the budget'}: peak {gb(est.peak_bytes)} of {gb(result.budget_bytes)}, "
             f"headroom {gb(result.headroom_bytes)} ({result.headroom_percent:+.1f}%)"]
    if result.dry_run is not None:
        run = result.dry_run
        lines.append(f"dry run of that batch on this GPU: {'ran' if run.fitted else 'ran OUT OF MEMORY'}, "
                     f"process peak {gb(run.measured_process_bytes)} above the CUDA context"
                     + (f" ({run.error})" if run.error else ""))
    if result.tokens_per_s:
        lines.append(f"predicted {result.tokens_per_s:,.0f} tokens/s; one pass over the data in "
                     f"{_duration(result.seconds_to_finish)}"
                     + (f" ({result.host.describe()})" if result.host is not None else ""))
    lines += [f"note: {n}" for n in est.notes]
    if not result.fits:
        if result.nearest is not None:
            p = result.nearest.plan
            lines.append(f"nearest plan that fits: {p.quant}, rank {p.lora_rank}, seq {p.seq_len}, batch "
                         f"{p.micro_batch} × {p.grad_accum}, checkpointing {p.checkpointing}, {p.optimizer} "
                         f"(peak {gb(result.nearest.estimate.peak_bytes)}); write it with "
                         f"`vramplan fit {p.model} --gpu ... --seq {p.seq_len} --out plan.json`")
        else:
            lines.append(f"no plan fits: {result.nearest_error}")
    return lines


@main.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="The model folder: its tokenizer reads the data, its config.json is priced.")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="The training JSONL.")
@click.option("--gpu", default="auto", show_default=True, help="A catalog GPU (rtx-4060), a budget (12GB) or auto.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data, for the time to finish.")
@click.option("--overlong", type=click.Choice(("truncate", "drop")), default="truncate", show_default=True)
@click.option("--no-calibration", is_flag=True, help="Ignore stored calibrations.")
@click.option("--dry-run", is_flag=True, help="Also run the worst batch for real on this GPU (one step).")
@json_option
def check(plan_path, model_dir, data_path, gpu, epochs, overlong, no_calibration, dry_run, as_json):
    """Will PLAN fit this dataset's worst micro-batch? Exit 0 fits, 1 does not, 2 bad input."""
    from vramplan.calibration import apply_calibration, calibration_for
    from vramplan.catalog import resolve_model
    from vramplan.check import check_plan, load_tokenizer
    from vramplan.gpu import gpu_and_budget
    from vramplan.train.data import read_jsonl

    plan = read_plan(plan_path)
    if not Path(model_dir).is_dir():
        raise VramplanError(f"--model {model_dir} is not a folder; pass the model folder the plan trains")
    records = read_jsonl(data_path)  # the data first: a bad line fails before anything else loads
    profile = resolve_model(model_dir)
    spec, budget, driver = gpu_and_budget(gpu)
    calibration = None if no_calibration or spec is None or spec.kind == "budget" else \
        calibration_for(profile, plan.stack, spec.name, driver)
    if plan.multimodal:  # images and audio: the processor's parts count each example's real soft tokens
        from vramplan.train.mm_data import MMProcessor

        tokenizer = MMProcessor.from_pretrained(model_dir)
    else:
        tokenizer = load_tokenizer(model_dir)
    result = check_plan(plan, profile, records, tokenizer, spec, budget, epochs=epochs, overlong=overlong,
                        adjust=lambda est: apply_calibration(est, calibration)[0], data_path=data_path)
    if dry_run:
        result.dry_run = _dry_run(result, model_dir)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo("\n".join(_report(result, plan.seq_len)))
    sys.exit(result.exit_code)


def _dry_run(result, model_dir: str):
    from vramplan.calibrate import measure_run, refuse_if_over
    from vramplan.check import worst_batch_tensors
    from vramplan.gpu import detect_gpu

    refuse_if_over(result.estimate, detect_gpu().free_bytes)
    shaped = result.estimate.plan
    return measure_run(shaped, model_dir, steps=1, batch=worst_batch_tensors(result.worst, shaped.stack))
