"""torch's allocator history over a run's steps, saved for reading off the GPU machine.

A reserved peak above the allocated one says that the pool holds bytes it never hands out, not where
or why. The history (``torch.cuda.memory._record_memory_history``) has every allocation, free and new
segment with the Python frames that asked for it, so :func:`segment_growth` can say which requests
made the pool grow, and whether free bytes sat in it at that moment.

    python -m benchmarks.memory_history history.pickle.gz   # prints the segment growth table
    python -m benchmarks.memory_history history.pickle.gz --pools   # each pool's own peak (pool_peaks)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import pickle

import torch

#: Frames from these files name the request; torch's own and the standard library's are skipped.
OWN_CODE = ("vramplan", "kernels/", "transformers/", "benchmarks/", "peft/", "bitsandbytes/")


@contextlib.contextmanager
def recorded(path: str | None, max_entries: int = 400_000):
    """Records the allocator's history inside the block and writes it gzipped to ``path`` (nothing when None)."""
    if not path:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        yield
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        with gzip.open(path, "wb") as handle:
            pickle.dump(snapshot, handle)


def _request(frames: list[dict], depth: int = 4) -> str:
    own = [f for f in frames if any(part in f.get("filename", "") for part in OWN_CODE)]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in own[:depth])


def segment_growth(snapshot: dict, device: int = 0) -> list[dict]:
    """One row per new segment (or expandable mapping): its size, the request that caused it, and the
    pool's reserved, allocated and free bytes just before it (free > size: the pool grew beside free
    bytes it could not use, for a request's size, its stream or a capture's rules)."""
    reserved = allocated = 0
    rows: list[dict] = []
    unnamed: list[dict] = []  # rows whose segment event carried no frames: named by the allocation after it
    for index, event in enumerate(snapshot["device_traces"][device]):
        action, size = event["action"], event["size"]
        if action == "alloc":
            allocated += size
            for row in unnamed:
                row["request"] = _request(event.get("frames", []))
            unnamed = []
        elif action == "free_completed":
            allocated -= size
        elif action in ("segment_alloc", "segment_map"):
            rows.append({"event": index, "action": action, "size": size, "stream": event.get("stream"),
                         "reserved_before": reserved, "allocated_before": allocated,
                         "free_before": reserved - allocated,
                         "request": _request(event.get("frames", []))})
            if not rows[-1]["request"]:
                unnamed.append(rows[-1])
            reserved += size
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size
    return rows


def _holds(segment: dict, event: dict) -> bool:
    """Whether a trace event's address lies in the segment."""
    return segment["address"] <= event.get("addr", -1) < segment["address"] + segment["total_size"]


def _live_at_start(segment: dict, trace: list[dict]) -> dict[int, tuple[int, str]]:
    """The segment's blocks live when the trace began: its live blocks at the end (the snapshot's), with the trace's
    allocations taken back and its frees put back, newest first."""
    live, address = {}, segment["address"]
    for block in segment["blocks"]:
        if block["state"] == "active_allocated":
            live[address] = block["size"]
        address += block["size"]
    for event in reversed(trace):
        if _holds(segment, event):
            if event["action"] == "alloc":
                live.pop(event["addr"], None)
            elif event["action"] == "free_completed":
                live[event["addr"]] = event["size"]
    return {addr: (size, "before the trace") for addr, size in live.items()}


def pool_peaks(snapshot: dict, device: int = 0) -> list[dict]:
    """Per expandable segment (one a pool: torch's small pool serves requests of at most 1 MiB, the large the rest):
    its mapped bytes at the end, its own peak of live bytes (when, and the requests live then, largest first), the
    holes below its highest live block at that moment, and its live bytes when all the segments together peaked. An
    eager step's slack (reserved - allocated peak) with holes this small is the pools peaking at different moments:
    session 23's Qwen3-4B at rank 16 held 403 of its small pool's 412 MiB live at that pool's own peak."""
    trace = snapshot["device_traces"][device]
    segments = [s for s in snapshot["segments"] if s.get("device", device) == device]
    live = [_live_at_start(segment, trace) for segment in segments]
    used = [sum(size for size, _ in blocks.values()) for blocks in live]
    peaks = [(u, -1, dict(blocks)) for u, blocks in zip(used, live)]
    total_peak, at_total_peak = sum(used), list(used)
    for index, event in enumerate(trace):
        for k, segment in enumerate(segments):
            if not _holds(segment, event):
                continue
            if event["action"] == "alloc":
                live[k][event["addr"]] = (event["size"], _request(event.get("frames", [])) or "?")
                used[k] += event["size"]
                if used[k] > peaks[k][0]:
                    peaks[k] = (used[k], index, dict(live[k]))
            elif event["action"] == "free_completed" and live[k].pop(event["addr"], None) is not None:
                used[k] -= event["size"]
        if sum(used) > total_peak:
            total_peak, at_total_peak = sum(used), list(used)
    rows = []
    for segment, (peak, index, blocks), at_total in zip(segments, peaks, at_total_peak):
        requests: dict[str, int] = {}
        for size, request in blocks.values():
            requests[request] = requests.get(request, 0) + size
        holes, top = 0, segment["address"]
        for address, (size, _) in sorted(blocks.items()):
            holes += max(0, address - top)
            top = max(top, address + size)
        rows.append({"pool": segment.get("segment_type"), "mapped": segment["total_size"], "peak_live": peak,
                     "peak_event": index, "holes_at_peak": holes, "live_at_total_peak": at_total,
                     "live_at_peak_by_request": dict(sorted(requests.items(), key=lambda kv: -kv[1])[:8])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a history written by recorded() (.pickle.gz)")
    parser.add_argument("--min-mb", type=float, default=8.0, help="rows for segments of at least this size")
    parser.add_argument("--pools", action="store_true", help="each pool's own peak instead (pool_peaks)")
    args = parser.parse_args()
    with gzip.open(args.path, "rb") as handle:
        snapshot = pickle.load(handle)
    if args.pools:
        for row in pool_peaks(snapshot):
            print(json.dumps(row))
        return
    for row in segment_growth(snapshot):
        if row["size"] >= args.min_mb * 2**20:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
