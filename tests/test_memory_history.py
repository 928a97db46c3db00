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
