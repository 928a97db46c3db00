"""``vramplan buy``: which GPUs can run a training job, how fast, and what it costs to finish."""

from __future__ import annotations

import datetime

import click

from vramplan.catalog import gpu_catalog_about, resolve_model
from vramplan.cli import main
from vramplan.cli.output import emit_json, gb, json_option, table
from vramplan.errors import VramplanError
from vramplan.host import REFERENCE_AUTOGRAD_OP_US
from vramplan.plan import STACKS, Plan


def _age(date: str) -> str:
    """``2026-11`` or ``2026-11-24`` and how many days old it is."""
    try:
        parts = [int(p) for p in str(date).split("-")] + [1, 1]
        then = datetime.date(parts[0], parts[1], parts[2])
    except (ValueError, IndexError):
        return f"dated {date}"
    days = (datetime.datetime.now(datetime.timezone.utc).date() - then).days
    return f"dated {date}, {days} days old"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"


def _duration(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _plan_text(plan: Plan | None) -> str:
    from vramplan.estimate import architecture
    from vramplan.stacks.vramplan import graphs_apply

    if plan is None:
        return ""
    ckpt = {"none": "no ckpt", "full": "ckpt", "offload": "ckpt+offload"}[plan.checkpointing]
    layout = {"none": "", "ddp": "ddp ", "fsdp": "fsdp+cpu " if plan.cpu_offload else "fsdp "}[plan.parallel]
    flat = " flat" if plan.steps_flat else ""
    graphs = " graphs" if graphs_apply(architecture(resolve_model(plan.model)), plan) else ""
    return f"{layout}{plan.quant} r{plan.lora_rank} b{plan.micro_batch}×{plan.grad_accum} {ckpt} {plan.optimizer}{flat}{graphs}"


def held_out_error_note(calib: dict) -> str:
    """The speed model's held-out error as measured, split where the calibration says how the steps ran: a step
    replayed as a CUDA graph hides the host's work behind the GPU's, an eager one (no "graphs" in its plan) is bound by
    the host, whose speed differs between machines of one GPU model."""
    def pct(stats: dict) -> str:
        return f"{100 * stats.get('mean_abs_error', float('nan')):.0f}% mean over {stats.get('count', '?')}"

    whole = f"held-out error {pct(calib.get('held_out', {}))} measured configurations"
    if "held_out_captured" not in calib or "held_out_eager" not in calib:
        return whole
    return (f"{whole}: {pct(calib['held_out_captured'])} whose steps replay as CUDA graphs, "
            f"{pct(calib['held_out_eager'])} eager (plans without \"graphs\", bound by the host's CPU; priced for a "
            f"host whose probe reads {REFERENCE_AUTOGRAD_OP_US:g} µs an op, where H100 machines read 21-42)")


@main.command()
@click.argument("model")
@click.option("--seq", type=int, default=2048, show_default=True, help="Sequence length in tokens.")
@click.option("--tokens", "tokens_text", default=None, help="Dataset size in tokens: 50M, 1.5B, 200k.")
@click.option("--data", "data_path", default=None, type=click.Path(dir_okay=False), help="A JSONL dataset to count.")
@click.option("--model", "tokenizer_dir", default=None, help="A model folder whose tokenizer counts --data's tokens.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Effective batch to keep.")
@click.option("--stack", type=click.Choice(STACKS), default="vramplan", show_default=True)
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Write cost vs hours as a PNG.")
@json_option
def buy(model, seq, tokens_text, data_path, tokenizer_dir, epochs, batch, stack, plot_path, as_json):
    """Which GPUs can train MODEL on a dataset, how fast, and the cost to finish."""
    from vramplan.buy import Job, dataset_tokens, parse_tokens, price_job
    from vramplan.throughput import calibration

    if (tokens_text is None) == (data_path is None):
        raise VramplanError("give the dataset's size: --tokens 50M, or --data FILE.jsonl (not both)")
    if not epochs > 0 or epochs > 1000:
        raise VramplanError(f"--epochs {epochs}: give a number of passes above 0 (at most 1000)")
    profile = resolve_model(model)
    base = Plan(model=profile.name, seq_len=seq, micro_batch=batch, stack=stack)
    if data_path:
        tokens, how = dataset_tokens(data_path, tokenizer_dir)
    else:
        tokens, how = parse_tokens(tokens_text), "given"
    job = Job(profile, base, tokens, epochs, how)
    options = price_job(job)
    about, calib = gpu_catalog_about(), calibration()
    notes = [f"prices and GPU figures: profiles/gpus.json, {_age(about.get('date', '?'))}",
             f"speed model: profiles/calibration/throughput/h100.json, {_age(calib.get('date', '?'))}, fitted on {calib.get('gpu', '?')}; "
             + held_out_error_note(calib),
             "boxes (2x, 4x, 8x): memory per GPU and the communication model are not yet measured on several GPUs; "
             "price = GPUs × the per-GPU price"]
    if how == "estimated from characters":
        notes.insert(0, f"dataset tokens ESTIMATED from characters (~4 characters per token): {tokens:,}; "
                        f"pass --model DIR with a tokenizer to count exactly")
    if plot_path:
        from vramplan.plot import plot_cost_time

        plot_cost_time(options, plot_path, title=f"{profile.name}, seq {seq}, {job.total_tokens / 1e6:,.1f}M tokens")
    if as_json:
        emit_json({"model": profile.name, "seq_len": seq, "tokens": tokens, "tokens_source": how, "epochs": epochs,
                   "total_tokens": job.total_tokens, "stack": stack, "prices_date": about.get("date"),
                   "prices_sources": about.get("sources", []),
                   "calibration_date": calib.get("date"), "notes": notes, "options": [o.to_dict() for o in options]})
        return
    click.echo(f"{profile.name}: {job.total_tokens:,.0f} tokens ({tokens:,} × {epochs:g} epochs, {how}) at seq {seq}, "
               f"stack {stack}")
    fitting = [o for o in options if o.fits]
    rows = [(o.gpu.name, gb(o.peak_bytes) + ("/GPU" if o.gpu.count > 1 else ""), _plan_text(o.plan), f"{o.tokens_per_s:,.0f}", _duration(o.hours),
             _money(o.cost_usd) + (f" ({o.cost_basis})" if o.cost_basis else ""),
             _money(o.gpu.rent_usd_per_hour and o.gpu.rent_usd_per_hour * o.gpu.count),
             _money(o.purchase_usd), ", ".join(o.marks)) for o in fitting]
    if rows:
        click.echo(table(rows, ["gpu", "peak", "plan", "tok/s", "time", "cost to finish", "rent/h", "buy", ""],
                         colalign=("left", "right", "left", "right", "right", "right", "right", "right", "left")))
    else:
        click.echo("No GPU in the catalog fits this job.")
    misfits = [o for o in options if not o.fits]
    if misfits:
        click.echo("\nDo not fit:")
        click.echo(table([(o.gpu.name, gb(o.gpu.memory_bytes), o.lacks) for o in misfits], ["gpu", "memory", "lacks"]))
    click.echo("")
    for note in notes:
        click.echo(f"note: {note}")
    if plot_path:
        click.echo(f"wrote {plot_path}")
