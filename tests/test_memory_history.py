"""benchmarks.memory_history reads torch's allocator history: which requests made the pool grow, and
whether free bytes sat in it then (a trace as ``torch.cuda.memory._snapshot`` writes one)."""

from benchmarks.memory_history import segment_growth

MB = 2**20


def _frames(name):
    return [{"filename": "/usr/lib/python3/site-packages/torch/_tensor.py", "line": 1, "name": "backward"},
            {"filename": "/repo/kernels/qlora_linear.py", "line": 10, "name": name}]


def test_growth_beside_free_bytes_is_reported_with_its_request():
    trace = [
        {"action": "segment_alloc", "size": 20 * MB, "addr": 0, "stream": 0, "frames": _frames("forward")},
        {"action": "alloc", "size": 12 * MB, "addr": 0, "stream": 0, "frames": _frames("forward")},
        {"action": "free_requested", "size": 12 * MB, "addr": 0, "stream": 0},
        {"action": "free_completed", "size": 12 * MB, "addr": 0, "stream": 0},
        # 20 MB reserved, all free, yet a 16 MB request takes a new segment (a capture's or a stream's rule)
        {"action": "segment_alloc", "size": 16 * MB, "addr": 64 * MB, "stream": 7, "frames": []},
        {"action": "alloc", "size": 16 * MB, "addr": 64 * MB, "stream": 7, "frames": _frames("backward_dx")},
    ]
    rows = segment_growth({"device_traces": [trace]})
    assert [r["size"] for r in rows] == [20 * MB, 16 * MB]
    assert rows[0]["free_before"] == 0 and rows[0]["request"] == "qlora_linear.py:10:forward"
    second = rows[1]
    assert (second["reserved_before"], second["allocated_before"], second["free_before"]) == (20 * MB, 0, 20 * MB)
    assert second["request"] == "qlora_linear.py:10:backward_dx"  # named by the allocation that followed it
    assert second["stream"] == 7


def test_each_pool_peaks_on_its_own():
    """pool_peaks: a large pool that peaks before a small pool's gradients exist. At the whole trace's peak the small
    pool held only its adapters; at its own peak it held a transient and the gradient too, packed. A block live
    before the trace began (the adapters) is read back from the snapshot's end state."""
    from benchmarks.memory_history import pool_peaks

    small, large = 0, 1024 * MB
    def block(size, state):
        return {"size": size, "state": state}
    segments = [
        {"address": small, "total_size": 8 * MB, "segment_type": "small", "device": 0,
         # at the end: the adapters (from before the trace), the hole, the gradient, then free space
         "blocks": [block(2 * MB, "active_allocated"), block(1 * MB, "inactive"), block(1 * MB, "active_allocated"),
                    block(4 * MB, "inactive")]},
        {"address": large, "total_size": 64 * MB, "segment_type": "large", "device": 0,
         "blocks": [block(64 * MB, "inactive")]},
    ]
    trace = [
        {"action": "alloc", "addr": large, "size": 48 * MB, "frames": _frames("forward")},  # activations: the peak
        {"action": "free_completed", "addr": large, "size": 48 * MB},
        {"action": "alloc", "addr": small + 2 * MB, "size": MB, "frames": _frames("cast")},  # a transient
        {"action": "alloc", "addr": small + 3 * MB, "size": MB, "frames": _frames("backward")},  # a gradient
        {"action": "free_completed", "addr": small + 2 * MB, "size": MB},
    ]
    rows = {r["pool"]: r for r in pool_peaks({"device_traces": [trace], "segments": segments})}
    assert rows["large"]["peak_live"] == 48 * MB and rows["large"]["live_at_total_peak"] == 48 * MB
    assert rows["small"]["live_at_total_peak"] == 2 * MB  # the adapters alone when the step peaked
    assert rows["small"]["peak_live"] == 4 * MB and rows["small"]["holes_at_peak"] == 0
    assert rows["small"]["live_at_peak_by_request"]["before the trace"] == 2 * MB
