"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder is a PEFT adapter (so any checkpoint is usable on its own) plus the
optimizer, the LR scheduler, every RNG state and the data position. It is written to a
staging folder and renamed into place (``vramplan.atomic``), so a crash or Ctrl-C while
saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from vramplan.atomic import replace_dir_atomic
from vramplan.errors import VramplanError
from vramplan.train import adapter

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, and the next row to read (epoch, index in that epoch's order)."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0
    loss_scale: dict | None = None  # fp16 steps: loss_scale.LossScale's state


def rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_dir_atomic(folder: str | Path, fill: Callable[[Path], None]) -> None:
    """``fill(staging)`` writes the files into a fresh folder beside ``folder``, which then replaces it in one rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir_atomic(staging, folder)


def save_checkpoint(folder: str | Path, model, plan, base_model: str, optimizer, scheduler, state: TrainState,
                    main: bool = True) -> None:
    """Write the checkpoint. On several ranks every rank calls this (sharded LoRA weights and
    optimizer states are gathered whole, a collective) and only ``main`` (rank 0) writes: the
    files are the same for any number of ranks, so a run resumes on another number of GPUs."""
    from vramplan.train.distributed import full_optimizer_state

    weights, optimizer_state = adapter.lora_state_dict(model), full_optimizer_state(optimizer)
    if not main:
        return

    def fill(staging: Path) -> None:
        adapter.write_adapter(staging, model, plan, base_model, weights)
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_states(), staging / "rng.pt")
        (staging / STATE_FILE).write_text(json.dumps({**asdict(state), "plan": plan.to_dict()}, indent=2) + "\n")

    write_dir_atomic(folder, fill)


def load_checkpoint(folder: str | Path, model, optimizer, scheduler) -> TrainState:
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise VramplanError(f"--resume {folder.parent}: no checkpoint at {folder}; train with --save-every N first")
    try:
        adapter.load_lora_state_dict(model, adapter.read_adapter_weights(folder))
    except ValueError as err:
        raise VramplanError(f"--resume {folder}: {err}; resume with the plan the run started with") from None
    from vramplan.train.distributed import shard_optimizer_state

    optimizer.load_state_dict(shard_optimizer_state(torch.load(folder / "optimizer.pt", weights_only=False), optimizer))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_states(torch.load(folder / "rng.pt", weights_only=False))
    saved = json.loads((folder / STATE_FILE).read_text())
    return TrainState(step=saved["step"], epoch=saved["epoch"], cursor=saved["cursor"], tokens_seen=saved["tokens_seen"],
                      loss_scale=saved.get("loss_scale"))
