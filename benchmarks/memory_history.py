"""torch's allocator history over a run's steps, saved for reading off the GPU machine.

A reserved peak above the allocated one says that the pool holds bytes it never hands out, not where
or why. The history (``torch.cuda.memory._record_memory_history``) has every allocation, free and new
segment with the Python frames that asked for it, so :func:`segment_growth` can say which requests
made the pool grow, and whether free bytes sat in it at that moment.

    python -m benchmarks.memory_history history.pickle.gz   # prints the segment growth table
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a history written by recorded() (.pickle.gz)")
    parser.add_argument("--min-mb", type=float, default=8.0, help="rows for segments of at least this size")
    args = parser.parse_args()
    with gzip.open(args.path, "rb") as handle:
        snapshot = pickle.load(handle)
    for row in segment_growth(snapshot):
        if row["size"] >= args.min_mb * 2**20:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
