"""Where a training step's time goes: torch.profiler over a few steps of the trainer on the GPU.

    python -m benchmarks.profile_trainer --config llama-3.2-1b --seq 2048 [--rank 16] [--batch 1] [--graphs] [--syncs]

Prints wall time per step against the GPU's busy time (host-bound when the GPU idles), the wall
time of the forward+backward and of the optimizer step apart (each synced), then the top operators
by host time and by device time. ``--graphs``: the steps replay a captured CUDA graph, as the
trainer's default plans do. ``--syncs``: where the host waits on the GPU inside a step. An eager step
overlaps its host and device work only if nothing waits before its one sync at the end; this prints the
CUDA runtime's waiting calls a step makes (a pageable host-to-device copy waits too) and the Python
lines torch's sync debug mode flags in one whole ``train_step``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
import warnings

import torch

from benchmarks.records import plan_of
from benchmarks.trainer import MAX_GRAD_NORM, build_random_model
from vramplan.catalog import resolve_model
from vramplan.train.graphs import StepGraphs
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.optim import flat_update_pays
from vramplan.train.recipe import make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--syncs", action="store_true", help="list where a step waits on the GPU")
    parser.add_argument("--graphs", action="store_true", help="replay each step's forward and backward as a CUDA graph")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(dir="/tmp")
    build_random_model(args.config, folder)
    config = resolve_model(args.config).config
    vocab = config.get("text_config", config)["vocab_size"]
    device = torch.device("cuda")
    plan = plan_of({"model": args.config, "seq": args.seq, "batch": args.batch, "rank": args.rank, "gc": True, "cuda_graphs": args.graphs})
    model, _ = load_for_training(folder, plan, device)
    params = lora_parameters(model)
    optimizer, _ = make_optimizer(params, plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))
    graphs = StepGraphs.for_run(model, params, plan, device) if args.graphs else None
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100, device=device)], dim=1)
    batch = {"input_ids": ids, "labels": labels,
             "position_ids": torch.arange(args.seq, device=device)[None].expand(args.batch, -1)}

    def step():
        accumulate_gradients(model, [batch], graphs=graphs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)

    for _ in range(3):  # the first pass eager, the second captures (with graphs), the third replays
        step()
    torch.cuda.synchronize()
    phases = {"forward+backward": 0.0, "optimizer": 0.0}
    for _ in range(args.steps):
        started = time.time()
        accumulate_gradients(model, [batch], graphs=graphs)
        torch.cuda.synchronize()
        phases["forward+backward"] += (time.time() - started) / args.steps
        started = time.time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphs is None)
        torch.cuda.synchronize()
        phases["optimizer"] += (time.time() - started) / args.steps
    print("graphs" if graphs is not None else "eager", ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        started = time.time()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.time() - started) / args.steps
    events = prof.key_averages()
    # the kernels' own rows, as torch's table totals them: an operator's self device time is its kernels' again, and
    # a user range's (the optimizer's step) spans them too (summing every row read ~2x busy until session 25)
    device_total = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.is_user_annotation) / 1e6 / args.steps
    print(f"wall {wall * 1e3:.1f} ms/step, GPU busy {device_total * 1e3:.1f} ms/step, "
          f"{sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU) // args.steps} host ops/step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.syncs:
        print_syncs(events, args.steps, lambda: train_step(model, [batch], optimizer, params, MAX_GRAD_NORM, 0, device,
                                                           graphs=graphs))


#: CUDA runtime and driver calls that can make the host wait for the GPU's queue (a copy from pageable host memory
#: to the device waits for the stream before it starts)
WAITING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                 "cudaMemcpyAsync", "cuMemcpy", "cudaStreamWaitEvent", "cudaMalloc", "cudaFree", "cuMemMap",
                 "cuMemCreate", "cuMemUnmap", "cuMemRelease", "cuMemSetAccess", "cudaHostAlloc")


def print_syncs(events, steps: int, one_step) -> None:
    """The waiting calls per step from the profile, then each distinct place torch's sync debug mode flags in
    ``one_step``, as its innermost frames outside torch."""
    for event in events:
        if event.key.startswith(WAITING_CALLS):
            print(f"sync-call {event.key}: {event.count / steps:g}/step, {event.cpu_time_total / steps / 1e3:.2f} ms/step")
    flagged: dict[str, int] = {}

    def record(message, *_args, **_kwargs) -> None:  # called where the op ran: the stack is the op's
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not any(part in f.filename for part in ("site-packages/torch/", "warnings", "profile_trainer"))]
        where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[::-1][:4])
        key = f"{where or 'elsewhere'}: {str(message)[:70]}"
        flagged[key] = flagged.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for where, count in sorted(flagged.items(), key=lambda kv: -kv[1]):
        print(f"sync-flag x{count} {where}")
    print(f"sync-flags {sum(flagged.values())} in one train_step")


if __name__ == "__main__":
    main()
