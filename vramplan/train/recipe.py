"""The QLoRA training recipe, top to bottom: config -> data -> model -> optimizer -> loop -> adapter.

No trainer class hides the loop: read ``train`` from the first line to the last and you have
read the run. Everything it calls is a small function in this package.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vramplan.errors import VramplanError
from vramplan.plan import Plan
from vramplan.stacks.vramplan import fsdp_torch_adamw_reason
from vramplan.train import adapter, checkpoint, data, distributed, metrics, stopping, switches
from vramplan.train.graphs import WIDTH_BUCKETS, StepGraphs
from vramplan.train.loss import accumulate_gradients
from vramplan.train.loss_scale import LossScale, for_dtype
from vramplan.train.model import compute_dtype, load_for_training, lora_parameters, read_config
from vramplan.train.optim import (FusedAdamW8bit, FusedShardedAdamW8bit, eight_bit_adamw, flat_update_pays,
                                  fused_update_applies, queues_whole)

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    plan: Plan
    model_dir: str
    data: str
    output: str
    resume: str | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 3% of the steps
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int | None = None
    log_every: int = 1
    overlong: str = "truncate"
    seed: int = 0
    merge: bool = False
    skip_check: bool = False  # train even when the planner says the plan will not fit
    device: str | None = None
    host_per_layer_embeddings: bool | None = None  # Gemma 4's per-layer tables in host memory; None: yes on a GPU
    stop_after: int | None = None  # stop at this step with a checkpoint, as Ctrl-C would (time-limited jobs)
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def planned_peak_bytes(plan: Plan, model_dir: str) -> int | None:
    """The planner's predicted peak (CUDA context included) for this plan on this model folder's
    architecture, as this trainer runs it; None when the folder's config cannot be read."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import estimate_plan

    try:
        profile = resolve_model(model_dir)
    except VramplanError:
        return None
    return estimate_plan(plan.replace(stack="vramplan"), profile).peak_bytes


def check_plan_fits(plan: Plan, model_dir: str, device: torch.device) -> None:
    """Refuse, before anything loads, a plan the planner says will not fit the GPU's free memory.

    Flags may have overridden the plan that `fit` chose, so it is priced again here.
    """
    if device.type != "cuda":
        return
    from vramplan.gpu import detect_gpu

    planned = planned_peak_bytes(plan, model_dir)
    free = detect_gpu(device.index or 0).free_bytes
    if planned is not None and planned > free:
        raise VramplanError(
            f"this plan needs {planned / 1e9:.2f} GB at its peak but the GPU has {free / 1e9:.2f} GB free "
            f"({(planned - free) / 1e9:.2f} GB short); lower --seq/--batch/--rank, use --checkpointing offload, "
            "re-plan with `vramplan fit`, or pass --skip-check to try anyway")


def make_optimizer(params: list[torch.nn.Parameter], plan: Plan, lr: float, weight_decay: float, device: torch.device,
                   sharded: bool = False, flat: bool = False):
    """bitsandbytes 8-bit AdamW (paged: states move to the host under pressure) or torch AdamW;
    the fused 8-bit AdamW (``FusedAdamW8bit``, never paged) where ``fused_update_applies``.

    Under FSDP (``sharded``) the LoRA parameters are DTensor shards, which bitsandbytes does not
    take: 8-bit plans step ``FusedShardedAdamW8bit`` on the shards where ``fused_update_applies``
    (as the planner prices them: ``stacks.vramplan.stepped_optimizer``), else torch AdamW (its fp32
    states sharded N ways).

    Returns (optimizer, note); the note says when the plan's optimizer could not run here and
    torch AdamW stands in (bitsandbytes' 8-bit optimizers need its native library for the device,
    and plain tensors), or that a paged plan runs unpaged.
    """
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), None
    if sharded:
        if fused_update_applies(plan, sharded=True):
            note = (f"optimizer {plan.optimizer} under FSDP: the fused 8-bit AdamW steps the shards, its states not paged"
                    if plan.optimizer == "paged_adamw8bit" else None)
            return FusedShardedAdamW8bit(params, lr=lr, weight_decay=weight_decay), note
        note = (f"optimizer {plan.optimizer} does not take FSDP-sharded parameters {fsdp_torch_adamw_reason(plan)}; "
                "using torch AdamW (states sharded too)")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), note
    if fused_update_applies(plan):
        return FusedAdamW8bit(params, lr=lr, weight_decay=weight_decay), None
    cls = eight_bit_adamw(paged=plan.optimizer == "paged_adamw8bit", flat=flat)
    if device.type != "cuda" and not _optimizer_steps_on(cls, device):
        note = f"optimizer {plan.optimizer} does not run on the {device.type} here; using torch AdamW"
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), note
    return cls(params, lr=lr, weight_decay=weight_decay), None


