"""Where a training step's time goes: torch.profiler over a few steps of the trainer on the GPU.

    python -m benchmarks.profile_trainer --config llama-3.2-1b --seq 2048 [--graphs]

Prints wall time per step against the GPU's busy time (host-bound when the GPU idles), the wall
time of the forward+backward and of the optimizer step apart (each synced), then the top operators
by host time and by device time. ``--graphs``: the steps replay a captured CUDA graph, as the
trainer's default plans do.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.records import plan_of
from benchmarks.trainer import build_random_model
from vramplan.catalog import resolve_model
from vramplan.train.graphs import StepGraphs
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.optim import flat_update_pays
from vramplan.train.recipe import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--graphs", action="store_true", help="replay each step's forward and backward as a CUDA graph")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(dir="/tmp")
    build_random_model(args.config, folder)
    config = resolve_model(args.config).config
    vocab = config.get("text_config", config)["vocab_size"]
    device = torch.device("cuda")
    plan = plan_of({"model": args.config, "seq": args.seq, "batch": 1, "rank": 16, "gc": True, "cuda_graphs": args.graphs})
    model, _ = load_for_training(folder, plan, device)
    params = lora_parameters(model)
    optimizer, _ = make_optimizer(params, plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))
    graphs = StepGraphs.for_run(model, params, plan, device) if args.graphs else None
    ids = torch.randint(0, vocab, (1, args.seq), device=device)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=device)], dim=1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(args.seq, device=device)[None]}

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
    device_total = sum(e.self_device_time_total for e in events) / 1e6 / args.steps
    print(f"wall {wall * 1e3:.1f} ms/step, GPU busy {device_total * 1e3:.1f} ms/step, "
          f"{sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU) // args.steps} host ops/step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
