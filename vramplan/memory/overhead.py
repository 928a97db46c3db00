"""Memory no tensor accounts for: the CUDA context, library workspaces, allocator fragmentation."""

from __future__ import annotations

from vramplan.memory.optimizer import MANAGED_CHUNK_BYTES

#: The CUDA context of a PyTorch process (primary context, module images loaded at init):
#: nvidia-smi/pynvml see 0.4–0.6 GB on current GPUs before any tensor exists.
CUDA_CONTEXT_BYTES = 500_000_000

#: Memory pynvml sees above torch's reserved pool once training has run: cuBLAS/cuBLASLt
#: handles and workspaces and lazily loaded kernel images (bitsandbytes' library, the
#: optimizer's kernels). Measured on the hf stack (H100): 0.27–0.43 GB, all five anchors.
HF_LIBRARY_BYTES = 300_000_000

#: The same for vramplan's trainer: its Triton modules, bitsandbytes' optimizer kernels, cuBLAS's
#: kernel images (cuBLAS's workspaces are torch's allocations: ``cublas_workspace_bytes``).
#: Measured on an H100 (benchmarks/results/trainer_h100.jsonl): pynvml used minus torch's reserved
#: peak was 0.29, 0.29 and 0.30 GB on Llama-3.2-1B (2048, 4096) and Gemma-4-E2B (2048). Over the
#: 20 fresh-process runs of sessions 2-3 it takes three values, 0.15, 0.29 and 0.42 GB (steps of
#: 128 MiB, unrelated to model size): 0.29 is the middle one, so a run sits within ±0.13 GB of it.
#: One of the steps is the first managed allocation (below). Session 9 (benchmarks/results/session9: the
#: campaign's driver readings, memory_stages per module) saw it follow bitsandbytes' first optimizer step in
#: every Llama, Gemma 4 and Qwen3-4B process and in none of Qwen3-0.6B's or 1.7B's, whose adapters are all
#: too small for bitsandbytes to page (expandable segments on or off); the driver's stack limit stayed at
#: 1,024 B a thread and no Triton kernel needs more than 16 B of local memory.
VRAMPLAN_LIBRARY_BYTES = 290_000_000

#: Part of the figure above: a process's first CUDA managed allocation (a paged optimizer's first paged
#: state) reserves 128 MiB outside torch's pool whatever its size (H100 probes,
#: benchmarks/results/session5/outside.jsonl; Llama-3.2-1B read 1.730 GB with AdamW8bit, 1.852 paged). A plan
#: that pages nothing does not pay it: torch AdamW, the fused 8-bit AdamW, bitsandbytes' unpaged AdamW8bit,
#: and a paged one whose adapters are all under bitsandbytes' paging size (``memory.adapters.PAGED_MIN_NUMEL``:
#: Qwen3-0.6B's and 1.7B's at rank 16, Llama-3.2-1B's at rank 8), as session 9 saw (results/session9/README.md).
#: It is the first of the chunks NVML counts paged states in (``memory.optimizer.MANAGED_CHUNK_BYTES``).
MANAGED_FIRST_ALLOCATION_BYTES = MANAGED_CHUNK_BYTES


#: torch hands cuBLAS a workspace from its caching allocator (inside torch's allocated and
#: reserved bytes, so not in the library figures above) for each (cuBLAS handle, stream), and
#: the handles are per thread: one for the forward on the caller's thread, one for autograd's
#: backward thread. 32 MiB each on Hopper (aten/src/ATen/cuda/CublasHandlePool.cpp,
#: ``parseChosenWorkspaceSize``: ``4096 * 8`` KiB on sm_90; 8.1 MiB elsewhere, where this
#: overstates by 48 MB), plus cuBLASLt's own 1 MiB per handle.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20 + 2**20
CUBLAS_THREADS = 2


