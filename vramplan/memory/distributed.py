"""Bytes that exist only when a run spans several GPUs: shards, gathered layers, gradient buckets, NCCL.

Every figure is **per rank**: each GPU runs one process with its own CUDA context, its own
copy (DDP) or shard (FSDP2) of the model and its own NCCL communicator. Nothing here is
measured yet (the lead's ``benchmarks/multigpu.py`` on 2×H200 will be); the constants are
named so a calibration can correct them one by one.

- **DDP** (``torch.nn.parallel.DistributedDataParallel``): the whole quantized model on every
  rank, and the reducer's gradient buckets: a flat copy of every trainable gradient, cut
  into buckets of ``bucket_cap_mb`` (25 MB by default) that are all-reduced as they fill
  during the backward. The buckets hold all gradients, so their total is the gradients'
  size whatever the cap; the cap only sets how much all-reduce is left after the backward.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``), as FSDP-QLoRA does it: the NF4 bytes
  are stored in a float storage dtype (bitsandbytes' ``quant_storage``) so FSDP can flatten
  and shard them; the packed weights, their absmax and quant state, the norms, the
  embedding and the LM head (the root unit) are split N ways, each tensor padded to a
  multiple of N storage elements. A decoder layer is all-gathered to full size just
  before it runs and freed after; the next one is prefetched meanwhile, and the gather
  lands in a staging buffer that is copied out into the layer's parameters.
"""

from __future__ import annotations

import math

#: FSDP2 unsharded decoder layers alive at once: the one computing and the one prefetched
#: (forward prefetch of the next layer, backward prefetch of the previous one).
FSDP_LAYERS_IN_FLIGHT = 2

#: FSDP2 all-gathers into one flat output buffer per unit and copies it out into the
#: unsharded parameters (``foreach_all_gather_copy_out``); the buffer is allocated on the
#: all-gather stream, so the compute stream cannot reuse it: one more layer's worth.
FSDP_ALLGATHER_STAGING_LAYERS = 1

#: LoRA gradients of a layer wait, unsharded, for their reduce-scatter while the next
#: layer's backward runs: the reduce-scatter input of two layers (its output is a shard).
FSDP_REDUCE_SCATTER_LAYERS = 2

#: FSDP2 flattens the NF4 bytes into a 2-byte float storage (bf16), so padding to a multiple
#: of N is counted in 2-byte elements.
FSDP_STORAGE_BYTES = 2

#: DDP's default bucket size (``bucket_cap_mb=25``, in MiB inside the reducer).
DDP_BUCKET_CAP_BYTES = 25 * 2**20

#: Whether the trainer passes ``gradient_as_bucket_view=True`` to DDP (the gradients then
#: live inside the buckets, no copy). The default is False: the buckets are a second copy.
DDP_GRADIENT_AS_BUCKET_VIEW = False

#: NCCL's buffers per connection, per protocol: ``NCCL_BUFFSIZE`` (Simple, 4 MiB by default,
#: NCCL user guide, Environment Variables), LL (512 KiB: 8 lines × 512 threads × 8 steps ×
#: 16 B) and LL128 (4.69 MiB: 120 elements × 640 threads × 8 steps × 8 B), as NCCL's
#: ``DEFAULT_*_BUFFSIZE`` constants set them.
NCCL_BUFFSIZE_BYTES = 4 * 2**20
NCCL_LL_BUFFSIZE_BYTES = 512 * 2**10
NCCL_LL128_BUFFSIZE_BYTES = 4_915_200

#: Channels NCCL opens per communicator (an assumption: NCCL logs show 2–4 over PCIe and
#: 16–32 over NVLink/NVSwitch; 16 is taken for all, which overstates PCIe boxes by ~0.2 GB).
NCCL_CHANNELS = 16

#: Connections with buffers per channel: the ring's receive from the previous rank and the
#: tree's receive from its parent/child.
NCCL_CONNECTIONS_PER_CHANNEL = 2

#: NCCL's own device memory beyond its buffers: its kernels' module images, proxy and
#: work FIFOs, the communicator's device structures (an assumption, ~0.1–0.2 GB seen as
#: the extra pynvml usage of a process once its first collective ran).
NCCL_LIBRARY_BYTES = 150_000_000


def nccl_buffer_bytes() -> int:
    """NCCL's device memory per rank for one communicator: channels × connections × the three
    protocols' buffers, plus its library memory (see the constants: ≈0.46 GB)."""
    per_connection = NCCL_BUFFSIZE_BYTES + NCCL_LL_BUFFSIZE_BYTES + NCCL_LL128_BUFFSIZE_BYTES
    return NCCL_CHANNELS * NCCL_CONNECTIONS_PER_CHANNEL * per_connection + NCCL_LIBRARY_BYTES


def shard_bytes(total: int, ranks: int, tensors: int = 1) -> int:
    """One rank's share of ``total`` bytes held in ``tensors`` tensors, each padded to a multiple
    of ``ranks`` storage elements before FSDP2 splits it (dim-0 chunks, the last padded)."""
    padding = tensors * (ranks - 1) * FSDP_STORAGE_BYTES
    return math.ceil((total + padding) / ranks)


def ddp_bucket_bytes(grad_bytes: int) -> int:
    """DDP's gradient buckets: every trainable gradient once more (none with bucket views)."""
    return 0 if DDP_GRADIENT_AS_BUCKET_VIEW else grad_bytes


def fsdp_gathered_layer_bytes(layer_bytes: int) -> int:
    """Unsharded decoder layers on a rank at once: in flight plus the all-gather staging buffer."""
    return (FSDP_LAYERS_IN_FLIGHT + FSDP_ALLGATHER_STAGING_LAYERS) * layer_bytes


def fsdp_reduce_scatter_bytes(layer_grad_bytes: int) -> int:
    """LoRA gradients waiting unsharded for their reduce-scatter (two layers')."""
    return FSDP_REDUCE_SCATTER_LAYERS * layer_grad_bytes


def ring_bytes_all_reduce(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: 2(N−1)/N of them."""
    return 2.0 * (ranks - 1) / ranks * nbytes


def ring_bytes_gather(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-gather or reduce-scatter whose full
    (unsharded) size is ``nbytes``: (N−1)/N of them."""
    return (ranks - 1) / ranks * nbytes
