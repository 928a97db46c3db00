"""``vramplan train``: run a plan as a QLoRA fine-tune and write a PEFT adapter."""

from __future__ import annotations

import sys

import click

from vramplan.cli import main
from vramplan.cli.output import json_option, json_text
from vramplan.plan import CHECKPOINTING, HEAD_QUANTS, OPTIMIZERS, PARALLEL, read_plan


@main.command()
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Local Hugging Face model folder.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="Training JSONL.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Run folder: adapter/, checkpoint/, metrics.jsonl.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder from its last checkpoint.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps to run (default: one epoch).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Epochs to run instead of --steps.")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", "warmup_steps", type=click.IntRange(min=0), help="Warmup steps (default 3% of the steps).")
@click.option("--save-every", type=click.IntRange(min=1), help="Write a checkpoint every N steps.")
@click.option("--overlong", type=click.Choice(["truncate", "drop"]), default="truncate", show_default=True,
              help="What to do with examples longer than the plan's seq_len.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--merge", is_flag=True, help="Also export base + adapter merged, in bf16.")
@click.option("--skip-check", is_flag=True, help="Train even if the planner predicts the plan will not fit the GPU.")
@click.option("--rank", type=click.IntRange(min=1), help="Override the plan's LoRA rank.")
@click.option("--seq", type=click.IntRange(min=1), help="Override the plan's seq_len.")
@click.option("--batch", type=click.IntRange(min=1), help="Override the plan's micro-batch.")
@click.option("--accum", type=click.IntRange(min=1), help="Override the plan's gradient accumulation.")
@click.option("--checkpointing", type=click.Choice(CHECKPOINTING), help="Override the plan's checkpointing.")
@click.option("--optim", type=click.Choice(OPTIMIZERS), help="Override the plan's optimizer.")
@click.option("--head-quant", type=click.Choice(HEAD_QUANTS), help="Override the plan's LM head storage (bf16 or int8).")
@click.option("--train", "train_parts", help="Where LoRA goes: language,vision,audio (override the plan's train_parts).")
@click.option("--targets", help="What LoRA adapts: attention,mlp,experts (an MoE's routed experts, NF4 only) or module names "
              "(override the plan's lora_targets).")
@click.option("--train-projectors/--freeze-projectors", default=None, help="Train the image/audio projectors in full.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Override the plan: replay each micro-batch step as a CUDA graph (one GPU, text, checkpoints on the GPU).")
@click.option("--flat-optimizer/--no-flat-optimizer", default=None,
              help="Override the plan: 8-bit AdamW steps all adapters as one flat tensor (not for Gemma 4).")
@click.option("--mlp-tiles", type=click.IntRange(min=1), help="Override the plan: run each gated MLP over the tokens in N tiles.")
@click.option("--gpus", type=click.IntRange(min=1), help="Override the plan's GPU count (1: one process, no torchrun).")
@click.option("--parallel", type=click.Choice(PARALLEL), help="Override the plan's multi-GPU mode (ddp or fsdp).")
@json_option
def train(plan_file, model_dir, data_file, output, resume, steps, epochs, lr, schedule, warmup_steps, save_every,
          overlong, seed, merge, skip_check, rank, seq, batch, accum, checkpointing, optim, head_quant, train_parts,
          targets, train_projectors, cuda_graphs, flat_optimizer, mlp_tiles, gpus, parallel, as_json):
    """Fine-tune MODEL on DATA with the settings of PLAN_FILE; write a PEFT adapter to OUTPUT/adapter.

    A plan for several GPUs starts ``torchrun --nproc-per-node N -m vramplan train ...`` itself;
    started by torchrun already, the launch's world size is the one that counts."""
    from vramplan.errors import VramplanError
    from vramplan.memory.towers import lora_targets_from
    from vramplan.train import distributed
    from vramplan.train.recipe import TrainConfig
    from vramplan.train.allocator import prefer_expandable_segments
    from vramplan.train.recipe import train as run

    prefer_expandable_segments()  # before the first CUDA allocation; torchrun's ranks inherit it

    if steps and epochs:
        raise VramplanError("give --steps or --epochs, not both")
    overrides = {"lora_rank": rank, "seq_len": seq, "micro_batch": batch, "grad_accum": accum,
                 "checkpointing": checkpointing, "optimizer": optim, "head_quant": head_quant, "train_projectors": train_projectors,
                 "cuda_graphs": cuda_graphs, "flat_optimizer": flat_optimizer, "mlp_tiles": mlp_tiles,
                 "train_parts": tuple(p.strip() for p in train_parts.split(",") if p.strip()) if train_parts else None,
                 "lora_targets": lora_targets_from(targets) if targets else None}
    plan = read_plan(plan_file).replace(**{k: v for k, v in overrides.items() if v is not None})
    if gpus is not None or parallel is not None:
        plan = plan.replace(**distributed.layout(plan, gpus, parallel))
    if (plan.gpus > 1 or plan.parallel == "fsdp") and not distributed.under_torchrun():
        sys.exit(distributed.launch(plan.gpus, _command_line(click.get_current_context())))
    cfg = TrainConfig(plan=plan, model_dir=model_dir, data=data_file, output=output, resume=resume, steps=steps,
                      epochs=epochs, lr=lr, schedule=schedule, warmup_steps=warmup_steps, save_every=save_every,
                      overlong=overlong, seed=seed, merge=merge, skip_check=skip_check)
    summary = distributed.run_rank(lambda: run(cfg)) if distributed.under_torchrun() else run(cfg)
    code = summary.get("exit_code", 0)  # 130 / 143 after a stop on SIGINT / SIGTERM, 128 + its number
    if summary.get("rank", 0) == 0:
        if as_json:  # the progress bar and the run's notes went to stderr: stdout holds the JSON alone
            text = json_text(summary)
        elif summary["interrupted"]:
            text = (f"stopped after {summary['steps']} steps ({summary['signal'] or 'stop_after'}); checkpoint in "
                    f"{output}/checkpoint (continue with --resume {output})")
        else:
            text = f"done: {summary['steps']} steps, last loss {summary['loss']:.4f}; adapter in {output}/adapter"
        if not (summary["interrupted"] and distributed.report_stop(code, text)):  # the launcher prints a stop's line
            click.echo(text)
    if distributed.under_torchrun():
        distributed.finish(code)
    if code:
        sys.exit(code)


def _command_line(ctx: click.Context) -> list[str]:
    """``train`` and the arguments this invocation was given, as the ranks' command line."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
            elif value is False and param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif value is not None and value != param.default:
            args += [param.opts[0], str(value)]
    return args
