"""vramplan's trainer on several GPUs (DDP or FSDP2): tokens/s and per-rank peak memory next to the plan's prediction.

Run once per GPU count, appending to the same file; each line after the first of a (model,
parallel, seq) series carries the scaling efficiency tok/s(N) / (N/N0 · tok/s(N0)) against the
smallest count N0 measured (1 when there is a 1-GPU line):

    torchrun --nproc-per-node 1 -m benchmarks.multigpu --model llama-3.1-8b --parallel ddp --seq 2048 --steps 6 --out $OUT/multigpu.jsonl
    torchrun --nproc-per-node 2 -m benchmarks.multigpu --model llama-3.1-8b --parallel ddp --seq 2048 --steps 6 --out $OUT/multigpu.jsonl
    torchrun --nproc-per-node 2 -m benchmarks.multigpu --model llama-3.3-70b --parallel fsdp --seq 2048 --steps 6 --cap-gb 24 --out $OUT/multigpu.jsonl

The weights are random and never exist whole anywhere: the model is built on the ``meta``
device and every rank materialises one decoder layer at a time on its GPU with a fixed seed,
quantizes it and (FSDP) shards it (``load_for_training(random_init_from_config=True)``). The
steps are the recipe's own: ``distributed.wrap``, ``make_optimizer``, ``accumulate_gradients``,
``distributed.clip_gradients``. ``--model`` also takes a folder with a config.json, so a tiny
model smoke-tests the whole path on the CPU under gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.harness import random_batch
from vramplan.catalog import resolve_model
from vramplan.plan import Plan
from vramplan.train import distributed
from vramplan.train.loss import accumulate_gradients
from vramplan.train.metrics import process_memory_bytes
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.optim import flat_update_pays
from vramplan.train.recipe import make_optimizer, seed_everything


def config_folder(model: str) -> tuple[str, dict]:
    """A folder holding the model's config.json (a profile's, written to a temporary folder) and that config."""
    if Path(model, "config.json").is_file():
        return model, json.loads(Path(model, "config.json").read_text())
    config = {k: v for k, v in resolve_model(model).config.items() if not k.startswith("_")}
    folder = tempfile.mkdtemp(prefix="vramplan-multigpu-")
    Path(folder, "config.json").write_text(json.dumps(config))
    return folder, config


def prediction(plan: Plan, model: str) -> dict:
    """The planner's per-rank peak for this plan (its components too); the error when it cannot say."""
    from vramplan.estimate import estimate_plan

    try:
        estimate = estimate_plan(plan, resolve_model(model))
    except Exception as err:  # noqa: BLE001: the measurement stands without a prediction
        return {"predicted_error": f"{type(err).__name__}: {err}"}
    return {"predicted_peak_bytes": estimate.peak_bytes, "predicted_components": dict(estimate.components)}


