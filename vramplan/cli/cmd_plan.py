"""``vramplan estimate`` and ``vramplan fit``: price a plan, or find the best one for a GPU."""

from __future__ import annotations

import click

from vramplan.catalog import GpuSpec, box_count, resolve_model
from vramplan.cli import main
from vramplan.cli.output import emit_json, gb, json_option, table
from vramplan.estimate import Estimate, estimate_plan
from vramplan.gpu import gpu_and_budget
from vramplan.plan import CHECKPOINTING, HEAD_QUANTS, LOSSES, OPTIMIZERS, QUANTS, STACKS, Plan

gpus_option = click.option("--gpus", type=click.IntRange(1, 64), default=None,
                           help="GPUs of the box (or name one: --gpu 2xrtx-4090); memory is then per GPU (per rank).")


def _box(spec: GpuSpec | None, gpus: int) -> GpuSpec | None:
    from vramplan.catalog import gpu_box

    return gpu_box(spec, gpus) if spec is not None else None


def _calibrated(profile, stack: str, spec: GpuSpec | None, driver: str | None, off: bool):
    """The correction for this GPU/family/stack, or None (``--no-calibration``, no GPU, or a bare budget)."""
    if off or spec is None or spec.kind == "budget":
        return None
    from vramplan.calibration import calibration_for

    return calibration_for(profile, stack, spec.name, driver)


def _adjust(calibration):
    from vramplan.calibration import apply_calibration

    return lambda est: apply_calibration(est, calibration)[0]


def multimodal_fields(modalities: str, images: int | None, seconds: float | None, train_parts: str) -> dict:
    """The plan fields of --modalities / --images-per-example / --audio-seconds / --train."""
    chosen = tuple(m.strip() for m in modalities.split(",") if m.strip())
    if "text" not in chosen:
        chosen = ("text", *chosen)
    if images is None:
        images = 1 if ("image" in chosen or "vision" in chosen) else 0
    if seconds is None:
        seconds = 10.0 if "audio" in chosen else 0.0
    return {"modalities": chosen, "images_per_example": images, "audio_seconds_per_example": seconds,
            "train_parts": tuple(p.strip() for p in train_parts.split(",") if p.strip())}


def _components_table(est: Estimate) -> str:
    total = est.peak_bytes or 1
    rows = [(name, gb(n), f"{100 * n / total:.1f}%") for name, n in sorted(est.components.items(), key=lambda kv: -kv[1])]
    rows.append(("peak per GPU" if est.plan.gpus > 1 else "peak", gb(est.peak_bytes), "100%"))
    return table(rows, ["component", "memory", "share"], colalign=("left", "right", "right"))


def _architecture(est: Estimate):
    from vramplan.estimate import architecture

    return architecture(resolve_model(est.plan.model))


def _soft_tokens(est: Estimate) -> str:
    from vramplan.memory.towers import soft_tokens

    if not est.plan.multimodal:
        return ""
    return f" + {soft_tokens(_architecture(est), est.plan)} soft tokens ({'/'.join(est.plan.modalities)})"


def _graphs(est: Estimate) -> str:
    from vramplan.stacks.vramplan import graphs_apply

    return ", CUDA graphs" if graphs_apply(_architecture(est), est.plan) else ""


def _summary(est: Estimate) -> str:
    lines = [f"{est.model}: {est.plan.quant}, rank {est.plan.lora_rank}, seq {est.plan.seq_len}{_soft_tokens(est)}, "
             f"batch {est.plan.micro_batch} × {est.plan.grad_accum}, checkpointing {est.plan.checkpointing}, "
             f"{est.plan.optimizer}, stack {est.plan.stack}" + (", int8 LM head" if est.plan.head_quant == "int8" else "")
             + (", computes in fp16" if est.plan.compute_dtype == "fp16" else "")
             + _graphs(est)
             + (", flat optimizer step" if "flat_optimizer" in est.components else "")
             + (f", MLPs in {est.plan.mlp_tiles} tiles" if est.plan.mlp_tiles > 1 else "") + _layout(est.plan),
             f"peak {gb(est.peak_bytes)} in the {est.peak_phase} phase "
             f"(" + ", ".join(f"{k} {gb(v)}" for k, v in est.phases.items()) + ")"]
    if est.budget_bytes is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        lines.append(f"{verdict} {est.gpu or 'the budget'}: budget {gb(est.budget_bytes)}, headroom {gb(est.headroom_bytes)}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def _layout(plan: Plan) -> str:
    if plan.gpus == 1:
        return ""
    name = {"ddp": "DDP", "fsdp": "FSDP2"}[plan.parallel] + (" with CPU offload" if plan.cpu_offload else "")
    return f", {name} on {plan.gpus} GPUs (memory per GPU)"


@main.command()
@click.argument("model")
@click.option("--quant", type=click.Choice(QUANTS), default="nf4", show_default=True)
@click.option("--head-quant", type=click.Choice(HEAD_QUANTS), default="bf16", show_default=True,
              help="The frozen token embedding / LM head: bf16, or int8 with one scale per vocabulary row.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--seq", type=int, default=2048, show_default=True, help="Sequence length in tokens.")
@click.option("--batch", type=int, default=1, show_default=True, help="Micro-batch size.")
@click.option("--accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--checkpointing", type=click.Choice(CHECKPOINTING), default="full", show_default=True)
@click.option("--optim", type=click.Choice(OPTIMIZERS), default="paged_adamw8bit", show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default=None, help="Default: chunked on vramplan, full on hf.")
@click.option("--attention", type=click.Choice(("sdpa", "eager")), default="sdpa", show_default=True)
@click.option("--lora-dtype", type=click.Choice(("fp32", "bf16")), default="fp32", show_default=True)
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="vramplan's trainer replays each step as a CUDA graph where it can (about 0.1 GB).")
@click.option("--flat-optimizer/--no-flat-optimizer", default=False, show_default=True,
              help="8-bit AdamW steps all adapters as one flat tensor (fewer host ops; 0.25 GB + 4 B a parameter).")
