"""Where a training step's time goes: torch.profiler over a few steps of the trainer on the GPU.

    python -m benchmarks.profile_trainer --config llama-3.2-1b --seq 2048

Prints wall time per step against the GPU's busy time (host-bound when the GPU idles), then the
top operators by host time and by device time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.records import plan_of
from benchmarks.trainer import build_random_model
from vramplan.catalog import resolve_model
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
    args = parser.parse_args()
    folder = tempfile.mkdtemp(dir="/tmp")
    build_random_model(args.config, folder)
    config = resolve_model(args.config).config
    vocab = config.get("text_config", config)["vocab_size"]
    device = torch.device("cuda")
    plan = plan_of({"model": args.config, "seq": args.seq, "batch": 1, "rank": 16, "gc": True})
    model, _ = load_for_training(folder, plan, device)
    optimizer, _ = make_optimizer(lora_parameters(model), plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))
    ids = torch.randint(0, vocab, (1, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(args.seq, device=device)[None]}

    def step():
        accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
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