def batch_of(plan: Plan, vocab: int, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    return random_batch(vocab, plan.micro_batch, plan.seq_len, device, seed=1000 + rank)  # each rank its own rows


def measure(args, world: distributed.World, device: torch.device) -> dict:
    folder, config = config_folder(args.model)
    plan = Plan(model=args.model, seq_len=args.seq, micro_batch=args.batch, lora_rank=args.rank,
                checkpointing=args.checkpointing, optimizer="adamw" if world.parallel == "fsdp" else args.optim, gpus=world.size,
                parallel=world.parallel, cpu_offload=args.cpu_offload and world.parallel == "fsdp")
    sharded = world.sharded
    cuda = device.type == "cuda"
    if cuda:
        if args.cap_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model, _ = load_for_training(folder, plan, device, after_layer=distributed.layer_sharder(plan) if sharded else None,
                                 random_init_from_config=True, seed=0)
    trainee = distributed.wrap(model, world, device, offload=plan.cpu_offload)
    params = lora_parameters(model)
    optimizer, note = make_optimizer(params, plan, 2e-4, 0.0, device, sharded=sharded, flat=flat_update_pays(model, plan))
    record = {"load_s": round(time.perf_counter() - started, 1), "optimizer_note": note,
              "load_peak_alloc": torch.cuda.max_memory_allocated(device) if cuda else None}
    vocab = config.get("text_config", config)["vocab_size"]
    batch = batch_of(plan, vocab, world.rank, device)
    times, losses = [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        begun = time.perf_counter()
        loss, _ = accumulate_gradients(model, [batch], trainee)
        distributed.clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - begun)
        losses.append(round(loss, 4))
    tail = sorted(times[1:]) or times  # the first step tunes kernels and fills the allocator
    step_s = tail[len(tail) // 2]
    record.update(plan=plan.to_dict(), losses=losses, step_s=step_s,
                  tok_s=world.size * plan.micro_batch * plan.seq_len / step_s,
                  peak_alloc=torch.cuda.max_memory_allocated(device) if cuda else None,
                  peak_reserved=torch.cuda.max_memory_reserved(device) if cuda else None,
                  process_memory=process_memory_bytes() if cuda else None)
    return record


def scaling(out: Path, line: dict) -> dict:
    """Efficiency against the smallest GPU count already in ``out`` for the same model, mode and seq."""
    same = []
    if out.exists():
        for text in out.read_text().splitlines():
            prior = json.loads(text)
            if all(prior.get(k) == line[k] for k in ("model", "seq", "parallel_requested")) and prior.get("tok_s"):
                same.append(prior)
    if not same:
        return {}
    base = min(same, key=lambda r: r["gpus"])
    if base["gpus"] >= line["gpus"]:
        return {}
    return {"baseline_gpus": base["gpus"],
            "scaling_efficiency": line["tok_s"] / (line["gpus"] / base["gpus"] * base["tok_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a profile name (llama-3.1-8b) or a folder with a config.json")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optim", default="paged_adamw8bit", help="FSDP runs torch AdamW whatever this says")
    parser.add_argument("--checkpointing", default="full")
    parser.add_argument("--cpu-offload", action="store_true", help="FSDP2 with the shards in host memory")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cap-gb", type=float, help="cap each rank's GPU memory (set_per_process_memory_fraction)")
    parser.add_argument("--out", required=True, help="JSON lines file to append to")
    args = parser.parse_args()
    world, device = distributed.start(args.parallel, None)
    seed_everything(0)  # the same LoRA init on every rank (FSDP2 keeps each rank's own slice of it)
    out = Path(args.out)
    base = {"model": args.model, "seq": args.seq, "parallel_requested": args.parallel, "gpus": world.size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cap_gb": args.cap_gb,
            "torch": torch.__version__}
    try:
        record = measure(args, world, device)
    except Exception as err:  # noqa: BLE001: a rank that fails (OOM under the cap) writes its own line and ends the run
        line = dict(base, rank=world.rank, error=f"{type(err).__name__}: {str(err)[:300]}",
                    peak_alloc=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
        os._exit(1)
    per_rank = [None] * world.size
    if world.size > 1:
        dist.all_gather_object(per_rank, {k: record[k] for k in ("peak_alloc", "peak_reserved", "process_memory", "step_s")})
    else:
        per_rank = [{k: record[k] for k in ("peak_alloc", "peak_reserved", "process_memory", "step_s")}]
    if world.is_main:
        plan = Plan.from_dict(record["plan"])
        line = dict(base, parallel=world.parallel, tok_s=record["tok_s"],
                    step_s=record["step_s"], losses=record["losses"], load_s=record["load_s"],
                    load_peak_alloc=record["load_peak_alloc"], optimizer_note=record["optimizer_note"],
                    per_rank=per_rank, max_rank_peak_alloc=max((r["peak_alloc"] or 0) for r in per_rank) or None,
                    max_rank_process_memory=max((r["process_memory"] or 0) for r in per_rank) or None,
                    plan=record["plan"], **prediction(plan, args.model))
        line.update(scaling(out, line))
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps({k: v for k, v in line.items() if k not in ("plan", "predicted_components")}), flush=True)
    distributed.stop()


if __name__ == "__main__":
    main()
