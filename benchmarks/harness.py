"""Shared pieces of the GPU benchmarks: a case to time, the two ceilings, and result writing."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One kernel at one shape, with every implementation to compare.

    ``variants`` maps an implementation's name to a zero-argument callable that runs it once
    (forward, or forward+backward when ``op`` says so). The first variant is vramplan's.
    ``bytes_moved`` / ``flops`` are the op's minimum traffic and arithmetic, for the fraction
    of the measured ceilings it reaches.
    """

    op: str
    shape: str
    variants: dict[str, Callable[[], Any]]
    bytes_moved: int | None = None
    flops: int | None = None
    measure_peak_memory: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: also time each variant replayed from a CUDA graph: for small ops whose eager timing is the
    #: host's launch overhead (RMSNorm, RoPE: ±40% run to run), so the ceiling fractions are the kernel's
    cuda_graph: bool = False
    #: each callable runs the op this many times (on distinct tensors, so a CUDA graph's replays
    #: cannot serve a small op from the 50 MB L2 cache); timings are divided back to one op
    repeats: int = 1


#: variants named so are yardsticks measured beside the op (a copy of the same bytes), not rivals
YARDSTICK = "ceiling: "


def synced_seconds(step: Callable[[], Any], n: int) -> list[float]:
    """Wall seconds of ``n`` calls of ``step``, each between two device syncs: what a whole step costs,
    host and GPU together (the kernel timings below time the GPU's share)."""
    import time

    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def host_dispatch_us(device, ops: int = 2000, rounds: int = 5) -> float:
    """Host µs to queue one tiny in-place add on ``device`` (best of ``rounds``): a probe of the host's speed. Steps
    that are not replayed as CUDA graphs are bound by the host's dispatch, which differs between machines of one GPU
    model, so an eager line needs its host's probe beside its tokens/s to be compared with another's."""
    import time

    x = torch.zeros(1, device=device)

    def drained() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(device)

    best = float("inf")
    for _ in range(rounds):
        drained()
        started = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        best = min(best, (time.perf_counter() - started) / ops)
    drained()
    return round(best * 1e6, 3)


def median_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_median_ms(fn: Callable[[], Any]) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``, in
    Triton 3.6 and 3.9): no launch overhead, the GPU's own time."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def time_variants(case: Case, eager: Callable[[Callable[[], Any]], float] = median_ms,
                  graphed: Callable[[Callable[[], Any]], float] | None = None) -> tuple[dict, dict]:
    """({variant: eager ms}, {variant: CUDA-graph ms}); the second only for a ``cuda_graph`` case
    when ``graphed`` is given (on CUDA). A variant that fails is None there and reported, so one
    failing variant (a capture that syncs, say) never loses the others. Times are per op
    (divided by ``case.repeats``)."""
    timings: dict[str, float | None] = {}
    graph_timings: dict[str, float | None] = {}
    for variant, fn in case.variants.items():
        for timer, into, label in ((eager, timings, ""), (graphed if case.cuda_graph else None, graph_timings, " (cuda graph)")):
            if timer is None:
                continue
            try:
                into[variant] = timer(fn) / case.repeats
            except Exception as err:  # noqa: BLE001
                into[variant] = None
                print(f"{case.op} {case.shape} {variant}{label}: {type(err).__name__}: {err}", flush=True)
    return timings, graph_timings


def ceiling_fractions(case: Case, ms: float | None, ceilings: dict[str, float]) -> dict[str, float]:
    """The fractions of the measured bandwidth and bf16 matmul ceilings that ``ms`` reaches."""
    out = {}
    if ms:
        if case.bytes_moved:
            out["bandwidth_fraction"] = case.bytes_moved / (ms * 1e-3) / (ceilings["bandwidth_gbs"] * 1e9)
        if case.flops:
            out["tflops_fraction"] = case.flops / (ms * 1e-3) / (ceilings["bf16_tflops"] * 1e12)
    return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak allocated memory above what was allocated before ``fn`` ran."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate, measured now."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"bandwidth_gbs": 2 * n / copy_ms / 1e6, "bf16_tflops": 2 * m**3 / mm_ms / 1e9}


def environment() -> dict[str, Any]:
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict[str, Any], table_md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table_md + "\n")


def random_batch(vocab: int, rows: int, seq: int, device, seed: int = 0, low: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch of seeded random token ids (from ``low`` up) predicting their next token, unpacked rows: the
    trainer benchmarks' input, the same on every run of one seed."""
    ids = torch.randint(low, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "position_ids": torch.arange(seq).expand(rows, -1).to(device)}
