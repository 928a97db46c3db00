"""Where a run's process memory goes, stage by stage: the allocator's share and what lies outside it.

NVML's used memory is what the issue's targets count; torch's reserved memory is only the caching
allocator's part of it. The rest (CUDA module images loaded lazily on a kernel's first launch, the
local-memory pool the driver grows to the largest per-thread stack any launched kernel needs,
cuBLAS/cuBLASLt handles, CUDA graph executables) is invisible to ``torch.cuda.memory_*``. This
prints, for one configuration of ``benchmarks/trainer.py``'s grid, one JSON line per stage with
NVML's delta above the context, reserved, allocated and ``outside = nvml - reserved``; during the
first (eager) step every module's forward and backward is a checkpoint too, and each jump of
``outside`` over 2 MiB is reported with the module that caused it. The context's stack limit and
the Triton kernels that use local memory (spills) are listed at the end (``benchmarks.driver_memory``).

    python -m benchmarks.memory_stages --config llama-3.2-1b \
        --grid '{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "head_quant": "int8", "loss_chunk_mb": 128}'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from benchmarks.driver_memory import outside_pool_bytes, stack_limit_bytes, triton_kernels_with_local_memory
from benchmarks.harness import random_batch
from benchmarks.records import plan_of
from benchmarks.trainer import build_random_model
from vramplan.catalog import resolve_model
from vramplan.gpu import used_memory_bytes
from vramplan.train.graphs import StepGraphs
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.optim import flat_update_pays
from vramplan.train.recipe import make_optimizer

JUMP_BYTES = 2 << 20


class Ledger:
    """NVML and allocator readings above a baseline, printed as they are taken."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        self.base = used_memory_bytes()
        self.outside = self.base - torch.cuda.memory_reserved()
        self.jumps: list[dict] = []

    def reading(self) -> dict:
        torch.cuda.synchronize()
        used = used_memory_bytes()
        reserved = torch.cuda.memory_reserved()
        return {"nvml_delta": used - self.base, "reserved": reserved, "allocated": torch.cuda.memory_allocated(),
                "outside": used - reserved - self.base}

    def stage(self, name: str) -> None:
        print(json.dumps(dict(stage=name, **self.reading())), flush=True)

    def watch(self, where: str) -> None:
        """Record ``where`` when the memory outside the allocator grew since the last look."""
        torch.cuda.synchronize()
        outside = outside_pool_bytes()
        if outside - self.outside > JUMP_BYTES:
            self.jumps.append({"where": where, "outside_jump": outside - self.outside})
        self.outside = outside


def watch_modules(model: torch.nn.Module, ledger: Ledger) -> list:
    handles = []
    for name, module in model.named_modules():
        if not name or list(module.children()) and not name.endswith("layers.0"):
            continue  # leaves, and the first decoder layer as a whole
        # forward hooks only: under checkpointing a layer's recompute runs them again inside the
        # backward, so a backward kernel's first launch shows at the next recompute (or step end)
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: ledger.watch(f"forward {n}")))
    return handles


def live_blocks_with_frames(limit: int = 40) -> list[dict]:
    """The allocator's live blocks that carry an allocation stack (made while history was recorded),
    largest first, each with the Python frames of this project, transformers and torch.nn that made it."""
    snapshot = torch.cuda.memory._snapshot()
    found = []
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated" or not block.get("frames"):
                continue
            frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}" for f in block["frames"]
                      if any(k in f["filename"] for k in ("vramplan", "kernels/", "transformers", "torch/nn"))]
            found.append({"bytes": block["size"], "pool": segment.get("segment_pool_id"), "frames": frames[:8]})
    return sorted(found, key=lambda b: -b["bytes"])[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--grid", required=True, help="one benchmarks/trainer.py grid entry (JSON object)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--grown-after", type=int, default=None, metavar="STEP",
                        help="record allocations from this step on and list those still live at the end, with "
                             "where they were made (a steady rise of allocated memory between steps is a leak)")
    args = parser.parse_args()
    from vramplan.train.allocator import prefer_expandable_segments

    prefer_expandable_segments()
    grid = json.loads(args.grid)
    device = torch.device("cuda")
    folder = tempfile.mkdtemp(dir="/tmp")
    build_random_model(args.config, folder)
    config = resolve_model(args.config).config
    vocab = config.get("text_config", config)["vocab_size"]
    torch.cuda.empty_cache()
    torch.zeros(1, device=device)
    ledger = Ledger()
    ledger.stage("context")
    a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    ledger.stage("after one bf16 matmul (cuBLAS handle and workspace)")
    del a
    plan = plan_of(dict({"cuda_graphs": True}, **grid, model=os.path.basename(args.config)))
    model, _ = load_for_training(folder, plan, device)
    ledger.stage("loaded")
    params = lora_parameters(model)
    optimizer, _ = make_optimizer(params, plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))
    graphs = StepGraphs.for_run(model, params, plan, device)
    ledger.stage("optimizer and graph holder")
    batch = random_batch(vocab, plan.micro_batch, plan.seq_len, device)
    handles = watch_modules(model, ledger)
    ledger.watch("start")
    for step in range(args.steps):
        if step == args.grown_after:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        accumulate_gradients(model, [batch], graphs=graphs)
        ledger.watch(f"step {step} end of backward")
        optimizer.step()
        ledger.watch(f"step {step} optimizer")
        optimizer.zero_grad(set_to_none=graphs is None)
        if step == 0:
            for h in handles:
                h.remove()
        ledger.stage(f"after step {step}")
    print(json.dumps({"outside_jumps": ledger.jumps}), flush=True)
    if args.grown_after is not None:
        print(json.dumps({"live_blocks_made_since_step": args.grown_after, "blocks": live_blocks_with_frames()}),
              flush=True)
    print(json.dumps({"peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
                      "segments": torch.cuda.memory_stats().get("segment.all.current")}), flush=True)
    torch.cuda.empty_cache()
    ledger.stage("after empty_cache (the allocator's free segments returned)")
    print(json.dumps({"stack_limit": stack_limit_bytes(), "triton_local": triton_kernels_with_local_memory()}), flush=True)


if __name__ == "__main__":
    main()
