"""Memory beyond torch's allocated peak, fitted on runs kept for that: the caching allocator's slack (reserved
minus allocated) and the paged optimizer states NVML counts.

The planner prices the slack as ``memory.overhead``'s fragmentation. Two regimes, measured apart:

* Captured steps (CUDA graphs): the slack grew with the trainable parameters while a shape's eager first pass
  made the gradients and the adapters' bf16 copies among its activations, whose pages they kept mapped through the
  capture. Fitted as a floor plus bytes a trainable parameter on session 12's rank sweep (Llama-3.2-1B and Qwen3-4B
  at ranks 8 to 256). Captures made compact (switch ``compact_captures``, session 21) hold the floor at every rank:
  session 21's sweep (``compact_graph_slack_fit``) checks that the slope is gone, and the floor is kept.
* Eager steps: the slack is the adapters' gradients torch's small pool serves (each at most 1 MiB) that the step
  makes after its allocated peak: that pool peaks when they all exist, and what the large pool has let go by then
  cannot serve it (session 23, ``benchmarks.memory_history.pool_peaks``). A step that peaks where its backward starts
  makes all of them after; one that peaks at its end, where the gradients have outgrown the checkpoints they
  replace, few or none. Byte for byte, plus a floor: the mean of the rest over session 12's eager Llama-3.2-1B runs
  (``eager_slack_fit``: ranks 8-256, 1,024-4,096 tokens). Session 24 priced the timing, after session 23's registered
  rank sweep bore it out; session 22's line (1.64 bytes a small-pool gradient byte) and before it one 0.17 GB
  constant had priced every eager line whatever its timing.

Beyond the pool, the same runs' driver readings say how NVML counts the paged optimizer states on the GPU
(``memory.optimizer.resident_paged_state_bytes``): in whole 128 MiB chunks (``managed_chunk_residuals``).

Every other run stays held out. ``python -m benchmarks.allocator_slack`` prints the fit; tests/test_allocator_slack.py
holds the planner's constants to it.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.records import (_RESULTS, band_min_windows_ran, outside_growth_beyond_chunks, plan_of, priced_as_ran,
                                switches_ran)
from vramplan.catalog import resolve_model
from vramplan.estimate import architecture
from vramplan.stacks.vramplan import managed_optimizer_bytes, step_memory

#: Session 12's rank sweep under CUDA graphs: Llama-3.2-1B and Qwen3-4B (Gemma-4-E2B's rows, rank-sweep-held-out.jsonl,
#: are held out).
GRAPH_SWEEP = _RESULTS / "session12" / "rank-sweep-fit.jsonl"
#: Session 12's eager Llama-3.2-1B runs, ranks 8-256 and 1,024-4,096 tokens: with the rank sweep they show how NVML
#: counts the paged states (Qwen3-4B's, Gemma-4-E2B's and the offloaded run's, eager-held-out.jsonl, are held out).
EAGER_RUNS = _RESULTS / "session12" / "eager-fit.jsonl"
#: Session 21's captured runs with compact captures: Llama-3.2-1B, Qwen3-1.7B and Qwen3-4B at ranks 8-256,
#: checkpointed or not (call 3; the rank-128 run with the switch off is its A/B).
COMPACT_SWEEP = _RESULTS / "session21" / "call3" / "compact.jsonl"


@dataclass(frozen=True)
class SlackFit:
    """Slack = ``floor_bytes`` + ``bytes_per_trainable`` × trainable parameters, over ``runs`` runs."""

    floor_bytes: int
    bytes_per_trainable: float
    runs: int


def measured_runs(path: Path) -> list[dict]:
    """The measured lines of ``path``."""
    return [record for line in path.read_text().splitlines() if "peak_reserved" in (record := json.loads(line))]


def slack(record: dict) -> int:
    """Reserved minus allocated at the peak: what the allocator held that no tensor used."""
    return record["peak_reserved"] - record["peak_alloc"]


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of the ordinary least-squares line through (xs, ys)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def graph_slack_fit(path: Path = GRAPH_SWEEP, compact: bool = False) -> SlackFit:
    """The captured runs' slack against their trainable parameters (``compact``: only the runs made with compact
    captures)."""
    rows = [r for r in measured_runs(path) if r.get("cuda_graphs") and (r.get("compact_captures") or not compact)]
    floor, slope = least_squares([r["trainable"] for r in rows], [slack(r) for r in rows])
    return SlackFit(floor_bytes=int(floor), bytes_per_trainable=slope, runs=len(rows))


def compact_graph_slack_fit(path: Path = COMPACT_SWEEP) -> SlackFit:
    """The same line through session 21's captured runs made compact (``compact_captures``)."""
    return graph_slack_fit(path, compact=True)


def small_gradients_after_peak(record: dict) -> int:
    """The run's adapter gradients torch's small pool serves that its step makes after its allocated peak, as the
    planner prices them for the plan as it ran (``memory.overhead.small_gradients_after_peak``)."""
    plan = plan_of(record)
    with priced_as_ran(switches_ran(record), band_min_windows_ran(record)):
        return step_memory(architecture(resolve_model(plan.model)), plan).small_gradients_after_peak


def eager_slack_fit(path: Path = EAGER_RUNS) -> SlackFit:
    """The eager runs' slack less their small-pool gradients made after the peak, byte for byte: the mean of the rest
    is the floor (``bytes_per_trainable`` is the one byte a gradient byte the timing gives, not fitted)."""
    rows = [r for r in measured_runs(path) if not r.get("cuda_graphs")]
    floor = statistics.fmean(slack(r) - small_gradients_after_peak(r) for r in rows)
    return SlackFit(floor_bytes=int(floor), bytes_per_trainable=1.0, runs=len(rows))


def managed_bytes(record: dict) -> int:
    """The paged optimizer states the planner puts in CUDA managed memory for the run's plan."""
    plan = plan_of(record)
    return managed_optimizer_bytes(architecture(resolve_model(plan.model)), plan)


def managed_chunk_residuals(paths: tuple[Path, ...] = (GRAPH_SWEEP, EAGER_RUNS)) -> list[dict]:
    """Per fitting run: how much NVML's reading outside torch's pool grew over the first step (the driver readings a
    trainer line records before and after it), less ceil(managed states / 128 MiB) chunks; and the baseline's excess
    over the lowest of the runs (a previous process's chunk left on the device, which a paging run takes over)."""
    runs = [r for path in paths for r in measured_runs(path)]
    lowest = min(r["driver"]["outside"][0] for r in runs)
    out = []
    for r in runs:
        managed = managed_bytes(r)
        out.append({"model": r["model"], "rank": r["rank"], "captured": bool(r.get("cuda_graphs")),
                    "managed": managed, "residual": outside_growth_beyond_chunks(r, managed),
                    "baseline_excess": r["driver"]["outside"][0] - lowest})
    return out


def main() -> None:
    json.dump({"regime": "graphs", **graph_slack_fit().__dict__}, sys.stdout)
    print()
    json.dump({"regime": "graphs, compact captures", **compact_graph_slack_fit().__dict__}, sys.stdout)
    print()
    json.dump({"regime": "eager, against small-pool gradient bytes", **eager_slack_fit().__dict__}, sys.stdout)
    print()
    for row in managed_chunk_residuals():
        json.dump({"regime": "outside the pool, less the managed chunks", **row}, sys.stdout)
        print()


if __name__ == "__main__":
    main()