#: What a run with CUDA graphs (``vramplan.stacks.vramplan.graphs_apply``) holds beyond the same run without them.
#: Measured on an H100 (benchmarks/results/trainer_graphs_h100.jsonl against trainer_h100.jsonl, pynvml
#: above the context, same configuration), the graph runs read +0.24 to +0.30 GB on Gemma-4-E2B, E4B,
#: Llama-3.1-8B and Llama-3.2-1B at 4,096 tokens, and -0.05 to +0.22 GB on Llama-3.2-1B at 2,048. Those
#: runs leaked every replayed step's input embeddings (and Gemma 4's per-layer inputs), a bug fixed in
#: session 7 (``graphs.StaticInputs.fill``). Less the leak (replays x those bytes: 0.30 GB of Gemma-4-E2B's
#: 0.30), the ten pairs lie between -0.11 and +0.16 GB, median +0.02. The one leak-free graph run (session 7:
#: Llama-3.2-1B with an int8 head and the fused optimizer) read 0.10 GB over the planner's other components.
#: One constant at that 0.10 GB errs on the side of caution for the pairs.
CUDA_GRAPH_BYTES = 100_000_000


def cuda_graph_bytes() -> int:
    """The extra memory of replaying the steps as CUDA graphs (one constant, measured)."""
    return CUDA_GRAPH_BYTES


#: What stepping the adapters as one flat tensor (``Plan.steps_flat``) holds beyond the per-tensor
#: step, on top of its flat fp32 gradient buffer (4 bytes a trainable parameter, counted apart).
#: Measured on an H100 under CUDA graphs (trainer_graphs_h100.jsonl, pynvml above the context):
#: +0.29 GB on Llama-3.2-1B at 2,048 and +0.30 at 4,096 tokens (11 M adapter parameters), +0.38 GB on
#: Llama-3.1-8B (42 M); eager runs held 0.25-0.5 GB more. Not split by cause: bitsandbytes' paged
#: buffers for one large state tensor and the allocator's segments around it, most likely.
FLAT_OPTIMIZER_BYTES = 250_000_000


def flat_optimizer_bytes(trainable_params: int) -> int:
    """The extra memory of the flat optimizer step: the measured constant and the flat fp32 gradient."""
    return FLAT_OPTIMIZER_BYTES + 4 * trainable_params


def cublas_workspace_bytes() -> int:
    """cuBLAS(Lt) workspaces of the forward's and the backward's threads, allocated on a step's first matmuls and kept."""
    return CUBLAS_THREADS * CUBLAS_WORKSPACE_BYTES


def cuda_context_bytes() -> int:
    """The per-process CUDA context, outside torch's allocator."""
    return CUDA_CONTEXT_BYTES


def cuda_library_bytes(stack: str, managed_allocation: bool = True) -> int:
    """Library workspaces and kernel images loaded on the first step (outside torch's allocator);
    ``managed_allocation``: whether vramplan's trainer allocates CUDA managed memory (paged optimizer states)."""
    if stack == "hf":
        return HF_LIBRARY_BYTES
    return VRAMPLAN_LIBRARY_BYTES - (0 if managed_allocation else MANAGED_FIRST_ALLOCATION_BYTES)


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

#: What the caching allocator holds beyond the allocated peak even when shapes repeat. Eager steps: torch's small pool
#: (requests of at most 1 MiB) peaks when every adapter gradient it serves exists, and what the large pool has let go
#: by then cannot serve it (session 23's allocator histories, ``benchmarks.memory_history.pool_peaks``: holes of
#: 1-7 MiB, the small pool 125 and 38.6 MiB under its own peak when the step peaked, for 126 and 38 MiB of
#: gradients). So the slack is those gradients made after the step's allocated peak, byte for byte
#: (``small_gradients_after_peak``), plus this floor: the mean of the rest over session 12's eager Llama-3.2-1B runs
#: (``benchmarks.allocator_slack.eager_slack_fit``: ranks 8-256, 1,024-4,096 tokens). Session 24 set it so, after the
#: registered rank sweep (Qwen3-4B at ranks 8-128, Qwen3-0.6B at 16-128) bore out the timing; session 22's line
#: (9.6 MB + 1.64 bytes a small-pool gradient byte, whatever the timing) had priced Qwen3-4B at rank 64 at 0.43 GB
#: for 0.07-0.10 held. Captured: the intercept of the line below, fitted on session 12's rank sweep.
EAGER_FRAGMENTATION_FLOOR_BYTES = 39_615_000
#: The eager constant before session 22, from sessions 2-3's runs, made without expandable segments: 0.17, 0.20 and
#: 0.17 GB on Llama-3.2-1B at 2,048 and 4,096 tokens and Gemma-4-E2B at 2,048. Kept where the line above was not
#: measured: without expandable segments (switch ``expandable_segments`` off), and on DDP and FSDP2 ranks, whose
#: reducers and sharded gradients allocate otherwise.
UNFITTED_EAGER_FRAGMENTATION_BYTES = 170_000_000
CAPTURED_FRAGMENTATION_FLOOR_BYTES = 129_000_000

