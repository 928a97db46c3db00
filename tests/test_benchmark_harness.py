"""The kernel benchmark's timing logic on the CPU: which cases get a CUDA-graph timing, that a failing
variant loses only itself, and that ceiling fractions come from the graph timing (the kernel's own).
The timers stand in for triton.testing's, which need a GPU; the cases' callables really run."""

import pytest
import torch

from benchmarks.harness import Case, ceiling_fractions, time_variants
from benchmarks.kernel_cases import rmsnorm, rope

CEILINGS = {"bandwidth_gbs": 1000.0, "bf16_tflops": 500.0}


def _timer(ms):
    def time(fn):
        fn()  # the variant runs, as under do_bench
        return ms
    return time


def _fails():
    raise RuntimeError("operation not permitted when stream is capturing")


def test_graph_timing_only_for_marked_cases_and_failures_stay_local():
    ran = []
    small = Case("rmsnorm", "s", {"vramplan": lambda: ran.append("v"), "liger": _fails}, bytes_moved=10**6, cuda_graph=True)
    large = Case("qlora_linear", "l", {"vramplan": lambda: ran.append("q")}, flops=10**12)
    eager, graphed = time_variants(small, _timer(0.02), _timer(0.005))
    assert eager == {"vramplan": 0.02, "liger": None} and graphed == {"vramplan": 0.005, "liger": None}
    assert ran == ["v", "v"]
    assert time_variants(large, _timer(3.0), _timer(1.0)) == ({"vramplan": 3.0}, {})
    assert time_variants(small, _timer(0.02), None)[1] == {}  # no CUDA: eager only
    # 1 MB in 5 µs is 200 GB/s: a fifth of the 1000 GB/s ceiling; eager's 20 µs would say a twentieth
    assert ceiling_fractions(small, 0.005, CEILINGS) == {"bandwidth_fraction": pytest.approx(0.2)}
    assert ceiling_fractions(small, 0.02, CEILINGS)["bandwidth_fraction"] == pytest.approx(0.05)
    assert ceiling_fractions(large, 3.0, CEILINGS) == {"tflops_fraction": pytest.approx(10**12 / 3e-3 / 500e12)}
    assert ceiling_fractions(small, None, CEILINGS) == {}


def test_rmsnorm_and_rope_cases_ask_for_graph_timing():
    torch.manual_seed(0)
    for module in (rmsnorm, rope):
        cases = module.cases("cpu", tokens=2, compile_backend=None)
        assert cases and all(c.cuda_graph for c in cases)


def test_repeated_ops_are_timed_per_op():
    """A case whose callable runs the op over 4 distinct tensors reports a quarter of the call's time,
    so bytes_moved (one op's traffic) over that time is the op's bandwidth."""
    case = Case("nf4_dequantize", "s", {"vramplan": lambda: None}, bytes_moved=10**6, cuda_graph=True, repeats=4)
    assert time_variants(case, _timer(0.02), _timer(0.008)) == ({"vramplan": 0.005}, {"vramplan": 0.002})


def test_host_dispatch_probe_times_one_queued_op_and_grows_with_the_work_per_op():
    """The probe is µs per op: queuing a bigger op on the CPU (a 1e6-element add) costs more than a 1-element one."""
    from benchmarks.harness import host_dispatch_us

    tiny = host_dispatch_us(torch.device("cpu"), ops=200, rounds=3)
    assert 0 < tiny < 1000
    x = torch.zeros(1_000_000)
    import time

    started = time.perf_counter()
    for _ in range(200):
        x.add_(1)
    big_us = (time.perf_counter() - started) / 200 * 1e6
    assert big_us > tiny


def test_pool_summary_splits_the_graph_pool_from_the_default_one_and_names_the_slack():
    """summarize_pools reads torch.cuda.memory_snapshot()'s segment records (this is their format in torch 2.11-2.13):
    a CUDA graph's private pool apart from the default one, with the reserved bytes no block holds."""
    from benchmarks.trainer import summarize_pools

    def segment(pool_id, size, blocks, expandable=False):
        return {"segment_pool_id": pool_id, "is_expandable": expandable, "total_size": size,
                "allocated_size": sum(s for s, state in blocks if state == "active_allocated"),
                "blocks": [{"size": s, "state": state} for s, state in blocks]}

    pools = summarize_pools([segment((0, 0), 100, [(60, "active_allocated"), (40, "inactive")], expandable=True),
                             segment((1, 2), 50, [(10, "active_allocated"), (30, "inactive"), (10, "inactive")]),
                             segment((1, 2), 20, [(20, "inactive")])])
    assert pools == {"default:expandable": {"segments": 1, "bytes": 100, "allocated": 60, "free_blocks": 1,
                                            "largest_free": [40]},
                     "graph": {"segments": 2, "bytes": 70, "allocated": 10, "free_blocks": 3, "largest_free": [30, 20, 10]}}
