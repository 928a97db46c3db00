"""Memory no tensor accounts for: the CUDA context, library workspaces, allocator fragmentation."""

from __future__ import annotations

#: The CUDA context of a PyTorch process (primary context, module images loaded at init):
#: nvidia-smi/pynvml see 0.4–0.6 GB on current GPUs before any tensor exists.
CUDA_CONTEXT_BYTES = 500_000_000

#: Memory pynvml sees above torch's reserved pool once training has run: cuBLAS/cuBLASLt
#: handles and workspaces and lazily loaded kernel images (bitsandbytes' library, the
#: optimizer's kernels). Measured on the hf stack (H100): 0.27–0.43 GB, all five anchors.
HF_LIBRARY_BYTES = 300_000_000

#: The same for vramplan's trainer: cuBLAS workspace plus its Triton modules. Not yet
#: measured; a stated assumption until calibration replaces it.
VRAMPLAN_LIBRARY_BYTES = 150_000_000


def cuda_context_bytes() -> int:
    """The per-process CUDA context, outside torch's allocator."""
    return CUDA_CONTEXT_BYTES


def cuda_library_bytes(stack: str) -> int:
    """Library workspaces and kernel images loaded on the first step (outside torch's allocator)."""
    return HF_LIBRARY_BYTES if stack == "hf" else VRAMPLAN_LIBRARY_BYTES


def unreused_segment_bytes(persistent: int, logits_set: int, layer_set: int, allocated_peak: int) -> int:
    """Fragmentation of PyTorch's caching allocator when two big transient working sets alternate.

    The allocator never merges separately cudaMalloc'ed segments and caches freed blocks
    for reuse. The loss's full-size logits copies and one layer's recompute working set
    (attention scores on the math path, MLP intermediates) are requested in different sizes
    at different moments, so once both have run each keeps its own segments: reserved ≈
    persistent + the logits set + the layer set, and the excess over the allocated peak is
    fragmentation (measured reserved − allocated: 0.3–5.2 GB on the hf stack).
    """
    return max(0, persistent + logits_set + layer_set - allocated_peak)


#: vramplan's trainer allocates the same shapes every layer and every step (fixed loss
#: chunks, one layer's buffers), so cached blocks are reused; a stated 5% margin.
POOLED_FRAGMENTATION = 0.05


def pooled_fragmentation_bytes(transient: int) -> int:
    """Fragmentation when transient buffers recur in identical sizes: a fraction of the transient bytes."""
    return int(POOLED_FRAGMENTATION * transient)