def _optimizer_steps_on(cls, device: torch.device) -> bool:
    """Whether one step of ``cls`` runs on ``device`` (bitsandbytes' CPU support depends on its build)."""
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit state starts at 4,096 elements
    probe.grad = torch.ones_like(probe)
    try:
        cls([probe], lr=1e-3).step()
        return True
    except Exception:  # any failure of the native library means: not here
        return False


def make_scheduler(optimizer, schedule: str, warmup: int, total: int):
    """Linear warmup to the peak LR, then cosine or linear decay to zero (or constant)."""
    if schedule not in SCHEDULES:
        raise VramplanError(f"--schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def next_micro_batches(dataset: data.Dataset, state: checkpoint.TrainState, plan: Plan, seed: int,
                       rank: int = 0, world: int = 1, collate=None, width_buckets: int | None = None) -> tuple[list[dict], int]:
    """This rank's micro-batches of the next optimizer step and the tokens of the whole global batch,
    advancing the data position in ``state``.

    Every rank reads the same order: each global micro-batch is the next ``micro_batch × world``
    rows, and rank r takes rows [r·m, (r+1)·m) of it. So the ranks never repeat a row, and N ranks
    with micro-batch m train on exactly the rows (and gradient) of one rank with micro-batch N·m.
    At an epoch's end a short global micro-batch is split as far as it goes (a rank may get fewer rows).
    ``collate`` (rows -> batch) defaults to the text collate; multimodal runs (one rank) pass theirs.
    ``width_buckets``: pad each micro-batch to one of that many widths (``data.bucketed_width``),
    so captured CUDA graphs see few shapes; the token count stays the real one.
    """
    micro, tokens = [], 0
    for _ in range(plan.grad_accum):
        order = data.epoch_order(len(dataset.rows), seed, state.epoch)
        rows = [dataset.rows[i] for i in order[state.cursor:state.cursor + plan.micro_batch * world]]
        state.cursor += len(rows)
        if state.cursor >= len(order):
            state.epoch, state.cursor = state.epoch + 1, 0
        share = -(-len(rows) // world)  # ceil: on a short tail the last ranks get fewer rows (never none, see below)
        slices = [rows[r * share:(r + 1) * share] or rows[-1:] for r in range(world)]
        widths = [max(map(data.row_length, s)) for s in slices]
        tokens += sum(len(s) * width for s, width in zip(slices, widths))
        stand_in = not rows[rank * share:(rank + 1) * share]
        width = data.bucketed_width(widths[rank], dataset.seq_len, width_buckets) if width_buckets else None
        micro.append(collate(slices[rank]) if collate else
                     data.collate(slices[rank], dataset.pad_token_id, no_targets=stand_in, width=width))
    return micro, tokens


def multimodal_seq_len(plan: Plan, model_dir: str) -> int:
    """A row's budget with images / audio: the plan's text tokens plus the soft tokens the plan counts per example."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture
    from vramplan.memory.towers import decoder_seq_len

    return decoder_seq_len(architecture(resolve_model(model_dir)), plan)


def total_steps(cfg: TrainConfig, dataset: data.Dataset, world: int = 1) -> int:
    if cfg.steps is not None:
        return cfg.steps
    rows_per_step = cfg.plan.micro_batch * cfg.plan.grad_accum * world
    return max(1, math.ceil((cfg.epochs or 1.0) * len(dataset.rows) / rows_per_step))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> dict:
    """Run the recipe; return a summary (steps, final loss, paths).

    Under torchrun every rank runs this same function (``distributed``): the launch's world size
    wins over the plan's ``gpus``, so a run may resume on another number of GPUs.
    """
    if cfg.merge and cfg.plan.multimodal:
        raise VramplanError("--merge exports text models so far; drop --merge (the adapter loads with peft onto the multimodal model)")
    world, device = distributed.start(cfg.plan.parallel, cfg.device)
    plan = cfg.plan.replace(**distributed.layout(cfg.plan, world.size,
                                                 world.parallel if world.size > 1 or world.sharded else None))
    out = Path(cfg.output)
    if (world.size > 1 or world.sharded) and plan.multimodal:
        raise VramplanError("multimodal training runs on one GPU so far; train the text parts on several, or set gpus 1")
    if not world.is_main:  # one progress bar and one set of notes: rank 0's
        cfg = dataclasses.replace(cfg, progress=False)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    seed_everything(cfg.seed)

    # 1. Data first: a malformed line fails in seconds, before the model (or even its tokenizer) loads.
    from transformers import AutoTokenizer

    records = data.read_jsonl(cfg.data)
    read_config(cfg.model_dir)
    if plan.multimodal:  # images / audio: rendered with the processor's parts, every file opened now
        from vramplan.train import mm_data, multimodal

        processor = mm_data.MMProcessor.from_pretrained(cfg.model_dir)
        dataset = mm_data.build_dataset(cfg.data, processor, multimodal_seq_len(plan, cfg.model_dir), cfg.overlong, records=records)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        dataset = data.build_dataset(cfg.data, tokenizer, plan.seq_len, cfg.overlong, records=records)
    steps = total_steps(cfg, dataset, world.size)
    _say(cfg, f"data: {dataset.n_examples} examples packed into {len(dataset.rows)} rows of at most {plan.seq_len} tokens; "
              f"{dataset.n_truncated} truncated, {dataset.n_dropped} dropped (--overlong {cfg.overlong})")
    if world.size > 1:
        _say(cfg, f"{world.size} ranks ({world.parallel}): {plan.micro_batch * plan.grad_accum * world.size} rows per step")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * steps)

    if not cfg.skip_check:
        check_plan_fits(plan, cfg.model_dir, device)

    # 2. Model: quantized layer by layer on the device, LoRA on the targets, the rest frozen;
    #    under FSDP each layer is sharded as soon as it is quantized.
    sharded = world.sharded
    if plan.multimodal:
        model, adapted = multimodal.load_for_training(cfg.model_dir, plan, device, cfg.host_per_layer_embeddings)
        params = multimodal.trainable_parameters(model, plan)
    else:
        model, adapted = load_for_training(cfg.model_dir, plan, device, cfg.host_per_layer_embeddings,
                                           after_layer=distributed.layer_sharder(plan) if sharded else None)
        params = lora_parameters(model)
    for param in params:
        param.requires_grad_(True)
    trainee = distributed.wrap(model, world, device, offload=plan.cpu_offload)
    if not plan.multimodal:
        params = lora_parameters(model)  # after wrapping: FSDP2 replaces them with their shards

    # 3. Optimizer and schedule.
    optimizer, note = make_optimizer(params, plan, cfg.lr, cfg.weight_decay, device, sharded=sharded,
                                     flat=flat_update_pays(model, plan))
    if note:
        cfg.notes.append(note)
        _say(cfg, f"note: {note}")
    scheduler = make_scheduler(optimizer, cfg.schedule, warmup, steps)
    graphs = StepGraphs.for_run(model, params, plan, device, world.size)

    # 4. Resume: LoRA weights, optimizer, scheduler, RNG and the data position.
    state = checkpoint.TrainState()
    if cfg.resume:
        state = checkpoint.load_checkpoint(Path(cfg.resume) / "checkpoint", model, optimizer, scheduler)
    scaler = for_dtype(compute_dtype(plan, device))  # fp16 steps only
    if scaler is not None and state.loss_scale:
        scaler = LossScale.from_state_dict(state.loss_scale)
    log = metrics.MetricsLog(out / "metrics.jsonl") if world.is_main else None
    if log is not None:
        log.drop_after(state.step)
    def save() -> None:
        if scaler is not None:  # fp16: the scale goes with the checkpoint, so a resumed run keeps it
            state.loss_scale = scaler.state_dict()
        checkpoint.save_checkpoint(out / "checkpoint", model, plan, cfg.model_dir, optimizer, scheduler, state,
                                   main=world.is_main)

    # 5. The loop.
    collate = (lambda rows: mm_data.collate(rows, dataset.pad_token_id, processor)) if plan.multimodal else None
    bar = _progress(cfg, steps, state.step)
    loss = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stopped, saved_at = 0, None
    # SIGINT/SIGTERM only ask to stop: the ranks agree at a step boundary and save together (stopping.py);
    # a rank under torchrun keeps the handlers until it exits, so torchrun's SIGTERM cannot cut its report short
    with stopping.StopRequests(announce=world.is_main, keep=distributed.under_torchrun()) as requests:
        try:
            while state.step < steps:
                started = time.perf_counter()
                local, tokens = next_micro_batches(dataset, state, plan, cfg.seed, world.rank, world.size, collate,
                                                   width_buckets=WIDTH_BUCKETS if graphs is not None else None)
                micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in local]
                loss, n_targets, grad_norm = train_step(model, micro_batches, optimizer, params, cfg.max_grad_norm,
                                                        state.step, device, trainee=trainee, graphs=graphs,
                                                        scheduler=scheduler, scaler=scaler)
                state.step += 1
                state.tokens_seen += tokens
                seconds = time.perf_counter() - started
                record = {"step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "target_tokens": n_targets, "tokens_per_s": tokens / seconds, **metrics.memory_stats()}
                if scaler is not None:  # fp16: the scale, and how many backward passes overflowed so far (each run again)
                    record["loss_scale"], record["loss_scale_overflows"] = scaler.scale, scaler.overflows
                if log is not None and (state.step % cfg.log_every == 0 or state.step == steps):
                    log.write(record)
                _update_progress(bar, record)
                if cfg.save_every and state.step % cfg.save_every == 0:
                    save()
                    saved_at = state.step
                if state.step < steps:
                    stopped = requests.agreed(world.size, device)
                    if stopped or (cfg.stop_after is not None and state.step >= cfg.stop_after):
                        break
            interrupted = state.step < steps
            if not interrupted or saved_at != state.step:
                save()
            # (6.) the adapter's weights, gathered on every rank under FSDP
            weights = None if interrupted else adapter.lora_state_dict(model)
        except KeyboardInterrupt:  # a second Ctrl-C: whatever was under way (a step, a save) is dropped
            kept = (out / "checkpoint" / checkpoint.STATE_FILE).is_file()
            raise stopping.Aborted(f"stopped at once at step {state.step} (Ctrl-C twice); " + (
                f"the last checkpoint is kept in {out / 'checkpoint'} (continue with --resume {out})" if kept
                else "no checkpoint was written")) from None
        except torch.cuda.OutOfMemoryError:
            measured = torch.cuda.max_memory_allocated()
            planned = planned_peak_bytes(plan, cfg.model_dir)
            predicted = f"the plan predicted {planned / 1e9:.2f} GB" if planned else "no prediction for this plan"
            where = f" on rank {world.rank}" if world.size > 1 else ""
            raise VramplanError(f"CUDA out of memory at step {state.step + 1}{where}: measured peak {measured / 1e9:.2f} GB, {predicted}; "
                                "lower --seq or --batch, or use --checkpointing offload (the last checkpoint is kept)") from None
        finally:
            _close(bar)
            if graphs is not None:
                for note in graphs.notes + [graphs.summary()]:
                    cfg.notes.append(note)
                    _say(cfg, f"note: {note}")
    distributed.stop()
    if interrupted:  # a signal (agreed by every rank) or stop_after: the checkpoint is written
        return {"steps": state.step, "loss": loss, "interrupted": True, "output": str(out), "notes": cfg.notes,
                "rank": world.rank, "signal": signal.Signals(stopped).name if stopped else None,
                "exit_code": stopping.exit_code(stopped) if stopped else 0}

    # 6. The adapter, the loss curve and (optionally) a merged model: rank 0 writes.
    if not world.is_main:
        return {"steps": state.step, "loss": loss, "interrupted": False, "output": str(out), "notes": cfg.notes,
                "rank": world.rank}
    checkpoint.write_dir_atomic(out / "adapter", lambda folder: adapter.write_adapter(folder, model, plan, cfg.model_dir, weights))
    records = log.read()
    if records:
        metrics.plot_loss(records, out / "loss.png")
    if cfg.merge:
        export_merged(cfg.model_dir, out / "adapter", out / "merged", plan)
    return {"steps": state.step, "loss": loss, "interrupted": False, "output": str(out), "adapted_modules": len(adapted),
            "examples": dataset.n_examples, "truncated": dataset.n_truncated, "dropped": dataset.n_dropped,
            "notes": cfg.notes}


def export_merged(model_dir: str, adapter_dir: Path, folder: Path, plan: Plan) -> None:
    """bf16 base + scale·B·A written as a plain Hugging Face model (from the original bf16 weights, on the CPU)."""
    from transformers import AutoTokenizer

    from vramplan.train.model import load_base_model

    base = load_base_model(model_dir, torch.bfloat16, plan.attention)
    adapter.merge_into_base(base, adapter.read_adapter_weights(adapter_dir), plan.alpha / plan.lora_rank)
    base.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)


def train_step(model, micro_batches: list[dict], optimizer, params: list, max_grad_norm: float, done: int,
               device: torch.device, trainee=None, graphs=None, scheduler=None,
               scaler: LossScale | None = None) -> tuple[float, int, float]:
    """One optimizer step: forward + backward over the micro-batches, clipping, the step; returns (mean
    token loss, target tokens, gradient norm) once the GPU has finished it.

    Overlapped (switch ``overlap_optimizer``, on by default) the loss and the norm are read only after
    the step is queued, so the host runs the optimizer's per-tensor Python while the GPU finishes the
    backward instead of after it; a non-finite one still raises before anything is saved. With
    ``scaler`` (fp16 steps) the gradients are unscaled before clipping and their norm is read before the
    update: where they overflowed, the scale is halved and the same micro-batches run again, so every
    step updates (``loss_scale``). Until a step has updated, the scale is sought on the first micro-batch alone.
    """
    overlap = switches.enabled("overlap_optimizer")
    queued = overlap and switches.enabled("queued_optimizer") and queues_whole(optimizer)
    seeking = scaler is not None and not scaler.settled and len(micro_batches) > 1
    while True:
        loss, n_targets = accumulate_gradients(model, micro_batches[:1] if seeking else micro_batches, trainee,
                                               graphs=graphs, wait=not overlap,
                                               loss_scale=scaler.scale if scaler is not None else 1.0)
        if not overlap:
            _finite("loss", loss, done, scaler)
        if scaler is not None:
            scaler.unscale_(params)
        if isinstance(optimizer, (FusedAdamW8bit, FusedShardedAdamW8bit)):
            # the norm stays on the device until after the step, which skips itself if it is not finite
            grad_norm = optimizer.clip_grad_norm_(max_grad_norm)
        else:
            grad_norm = distributed.clip_gradients(params, max_grad_norm)
            if scaler is None and not overlap:
                grad_norm = _finite("gradient", float(grad_norm), done)
        if scaler is None or math.isfinite(grad_norm := float(grad_norm)):  # fp16: one early read
            if not seeking:
                break
            seeking = False  # the scale holds on one micro-batch: now the whole step
        else:
            scaler.update(False, done)  # halved (or the run ends with the fix named), and the same batches again
        _zero_gradients(optimizer, queued, graphs)
    if queued:  # bitsandbytes' loop without its last sync, and one foreach zeroing: the wait is the one below
        optimizer.step(sync=False)
    else:
        optimizer.step()
    _zero_gradients(optimizer, queued, graphs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if overlap:
        loss, n_targets = _finite("loss", float(loss), done, scaler), int(n_targets)
    grad_norm = float(grad_norm)
    if scaler is not None:
        scaler.update(True, done)
    if scheduler is not None:  # after the wait: stepping it is host work
        scheduler.step()
    return loss, n_targets, _finite("gradient", grad_norm, done)


def _zero_gradients(optimizer, queued: bool, graphs) -> None:
    if queued and graphs is not None:
        optimizer.zero_grad_queued()
    else:
        optimizer.zero_grad(set_to_none=graphs is None)  # captured graphs add into the gradients they hold


def _finite(what: str, value: float, done: int, scaler: LossScale | None = None) -> float:
    """``value`` (the step's loss or gradient norm), or the run's end with the step named."""
    if not math.isfinite(value):
        fix = ("the model's activations overflow fp16 here; train on a GPU with bf16 arithmetic (compute capability "
               "8.0 or newer), or lower --lr" if scaler is not None else "lower --lr")
        raise VramplanError(f"the {what} became {value} at step {done + 1}; {fix} (the last checkpoint is kept)")
    return value


def _say(cfg: TrainConfig, line: str) -> None:
    if cfg.progress:
        print(line, file=sys.stderr)


def _progress(cfg: TrainConfig, steps: int, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc="train", unit="step")


def _update_progress(bar, record: dict) -> None:
    if bar is None:
        return
    peak = record.get("peak_allocated")
    scale = {"scale": f"{record['loss_scale']:g}"} if "loss_scale" in record else {}  # fp16 steps
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    peak=f"{peak / 1e9:.2f}GB" if peak else "-", **scale)
    bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