#: A captured run's slack grew with its adapters while the trainer let a shape's eager first pass make the gradients
#: and the adapters' bf16 copies among its activations: they kept those pages of the regular pool mapped through the
#: capture (session 21's allocator history, benchmarks.memory_history). Bytes a trainable parameter, the slope of
#: session 12's rank sweep (Llama-3.2-1B and Qwen3-4B at ranks 8-256, 5.6-528 M parameters: 0.10-1.53 GB);
#: Gemma-4-E2B's ranks 32 and 128 held out. Captures made compact (``compact_captures``, on since session 21, the
#: trainer's only path since session 26: the planner prices this only for lines measured before) leave none of it:
#: 0.09-0.17 GB of slack at every rank, 8-256 (session 21, call 3: Llama-3.2-1B, Qwen3-1.7B and Qwen3-4B, Qwen3-4B at
#: rank 256 from 1.53 to 0.15 GB), which the floor prices.
CAPTURED_FRAGMENTATION_PER_TRAINABLE = 2.64


def small_gradients_after_peak(small: int, checkpoints: int, layer_set: int, loss: int, gradients: int) -> int:
    """The small pool's adapter gradients (``small`` bytes) made after an eager step's allocated peak: the slack
    ``pooled_fragmentation_bytes`` prices. The step peaks where the backward starts (every checkpoint held, the
    loss's buffers or a layer's working set on top) or where it ends (every gradient made, ``gradients`` bytes in
    all). Peaking at the start, all of ``small`` comes after; at the end, only as much as the large pool let go
    between the two, so at high ranks, where gradients outgrow checkpoints, none (session 23's pool histories and
    its registered rank sweep, run in session 24: slack over small-pool gradients 1.2-1.7 while the start is the
    peak, 0.4 and 0.8 where the end overtakes it). For a step whose gradients the backward makes layer by layer
    (``stacks.vramplan.gradients_made_in_backward``)."""
    start = checkpoints + max(loss, layer_set)
    end = gradients + layer_set
    # so the step's allocated peak plus this is the larger of the start's with every such byte and the end's
    return min(small, max(0, start - end + small))


def pooled_fragmentation_bytes(transient: int, trainable: int = 0, captured: bool = False, prologue: int = 0,
                               compact: bool = True, small_gradients: int | None = None) -> int:
    """Fragmentation when transient buffers recur in identical sizes: a fraction of the transient bytes, at least
    the measured floor; an eager step adds the gradients the small pool serves after its peak (``small_gradients``
    bytes, ``small_gradients_after_peak``; None: a process the line was not fitted on, priced at ``UNFITTED_EAGER_FRAGMENTATION_BYTES``), a captured
    step not made ``compact`` the first eager pass's adapter-sized buffers. A
    captured step's eager ``prologue`` (``activations.captured_prologue_bytes``) leaves its blocks cached in the
    regular pool every step, where the graph's pool never reuses them; the floor's blocks are cached there too, so the
    larger of the two counts. Gemma 4's per-layer rows make it the larger from about 4,096 tokens: on the H100, reserved - allocated
    of Gemma-4-E2B's captured steps held 0.24-0.29 GB at 2,048 and 4,096 tokens, 0.33-0.39 at 6,144 and 0.45-0.56
    at 8,192, E4B's 0.47-0.61 at 8,192 (sessions 14-16), where the floor priced 0.26 and 0.34 at every length."""
    if not captured:
        floor = (UNFITTED_EAGER_FRAGMENTATION_BYTES if small_gradients is None else
                 EAGER_FRAGMENTATION_FLOOR_BYTES + small_gradients)
        return max(int(POOLED_FRAGMENTATION * transient), floor)
    return (max(int(POOLED_FRAGMENTATION * transient), CAPTURED_FRAGMENTATION_FLOOR_BYTES, prologue)
            + (0 if compact else int(CAPTURED_FRAGMENTATION_PER_TRAINABLE * trainable)))
