"""A stacked bar of an estimate's components against the GPU's capacity (matplotlib, Agg, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vramplan.atomic import write_atomic
from vramplan.catalog import GpuSpec
from vramplan.errors import VramplanError


def plot_estimates(estimates: Sequence, path: str, gpu: GpuSpec | None = None, labels: Sequence[str] | None = None) -> None:
    """One bar per estimate, one colour per component (GB), and a line at the GPU's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if Path(path).suffix.lower() != ".png":
        raise VramplanError(f"--plot {path}: write a .png file")
    names: list[str] = []
    for est in estimates:
        for name, _ in sorted(est.components.items(), key=lambda kv: -kv[1]):
            if name not in names:
                names.append(name)
    labels = list(labels or [f"{e.plan.stack} stack" for e in estimates])
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(estimates), 5.2))
    colors = plt.get_cmap("tab20").colors
    bottoms = [0.0] * len(estimates)
    for i, name in enumerate(names):
        heights = [e.components.get(name, 0) / 1e9 for e in estimates]
        ax.bar(labels, heights, bottom=bottoms, label=name, color=colors[i % len(colors)], width=0.55)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, e in enumerate(estimates):
        ax.text(x, e.peak_bytes / 1e9, f"{e.peak_bytes / 1e9:.1f} GB", ha="center", va="bottom", fontsize=9)
    if gpu is not None:
        ax.axhline(gpu.memory_bytes / 1e9, color="black", linestyle="--", linewidth=1)
        ax.text(-0.45, gpu.memory_bytes / 1e9, f"{gpu.label}: {gpu.memory_bytes / 1e9:.1f} GB",
                va="bottom", ha="left", fontsize=8)
    plan = estimates[0].plan
    ax.set_title(f"{estimates[0].model}, seq {plan.seq_len}, rank {plan.lora_rank}: peak memory by component", fontsize=10)
    ax.set_ylabel("GB (10^9 bytes)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_cost_time(options: Sequence, path: str, title: str = "") -> None:
    """Cost to finish against hours to finish, one labelled point per GPU that fits and has a price."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if Path(path).suffix.lower() != ".png":
        raise VramplanError(f"--plot {path}: write a .png file")
    points = [o for o in options if o.fits and o.cost_usd is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for o in points:
        color = "tab:red" if o.marks else "tab:blue"
        ax.scatter(o.hours, o.cost_usd, color=color, marker="s" if o.cost_basis == "buy" else "o")
        label = o.gpu.name + (f" ({', '.join(o.marks)})" if o.marks else "")
        ax.annotate(label, (o.hours, o.cost_usd), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if points:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("hours to finish")
    ax.set_ylabel("cost to finish (USD; circle: rent, square: buy)")
    ax.set_title(title or "cost vs time to finish", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