@click.option("--mlp-tiles", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run each gated MLP over the tokens in this many tiles (one tile's intermediates alive; one more MLP forward).")
@click.option("--stack", type=click.Choice(STACKS), default="vramplan", show_default=True)
@click.option("--modalities", default="text", show_default=True, help="What examples hold: text,image,audio (comma-separated).")
@click.option("--images-per-example", type=click.IntRange(min=0), default=None, help="Images per example (default 1 with image).")
@click.option("--audio-seconds", type=click.FloatRange(min=0), default=None, help="Seconds of audio per example (default 10 with audio).")
@click.option("--train", "train_parts", default="language", show_default=True, help="Where LoRA goes: language,vision,audio.")
@click.option("--gpu", default=None, help="A catalog GPU (rtx-4060), a box (2xrtx-4090), a budget (12GB) or auto.")
@gpus_option
@click.option("--parallel", type=click.Choice(("ddp", "fsdp")), default=None,
              help="On several GPUs: ddp (whole model per GPU, the default) or fsdp (FSDP2, weights sharded).")
@click.option("--cpu-offload", is_flag=True, help="FSDP2: keep the weight shards and LoRA state in CPU memory.")
@click.option("--no-calibration", is_flag=True, help="Ignore stored calibrations: the planner's own arithmetic.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Write a stacked-bar PNG.")
@json_option
def estimate(model, quant, head_quant, rank, seq, batch, accum, checkpointing, optim, loss, attention, lora_dtype,
             cuda_graphs, flat_optimizer, mlp_tiles, stack, gpu, gpus, parallel, cpu_offload, no_calibration, plot_path, as_json,
             modalities, images_per_example, audio_seconds, train_parts):
    """How much GPU memory a LoRA/QLoRA run of MODEL needs, component by component (per GPU on several)."""
    from vramplan.fit import in_gpu_arithmetic

    profile = resolve_model(model)
    spec, budget, driver = gpu_and_budget(gpu)
    count = box_count(spec, gpus)
    layout = (parallel or ("fsdp" if cpu_offload else "ddp")) if count > 1 else (parallel or "none")
    plan = Plan(model=profile.name, quant=quant, lora_rank=rank, seq_len=seq, micro_batch=batch, grad_accum=accum,
                checkpointing=checkpointing, optimizer=optim, attention=attention, lora_dtype=lora_dtype, stack=stack,
                loss=loss or ("full" if stack == "hf" else "chunked"), gpus=count, parallel=layout,
                cpu_offload=cpu_offload, head_quant=head_quant, cuda_graphs=cuda_graphs,
                flat_optimizer=flat_optimizer, mlp_tiles=mlp_tiles,
                **multimodal_fields(modalities, images_per_example, audio_seconds, train_parts))
    spec = _box(spec, count)
    plan = in_gpu_arithmetic(plan, spec)
    est = _adjust(_calibrated(profile, stack, spec, driver, no_calibration))(estimate_plan(plan, profile, spec, budget=budget))
    if plot_path:
        from vramplan.plot import plot_estimates

        plot_estimates([est], plot_path, spec)
    if as_json:
        emit_json(est.to_dict())
        return
    click.echo(_summary(est))
    click.echo(_components_table(est))


@main.command()
@click.argument("model")
@click.option("--gpu", required=True,
              help="A catalog GPU (rtx-4060), a box (2xrtx-4090), a budget (12GB) or auto (free memory now).")
@gpus_option
@click.option("--seq", type=int, default=2048, show_default=True, help="Sequence length to keep.")
@click.option("--batch", type=int, default=1, show_default=True, help="Effective batch to keep (micro-batch × accumulation).")
@click.option("--stack", type=click.Choice(STACKS), default="vramplan", show_default=True)
@click.option("--head-quant", type=click.Choice(HEAD_QUANTS), default=None,
              help="Pin the LM head's storage; by default bf16, int8 when nothing fits with a bf16 head.")
@click.option("--modalities", default="text", show_default=True, help="What examples hold: text,image,audio (comma-separated).")
@click.option("--images-per-example", type=click.IntRange(min=0), default=None, help="Images per example (default 1 with image).")
@click.option("--audio-seconds", type=click.FloatRange(min=0), default=None, help="Seconds of audio per example (default 10 with audio).")
@click.option("--train", "train_parts", default="language", show_default=True, help="Where LoRA goes: language,vision,audio.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Write the chosen plan as JSON.")
@click.option("--no-calibration", is_flag=True, help="Ignore stored calibrations: the planner's own arithmetic.")
@click.option("--calibrate", "calibrate_run", is_flag=True,
              help="Plan, measure the plan with a short dry run on this GPU (needs --model), correct, re-plan.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="The model folder to run for --calibrate.")
@json_option
def fit(model, gpu, gpus, seq, batch, stack, head_quant, out_path, no_calibration, calibrate_run, model_dir, as_json, modalities,
        images_per_example, audio_seconds, train_parts):
    """The best plan for MODEL that fits a GPU (or each GPU of a box), and why it was chosen."""
    from vramplan.fit import fit_plan

    profile = resolve_model(model)
    base = Plan(model=profile.name, seq_len=seq, micro_batch=batch, stack=stack, head_quant=head_quant or "bf16",
                **multimodal_fields(modalities, images_per_example, audio_seconds, train_parts))
    if calibrate_run:
        if gpus and gpus > 1:
            from vramplan.errors import VramplanError

            raise VramplanError("fit --calibrate measures one GPU; drop --gpus, or fit the box without --calibrate")
        result, spec, budget = _fit_calibrating(model_dir, gpu, base, as_json)
    else:
        spec, budget, driver = gpu_and_budget(gpu)
        count = box_count(spec, gpus)
        spec = _box(spec, count)
        base = base.replace(gpus=count, parallel="ddp" if count > 1 else "none")
        calibration = _calibrated(profile, stack, spec, driver, no_calibration)
        result = fit_plan(profile, spec, budget=budget, base=base, adjust=_adjust(calibration),
                          head_quants=(head_quant,) if head_quant else None)
    if out_path:
        from vramplan.atomic import write_json_atomic

        write_json_atomic(out_path, {"plan": result.plan.to_dict(), "peak_bytes": result.estimate.peak_bytes,
                                     "components": result.estimate.components, "gpu": _gpu_dict(spec, budget)})
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(_summary(result.estimate))
    click.echo(_components_table(result.estimate))
    click.echo("\nWhy this plan:")
    for line in result.explanation:
        click.echo(f"  - {line}")
    if out_path:
        click.echo(f"\nwrote {out_path}")


def _fit_calibrating(model_dir: str | None, gpu: str, base: Plan, quiet: bool):
    """`fit --calibrate`: measured on this machine's GPU, so only ``--gpu auto`` makes sense."""
    from vramplan.calibrate import fit_and_calibrate
    from vramplan.cli.cmd_calibrate import report_lines
    from vramplan.errors import VramplanError

    if not model_dir:
        raise VramplanError("fit --calibrate runs the plan for real: pass the model folder with --model DIR")
    if gpu.strip().lower() != "auto":
        raise VramplanError(f"fit --calibrate measures this machine's GPU; use --gpu auto, not --gpu {gpu}")
    first, measured, refit, spec = fit_and_calibrate(model_dir, base)
    if not quiet:
        click.echo("first plan, uncalibrated:")
        click.echo(_summary(first.estimate))
        click.echo("\ndry run of that plan:")
        for line in report_lines(measured):
            click.echo(f"  {line}")
        click.echo("\nre-planned with the correction:")
    return refit, spec, refit.budget_bytes


def _gpu_dict(spec: GpuSpec | None, budget: int | None) -> dict | None:
    if spec is None:
        return None
    return {"name": spec.name, "label": spec.label, "memory_bytes": spec.memory_bytes, "budget_bytes": budget,
            "count": spec.count}
