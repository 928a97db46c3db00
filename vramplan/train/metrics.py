"""What a run reports while it runs: metrics.jsonl (one object per logged step) and a loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def process_memory_bytes() -> int | None:
    """GPU memory this process holds as the driver sees it (pynvml), CUDA context included; None on
    the CPU or where NVML cannot say. Inside containers NVML may list host PIDs only: then the
    device's used memory stands in."""
    if not torch.cuda.is_available():
        return None
    from vramplan.errors import VramplanError
    from vramplan.gpu import process_memory_bytes as held_by_this_process, used_memory_bytes

    try:
        return held_by_this_process() or used_memory_bytes(torch.cuda.current_device())
    except VramplanError:  # pynvml missing, or per-process memory not reported: the metric is optional
        return None


def memory_stats() -> dict:
    if not torch.cuda.is_available():
        return {"peak_allocated": None, "peak_reserved": None, "process_memory": None}
    return {
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "process_memory": process_memory_bytes(),
    }


class MetricsLog:
    """Appends one JSON line per logged step and flushes, so a crashed run keeps its curve."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """On resume: forget steps logged after the checkpoint, which the resumed run logs again."""
        kept = [r for r in self.read() if r["step"] <= step]
        if self.path.exists():
            from vramplan.atomic import write_atomic

            write_atomic(self.path, lambda tmp: open(tmp, "w").write("".join(json.dumps(r) + "\n" for r in kept)))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
