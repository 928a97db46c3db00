"""How fast a plan trains on a GPU: predicted seconds per step, as pure arithmetic.

A step has a host side and a device side, which overlap (:func:`overlap`: about the longer of
the two, softened near the crossover):

* **host**: the ops the host dispatches (:func:`step_host_ops`: per LoRA linear, norm, decoder
  layer and Gemma 4 per-layer input, per pass: forward, the recompute under checkpointing, the
  backward; plus the optimizer's per-tensor Python for bitsandbytes) times a fitted host cost per
  op, plus checkpointing's Python hooks (a fitted number of host ops per checkpointed op). The
  count depends on the architecture and the settings, never on the sequence length: on the H100
  Llama-3.2-1B's QLoRA step stays at 0.16-0.26 s from 512 to 8,192 tokens while its GPU kernels
  take ~42 ms of a 220 ms step at 2,048 (benchmarks/results/profiles/);
* **device**: the step's matmul FLOPs (:func:`step_flops`) over the GPU's dense bf16 (fp16 when
  the plan computes in fp16) rate times a matmul efficiency (vramplan's stack: cuBLAS's profiled rate
  plus a profiled cost per matmul kernel, :data:`MATMUL_EFFICIENCY`; the hf recipe: fitted); the
  attention s² term at SDPA's profiled flash rate over the blocks its kernel computes (the whole square
  under a mask: sliding windows, and the session-5 trainer's captured steps; :func:`attention_seconds`),
  heads wider than flash
  attention takes at a slower kernel's profiled rate (the hf recipe's NF4 path runs attention and its
  upcast LM head in fp32, at that stack's fitted efficiency); the bytes a step moves (:func:`step_bytes`:
  NF4 dequantization, activations, logits, materialized attention scores, the optimizer's pass over its
  states) over the GPU's bandwidth; and a gap per kernel (:data:`KERNEL_FLOOR_S`), NF4 dequantization's
  ramp on top (:data:`NF4_DEQUANT_KERNEL_S`);
* **host link**: CPU-offloaded checkpoints cross PCIe (:func:`step_pcie_bytes`), added.

On several GPUs each rank runs that step on its own micro-batch, plus **communication**
over the box's interconnect (:func:`step_comm_bytes`, :data:`LINK_BYTES_PER_S`): DDP
all-reduces the LoRA gradients once per optimizer step, overlapped with the backward but
for its last bucket; FSDP2 all-gathers the frozen weights in the forward and again in the
backward and reduce-scatters the LoRA gradients, prefetching a layer ahead so the traffic
overlaps compute but for the first layer's gather. The box's tokens/s is N × a rank's
tokens over the step time. None of this is measured yet (no multi-GPU run so far).

The factors are fitted per stack to step times measured on an H100
(``profiles/calibration/throughput/h100.json``, written by ``benchmarks/throughput.py``).

How they carry over to other GPUs: the efficiencies are fractions of a catalog peak, so they
transfer as far as another GPU reaches the same fraction of its peak. The host cost per op is
not a GPU property at all: it is Python, PyTorch's dispatcher and the CUDA driver on the CPU
that feeds the GPU, so it is used unchanged for every GPU in the catalog and for every GPU of
a box (each rank has its own process and core). It holds for a host whose probe
(``vramplan.host.autograd_op_us``) reads ``vramplan.host.REFERENCE_AUTOGRAD_OP_US``; H100 machines
read 21-42 µs an op, and a host-bound plan's speed moves with the reading (``Factors.host_scale``:
``vramplan calibrate`` probes its machine, and predictions there use it). A GPU that is
faster than the H100 speeds a host-bound plan up not at all.

CUDA graphs (vramplan's trainer on one GPU, a model without routed experts:
``vramplan.stacks.vramplan.graphs_apply``) change the host term only:
:func:`captured_phases` names the phases a graph replays (forward, recompute, backward and the
checkpoint hooks, which ran once while capturing), and :func:`host_seconds_split` charges them
one replay's ops together (:data:`GRAPH_REPLAY_HOST_OPS`) instead of theirs. What stays eager is
the prologue (embedding lookups) and, after the trainer's one wait on the GPU (the gradient
norm), the optimizer and the step's bookkeeping, which :func:`combine` then adds to the step
instead of overlapping (:data:`AFTER_SYNC_PHASES`). Once the host is out of the way the device term
sets the step, and its constants come from two profiled graph steps (Llama-3.2-1B and Gemma-4-E2B at
2,048 tokens, benchmarks/results/session5/profile-graphs-*.txt), not from the host-bound eager runs: on
the other 11 committed H100 graph configurations the model is 6.4% off on average (median 4.3%, at most
15.2%, 10 within 15%; benchmarks/results/throughput.md), where with the eager-fitted rates it predicted
7-59% more tokens/s than measured (28.0% mean). Those runs captured their steps under transformers
5.17's explicit mask; the trainer now keeps the causal kernel there, so a plan's captured attention is
priced as its eager one (``masked_captures`` prices the measured runs as they ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vramplan.arch import Architecture, Layer
from vramplan.catalog import GpuSpec, read_json, profiles_dir
from vramplan.errors import VramplanError
from vramplan.occupancy import (FLASH_BACKWARD, FLASH_BACKWARD_256, FLASH_FORWARD, WIDE_BACKWARD, WIDE_FORWARD, Tiling,
                                 fill)
from vramplan.memory.activations import (FLASH_MAX_HEAD_DIM, chunked_attention_chunk_rows, chunked_attention_chunks,
                                         chunked_attention_keys_per_query, sliding_window_of)
from vramplan.memory.adapters import paged_tensors
from vramplan.memory.logits import dequant_slice_rows, int8_head_block, loss_chunk_tokens
from vramplan.plan import EXPERT_TARGETS, Plan
from vramplan.stacks.vramplan import (attention_kernel_of, band_window_of, flat_step_applies, graphs_apply,
                                     int8_vocab_major, steps_fused, wide_heads_chunked)

#: Effective host-to-device rate of a PCIe 4.0 x16 link (GB/s, of the 32 nominal).
PCIE_BYTES_PER_S = 25e9

#: Bytes moved per base weight per pass (forward, backward, recompute). NF4: read 0.52 B
#: (4.13 bits), write a bf16 copy and read it back in cuBLAS (vramplan's fused path, which
#: skips the copy, only runs at <= 64 tokens). int8: read 1 B, write and read 2 B each.
WEIGHT_BYTES_PER_PASS = {"nf4": 0.52 + 2 + 2, "int8": 1 + 2 + 2, "bf16": 2}

#: Activation element reads+writes per token per layer and pass: per hidden-sized value
#: (norms, residual adds, RoPE, attention in/out, casts) and per MLP-intermediate value
#: (gate, up, the activation, their product). hf's recipe runs unfused in fp32.
ACTIVATION_ACCESSES = {"vramplan": (14, 5), "hf": (30, 8)}
ACTIVATION_BYTES = {"vramplan": 2, "hf": 4}  # hf: fp32 where prepare_model_for_kbit_training upcast (4-bit, 8-bit)

#: Host ops per pass, as ``(forward, recompute, backward)``: what the host dispatches (aten ops that
#: launch device work, Triton launches, bitsandbytes calls), the unit the CPU launch counters count:
#: benchmarks/launch_count.py on vramplan's trainer (per decoder layer of Llama, Qwen3, Gemma 3 and
#: Gemma 4 structures; Llama's 51 forward, 35 recompute, 67 backward) and benchmarks/launch_count_hf.py
#: on the hf recipe (transformers + PEFT + bitsandbytes, run on the CPU with bf16 compute as on a GPU;
#: the same four structures, NF4 and bf16, with and without checkpointing). tests/test_launch_count.py
#: holds the model to both within 15% per layer and phase.
#: None of them depends on the sequence length. The recompute is shorter than the forward:
#: torch.utils.checkpoint's non-reentrant recompute stops once the last saved tensor is rebuilt, so a
#: layer's trailing residual adds and gating are not replayed.
#:
#: per LoRA-adapted linear: base matmul, the two LoRA matmuls, casts, the add; the recompute
#: reuses the forward's bf16 copies of the adapters; the backward adds dA and dB. hf (counted, bf16
#: base): PEFT casts the input to the fp32 adapters' dtype and the result back, scales and adds.
HOST_OPS_PER_LINEAR = {"vramplan": (5, 3, 7.5), "hf": (10, 9.5, 10.5)}
#: per quantized linear: dequantize each pass (vramplan: one Triton launch). hf, counted: the
#: forward's ``bitsandbytes::gemm_4bit`` is one op where the bf16 base's matmul was one; the backward
#: adds the double-quantized dequantization (absmax, its offset, the weight). Every linear of the hf
#: recipe is quantized, adapted or not.
HOST_OPS_PER_DEQUANT = {"vramplan": (1, 1, 1), "hf": (0, 0, 3)}
#: What the counter cannot see inside a bitsandbytes 4-bit matmul on hf, in host ops' worth per
#: quantized linear and pass: its CUDA kernel is Python (torch.library) that allocates, launches the
#: absmax's and the weight's dequantization through ctypes, adds the offset and runs the linear
#: (bitsandbytes/backends/cuda/ops.py, ``_dequant_linear_fallback``), all behind one counted op.
#: Measured on the CPU (``python -m benchmarks.launch_count_hf --time``, single-threaded): a quantized
#: Llama layer's checkpointed step takes 1.40-1.44× the bf16 one's at 1.03× its counted ops, 5.6-5.8
#: ops' worth per quantized linear and pass beyond them (three runs). A proxy: on the H100 the NF4/bf16
#: pairs imply 9-14 (Llama-3.2-1B, Qwen3-0.6B at 2,048 tokens, one measurement each), so hf's bf16
#: rows are still predicted slow (benchmarks/results/throughput.md).
HF_UNCOUNTED_DEQUANT_HOST_OPS = 5.7
#: per RMSNorm: vramplan's is a Triton kernel, with a copy or cast around it on some (counted: Llama
#: and Qwen3 2 a pass, Gemma 3 and 4 1-1.3). hf's is unfused (cast to fp32, square, mean, rsqrt,
#: scale, cast back): under NF4 prepare_model_for_kbit_training has upcast the weights and the residual
#: stream to fp32, so the casts are no-ops and dispatch nothing; a bf16 model's norm casts
#: :data:`HF_NORM_CASTS` times more (counted: Llama 6/6/13 and 8/8/15 a norm).
HOST_OPS_PER_NORM = {"vramplan": (1.5, 1.5, 1.5), "hf": (6.5, 6.5, 12.5)}
HF_NORM_CASTS = (2.5, 2.5, 2)
#: per decoder layer otherwise: the attention call, the gated activation, residual adds, RoPE
#: (vramplan: one Triton launch a pass where patched; transformers' ~10 ops where not)
HOST_OPS_PER_LAYER = {"vramplan": (5, 3, 3), "hf": (15, 13, 22)}
#: transformers' RoPE on vramplan's stack where it stays unpatched, beyond the one launch
#: HOST_OPS_PER_LAYER counts (Gemma 4: q and k rotated in separate calls; its shared-KV layers
#: rotate only q; as counted on Gemma-4-E2B's structure)
HOST_OPS_ROPE_UNFUSED = (9, 9, 13)
HOST_OPS_ROPE_UNFUSED_Q_ONLY = (4, 4, 6)
#: vramplan's chunked attention of a wide-head layer (vramplan.train.attention), counted from its code: per call,
#: then per chunk of queries in a forward (slices, the fp32-out matmul, the mask, log-sum-exp, exp, PV, the writes)
#: and in the backward (the same recomputed, dV, dP, dS, dQ, dK).
HOST_OPS_CHUNKED_ATTENTION = {"call": 5, "forward_chunk": 30, "backward_chunk": 45}
#: The same with its row passes fused (switch ``wide_head_fused_rows``): the mask, log-sum-exp, exp and casts become
#: one launch forward, and the recomputed probabilities and dS one launch backward.
HOST_OPS_CHUNKED_ATTENTION_FUSED = {"call": 5, "forward_chunk": 19, "backward_chunk": 31}
#: What one of those ops costs the host, as a share of a recorded op (:class:`Factors` ``seconds_per_host_op``): they
#: run inside an autograd Function (vramplan.train.attention.ChunkedAttention), so autograd records none of them and no
#: checkpoint hook packs their tensors; each is a dispatch, a launch and the loop's Python. Read off two measurements,
#: none of them a speed line: on the reference host's runs (``benchmarks.records.REFERENCE_HOST_RUNS``) a dispatched
#: in-place add cost 0.274 of a recorded op (their probes' median, ``host_dispatch_us`` over ``host_autograd_us``), and
#: on the CPU a chunk's op cost 1.21 dispatched adds (``benchmarks/unrecorded_ops.py``,
#: benchmarks/results/session26/unrecorded-ops-cpu.json). Until session 26 they were priced as recorded ops, and
#: checkpointed: Gemma-4-E2B's eager step at 4,096 tokens, its sliding layers' band in 8 chunks, ran 2.0x faster than
#: priced (session 26's H100 call).
UNRECORDED_OP_SHARE = 0.33
#: Gemma 4's per-layer embedding gating with its two linears (not recomputed: it follows the
#: layer's last saved tensor; on hf its linears are quantized, which HOST_OPS_PER_DEQUANT adds)
HOST_OPS_PER_LAYER_INPUT = {"vramplan": (8, 0, 16), "hf": (8, 0, 16)}
HOST_OPS_PER_PLAIN_LINEAR = (1, 1, 1)  # another linear LoRA leaves alone: its matmul, dX in the backward
_LAYER_INPUT_LINEARS = ("per_layer_input_gate", "per_layer_projection")
#: per micro-batch outside the layers (embedding, masks, cos/sin, loss) and per optimizer
#: step outside the optimizer (vramplan: gradient clipping, the scheduler, zeroing; the hf recipe as
#: measured clips nothing and zeroes by dropping the gradients: counted 1)
HOST_OPS_PER_MODEL = {"vramplan": (60, 0, 15), "hf": (35, 0, 15)}
#: Of the per-model forward ops, the frozen embedding lookups (:func:`prologue_host_ops`): the token
#: embedding (Gemma's scaled by √hidden: one op more) and Gemma 4's per-layer input table, reshaped and
#: scaled. Counted with ``benchmarks.launch_count.count_graph_prologue`` (launches and host-only ops alike):
#: Llama and Qwen3 structures 1, Gemma 3 2, Gemma 4 9. A CUDA graph cannot hold them (the tables of
#: Llama-8B and Gemma 4 stay in host memory), so they stay eager when the step is captured.
HOST_OPS_EMBEDDING_LOOKUP = 1
HOST_OPS_EMBEDDING_SCALE = 1
HOST_OPS_PER_LAYER_INPUT_LOOKUP = 7
HOST_OPS_PER_STEP = {"vramplan": 25, "hf": 1}
#: The optimizer's host work per trainable tensor, in host ops: bitsandbytes' 8-bit AdamW steps
#: each tensor from Python (~165 µs of host time each, profiled: 32 ms for Llama-3.2-1B's 224
#: adapters, ~3 ops' worth; one counted op each); torch's AdamW runs foreach kernels over all tensors at once.
OPTIMIZER_HOST_OPS_PER_TENSOR = {"paged_adamw8bit": 3.0, "adamw8bit": 3.0, "adamw": 0.1}
OPTIMIZER_HOST_OPS_PER_STEP = {"paged_adamw8bit": 0.0, "adamw8bit": 0.0, "adamw": 20.0}
#: The fused 8-bit AdamW (``vramplan.stacks.vramplan.steps_fused``: ``VRAMPLAN_ENABLE=fused_optimizer``,
#: kernels/adamw8bit.py), counted from its code (``FusedAdamW8bit.step``/``update``), not yet profiled: per
#: step the learning rate's fill, the step count's add and the clip scale's reset, and one kernel launch per
#: tensor it steps (the flat buffer on one process; each local shard under FSDP2). Its clipping on the device
#: (norm, add, divide, clamp, isfinite, full_like, where, copy) stands where HOST_OPS_PER_STEP counts the
#: foreach clipping, and the trainer reads the norm only after the step: no wait on the GPU before it.
FUSED_OPTIMIZER_HOST_OPS_PER_STEP = 3.0
FUSED_OPTIMIZER_HOST_OPS_PER_TENSOR = 1.0
#: RoPE patched with the Triton kernel on vramplan's stack (vramplan.train.patching.ROPE_PATCHED_BY_DEFAULT), but for
#: these model types only on captured steps (``switches.gemma4_rope_fused``)
ROPE_UNPATCHED_MODEL_TYPES = ("gemma4",)

#: How host work and device work overlap: the step takes (host^p + device^p)^(1/p). The host
#: queues kernels ahead of the GPU, so the step is the longer of the two where one dominates
#: (p -> inf is max); near the crossover each waits on the other now and then (syncs, the
#: caching allocator, the loss's .item()), which a finite p adds. Fixed, not fitted.
OVERLAP_SHARPNESS = 4.0



@dataclass(frozen=True)
class AttentionKernel:
    """One family of SDPA's kernels: how it tiles a head (:mod:`vramplan.occupancy`) and the fraction of the
    bf16 peak its forward and backward reach over the blocks they compute while every SM is busy."""

    forward: Tiling
    backward: Tiling
    forward_efficiency: float
    backward_efficiency: float


#: Read off H100 profiles of the trainer at 1,024 and 2,048 tokens (benchmarks/results/session9/
#: profile-graphs-*-1024.txt, session8/profile-graphs-*-2048.txt; the eager 2,048-token profiles in
#: benchmarks/results/profiles/ agree within 2%): each call's counted FLOPs over its time and its
#: :func:`vramplan.occupancy.fill`, the geometric mean of the two lengths; every call lands within 8%.
#:
#: * cuDNN's flash kernels, heads up to 128 wide (Llama-3.2-1B, causal): 36.7% and 42.9% forward, 37.4%
#:   and 41.7% backward;
#: * the same at 256-wide heads (Gemma-4-E2B's sliding layers, whose window is a mask: the whole square):
#:   29.2% and 27.6% forward, 19.8% and 21.0% backward;
#: * the memory-efficient kernels of 512-wide heads (Gemma-4-E2B's full layers, causal): 13.5% and 12.0%
#:   forward, 1.9% and 2.2% backward.
#:
#: Handed a mask, the flash kernels are slower a block: session 5's trainer captured Llama-3.2-1B's steps
#: under an explicit mask (benchmarks/results/session5/profile-graphs-llama-3.2-1b.txt), 132 µs and 321 µs a
#: call at 2,048 tokens over the whole square, 27.1% and 27.9% at their fill, where the causal kernel reaches
#: 42%. Gemma's 256-wide rates above were all measured under its sliding mask.
FLASH_ATTENTION = AttentionKernel(FLASH_FORWARD, FLASH_BACKWARD, 0.397, 0.395)
FLASH_ATTENTION_256 = AttentionKernel(FLASH_FORWARD, FLASH_BACKWARD_256, 0.284, 0.204)
WIDE_HEAD_ATTENTION = AttentionKernel(WIDE_FORWARD, WIDE_BACKWARD, 0.127, 0.0204)
MASKED_FLASH_ATTENTION = AttentionKernel(FLASH_FORWARD, FLASH_BACKWARD, 0.271, 0.279)
#: Session 5's trainer replayed its steps under transformers 5.17's capture-time mask
#: (benchmarks/results/session5/profile-graphs-gemma-4-e2b-text.txt): fmha_cutlassF 0.57 ms a call,
#: fmha_cutlassB 8.7 ms, 68.8 ms a step for the 1.08 TFLOP :func:`step_flops` counts at 2,048 tokens, 1.6% of
#: the peak over forward, recompute and backward together. Its flash layers ran the whole square at the
#: rates above (Llama-3.2-1B's 132 µs and 321 µs a call: 27% of the peak, 28% at their fill).
CAPTURED_WIDE_HEAD_ATTENTION_EFFICIENCY = 0.016
#: vramplan's chunked attention for heads over 256 wide (switch ``wide_head_attention``, vramplan.train.attention):
#: cuBLAS matmuls and elementwise passes over score chunks, each chunk reading the keys up to its last query
#: (:func:`vramplan.memory.activations.chunked_attention_keys_per_query`). Read off session 13's H100 graph profiles of
#: Gemma-4-E2B at 2,048 tokens without and with it (benchmarks/results/session13/profile-graphs-*-2048.txt and
#: call4/): the step's kernels took 153.4 and 120.2 ms, the memory-efficient kernels 51.9 ms of the first (fmha_cutlassB
#: 46.4, fmha_cutlassF 5.5), so the chunked path 18.7 ms for the 1.62 TFLOP its chunks compute over forward,
#: recompute and backward: this fraction of the bf16 peak.
CHUNKED_WIDE_HEAD_ATTENTION_EFFICIENCY = 0.0878
#: The same path with its row passes fused in Triton (switch ``wide_head_fused_rows``): session 14's A/B of E2B at
#: 2,048 tokens (benchmarks/results/session14/call1/trainer.jsonl) took 10.45 ms off the step (124.9 -> 114.5 ms), so
#: the 18.7 ms above became 8.25 ms for the same 1.62 TFLOP.
CHUNKED_FUSED_WIDE_HEAD_ATTENTION_EFFICIENCY = 0.199
#: The same fused path over a sliding window's band (switch ``sliding_band_attention``): 256-wide heads, so the row
#: passes weigh twice as much against the matmuls as on 512-wide ones, and each chunk computes up to two windows of
#: keys of which a query reads one. Session 15's H100 A/B of Gemma-4-E2B at 8,192 tokens in fresh processes
#: (benchmarks/results/session15/call1/trainer.jsonl): 674.3 -> 516.5 ms a step, so the 28 sliding layers' 309.7 ms
#: under SDPA's mask (as priced, and as graph-profiled at 2,048 tokens in session 14) became 151.7 ms for the 8.4 TFLOP
#: its chunks compute over forward, recompute and backward: 5.58% of the bf16 peak, in chunks of 1,023 keys, 97% of
#: the work unaligned (:func:`unaligned_chunk_cost` 1.83); aligned, this fraction. Session 16's aligned run of the
#: same step (call 1: 443.6 ms) is held out for it. With the PyTorch row passes, 2.2x slower (session 16's kernel
#: table, aligned, 2,048 to 8,192 tokens: 2.18-2.24x; benchmarks/results/session16/call1/kernels/kernels.md).
CHUNKED_FUSED_BAND_ATTENTION_EFFICIENCY = 0.102
CHUNKED_BAND_ATTENTION_EFFICIENCY = CHUNKED_FUSED_BAND_ATTENTION_EFFICIENCY / 2.2
#: cuBLAS reads bf16 rows aligned to 16 bytes: a chunk whose height or key count is no whole multiple of this many
#: elements runs its matmuls off the aligned kernels.
ALIGNED_ELEMENTS = 8
#: How much more time such an unaligned chunk takes on the H100, forward and backward, the fused row passes included:
#: Gemma-4-E2B's full layer at 6,144 tokens in 341-row chunks against 320-row ones 1.88x for the same work (session
#: 15's call 3, benchmarks/results/session15/call3/chunk_rows.jsonl), its sliding layer's band at 2,048 to 8,192
#: tokens with 1,023-key chunks against 1,024 1.80-1.85x (session 16's call 1 kernel table); geometric mean. E4B's
#: band (two K/V heads) lost more, 2.7x at 8,192 tokens: session 15's lines of E4B's band are priced fast.
UNALIGNED_CHUNK_SLOWDOWN = 1.86
#: What vramplan's calibration records as its stack's attention efficiency (``Factors``): the flash rate.
FLASH_ATTENTION_EFFICIENCY = FLASH_ATTENTION.forward_efficiency

#: GPU time per kernel beyond its work: where the host no longer paces the GPU (a replayed graph) the
#: kernels run back to back, and the gap between one kernel's end and the next one's start is still
#: there. Measured from the graph profiles (benchmarks/results/session5/profile-graphs-*.txt): the
#: forward+backward's wall time (synced, the profiler off) less its kernels' summed GPU time (the
#: optimizer's kernels taken out) over its kernels (:func:`device_kernels`): Llama-3.2-1B
#: (50.0 - 47.2) ms / 2,466 = 1.1 µs, Gemma-4-E2B (181.8 - 175.7) ms / 6,908 = 0.9 µs. It does not hold a
#: small kernel's own ramp and tail (an RMSNorm of 6 MB takes 4.7 µs, ~2 µs of it its bytes): those sit
#: in the kernels' time, which the matmul efficiency and the bandwidth term price.
KERNEL_FLOOR_S = 1.0e-6
#: vramplan's NF4 dequantize kernel (kernels/nf4.py, one launch per quantized adapted linear and pass) beyond
#: the bytes :data:`WEIGHT_BYTES_PER_PASS` prices it: its ramp and tail, which the gap above does not hold. Read
#: off Llama-3.2-1B's causal-capture profile (benchmarks/results/session8/profile-graphs-llama-3.2-1b-2048.txt):
#: 333 calls a step at 9.64 µs, 3.21 ms, where their 7.36 GB (0.52 B read, 2 B written a weight) take 2.44 ms at
#: the bandwidth term's rate: 2.3 µs a call more. Not read from, and checked on, Gemma-4-E2B's profile beside it:
#: 612 calls at 10.13 µs, 2.6 µs a call beyond their bytes (this constant prices its 6.20 ms at 6.02). The profile
#: cannot tell a ramp from a lower bandwidth (both models' calls average 22-23 MB: 1.32 and 1.35 × their bytes).
#: Llama's other Triton kernels of activation size run at their bytes (RMSNorm 5.5 µs for 16.8 MB, the gated
#: activation 33.3 µs for 101 MB), so only the dequantization is charged a ramp.
NF4_DEQUANT_KERNEL_S = 2.3e-6
#: bitsandbytes' prefetch of a paged tensor's two states before every step (``Optimizer8bit.prefetch_state``: a
#: ``cudaMemPrefetchAsync`` each), which holds the stream even when the pages are resident; the trainer makes them
#: only on a state's first step since session 12 (switch ``prefetch_paged``, off), every line before prefetched.
#: Fitted on session 12's A/B (session12/ab-rope-prefetch.jsonl; Llama-3.2-1B, rank 64, 192 paged tensors, 2,048
#: tokens, graphs): 60.6 ms a step with them, 45.7 without, 38.8 µs a prefetch.
PREFETCH_S = 38.8e-6
#: What that profile pair still shows unpriced (per step, its 3 steps divided out): Gemma-4-E2B's kernels sum to
#: 161.6 ms, ~159 of them the replayed forward+backward (163.0 ms wall), against 152.5 priced. Its header's
#: "GPU busy 187.1" also sums the profiler's GPU-side Optimizer.step/zero_grad ranges (22.0 ms) and eager ops'
#: kernels a second time. By family: attention 71.4 (74.6 priced), matmuls 49.4+ (45.8), NF4 6.2 (6.0); the
#: other small kernels ~29.5 against 14.8 of activation, logit and optimizer bytes. Most of that excess is
#: transformers' RoPE, which Gemma 4 then kept unfused (:data:`ROPE_UNPATCHED_MODEL_TYPES`; on captured steps it
#: runs the Triton RoPE since session 12, 1.05x): non-vectorized
#: elementwise_kernel<128,4> (422 a step at 10.7 µs) and rotate_half's cat (100 at 16.8 µs). Llama runs the
#: Triton RoPE, so its profile gives nothing to price these from, and its own small kernels sit below their
#: priced bytes (~9.9 ms against 11.5: the weights' 2 B a weight that cuBLAS reads are also in the matmul term).

#: vramplan's matmuls (cuBLAS, nvjet kernels) as a rate and a cost per kernel: FLOPs at
#: :data:`MATMUL_EFFICIENCY` of the peak plus :data:`MATMUL_KERNEL_S` for each matmul kernel
#: (:func:`matmul_kernels`): a GEMM's waves, prologue and epilogue that its FLOPs do not pay for, which is
#: most of a rank-16 LoRA matmul's time and a few per cent of a 4,096-wide projection's. The rate is the
#: H100's own square bf16 GEMM, 780-800 of its 989 TFLOP/s (the same-run MFU lines of
#: benchmarks/results/session5/trainer-*.jsonl). The cost per kernel is read off the graph profiles
#: (benchmarks/results/session5/profile-graphs-*.txt, the 25 costliest kernels each lists, so a lower
#: bound): Llama-3.2-1B's nvjet kernels take 25.1 ms a step for 14.3 TFLOP, 7.0 ms more than 80% of the
#: peak gives, over its 1,232 counted matmuls 5.7 µs each; Gemma-4-E2B's 44.9 ms for 26.8 TFLOP, 11.1 ms
#: over 2,465, 4.5 µs. Together: 59% of the peak at 2,048 tokens on these 1,536-2,048-wide models, and the
#: rate rises toward 80% with wider layers and longer rows (Qwen3-4B at 8,192 tokens, Llama-3.1-8B,
#: Gemma-4-31B), where a single fitted efficiency had to choose one of them (the eager runs' 72%). The
#: eager profiles show the same kernels at the same times (the 256×128 TNT tile 64 µs eager, 62 µs
#: replayed). The hf recipe keeps its fitted efficiency: its bitsandbytes paths are no plain cuBLAS call.
MATMUL_EFFICIENCY = 0.80
MATMUL_KERNEL_S = 5e-6
#: Matmul kernels per LoRA-adapted linear and pass (forward, recompute, backward): the base matmul and
#: LoRA's two; the backward's dX through the base and through B and A, and dA and dB.
MATMULS_PER_LORA_LINEAR = (3, 3, 5)

#: Nominal per-direction bandwidth of one GPU's link to its peers, by the catalog's
#: ``interconnect``: PCIe x16 at 16/32/64 GB/s (PCI-SIG 3.0/4.0/5.0); NVLink totals from
#: NVIDIA's datasheets halved to one direction: V100 SXM2 300 GB/s, A100 SXM 600 GB/s, H100/
#: H200 SXM 900 GB/s, B200 1.8 TB/s (all through NVSwitch, so every GPU gets its full link);
#: MI300X: 7 Infinity Fabric links × 64 GB/s per direction (AMD data sheet: 896 GB/s total).
LINK_BYTES_PER_S = {
    "pcie3": 16e9, "pcie4": 32e9, "pcie5": 64e9,
    "nvlink2": 150e9, "nvlink3": 300e9, "nvlink4": 450e9, "nvlink5": 900e9,
    "infinity-fabric": 448e9,
}

#: The fraction of the nominal link rate NCCL's ring collectives reach as bus bandwidth on
#: large messages (nccl-tests: ~360–480 GB/s all-reduce busbw on 8×H100 SXM of 450; PCIe
#: boxes 75–85%). GeForce cards have no peer-to-peer, so traffic is staged through host
#: memory: :data:`NO_P2P_EFFICIENCY` of the link instead.
COLLECTIVE_EFFICIENCY = 0.8
NO_P2P_EFFICIENCY = 0.5

#: FSDP2 all-gathers of each decoder layer per micro-batch: forward and backward. Under
#: checkpointing the recompute runs inside the backward's unshard (the layer is already
#: gathered when autograd unpacks its checkpoint), so it adds no gather.
FSDP_GATHERS_PER_MICRO_BATCH = 2

CALIBRATION_FILE = "calibration/throughput/h100.json"
FACTOR_FIELDS = (
    "seconds_per_host_op", "checkpoint_host_ops", "matmul_efficiency", "attention_efficiency", "bandwidth_efficiency",
)


@dataclass(frozen=True)
class Factors:
    """One stack's fitted efficiencies (fractions of the catalog peaks) and host seconds per host op
    (a property of the CPU and the Python stack, not of the GPU: see the module docstring). vramplan's
    stack runs its matmuls and attention at profiled rates (:data:`MATMUL_EFFICIENCY`,
    :data:`FLASH_ATTENTION_EFFICIENCY`), which its calibration records in these two fields, unfitted."""

    seconds_per_host_op: float
    checkpoint_host_ops: float  # host ops' worth of checkpointing's Python hooks per checkpointed forward op
    matmul_efficiency: float
    attention_efficiency: float  # hf: its NF4 recipe's fp32 work (attention, the upcast LM head)
    bandwidth_efficiency: float
    #: how much longer the host running the plan takes per op than the one the host costs hold for
    #: (``vramplan.host.host_scale`` of its probe): every host second scales with it, the profiled ones too
    host_scale: float = 1.0


@lru_cache(maxsize=None)
def _calibration(directory: Path) -> dict[str, Any]:
    path = directory / CALIBRATION_FILE
    data = read_json(path)  # `python -m benchmarks.throughput --write` writes it
    stacks = data.get("stacks") if isinstance(data, dict) else None
    if not isinstance(stacks, dict):
        raise VramplanError(f"{path}: expected {{\"stacks\": {{\"vramplan\": {{...}}, \"hf\": {{...}}}}}}")
    for stack, entry in stacks.items():
        for name in FACTOR_FIELDS:
            value = entry.get(name) if isinstance(entry, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise VramplanError(f"{path}: stacks.{stack}.{name} must be a positive number")
    return data


def calibration(profiles: str | Path | None = None) -> dict[str, Any]:
    """The calibration file as loaded: factors per stack, its date and its measurement source."""
    return _calibration(profiles_dir(profiles))


def factors_for(stack: str, profiles: str | Path | None = None, host_us: float | None = None) -> Factors:
    """``stack``'s calibrated factors, on a host whose probe read ``host_us`` (``vramplan.host.autograd_op_us``;
    None: the reference host)."""
    from vramplan.host import host_scale

    stacks = calibration(profiles)["stacks"]
    if stack not in stacks:
        raise VramplanError(f"no throughput calibration for stack '{stack}'; calibrated: {', '.join(stacks)}")
    return Factors(**{name: float(stacks[stack][name]) for name in FACTOR_FIELDS}, host_scale=host_scale(host_us))


# ------------------------------------------------------------------ work per step


def _keys_per_query(layer: Layer, seq: int) -> float:
    """Mean keys a causal query attends to: s/2 on full layers, about the window on sliding ones."""
    window = sliding_window_of(layer, seq)
    if not window:
        return (seq + 1) / 2
    return window - window * window / (2 * seq)


def _masked(layer: Layer, plan: Plan, arch: Architecture, masked_captures: bool = False) -> bool:
    """Whether SDPA gets an explicit mask for this layer, so its kernel computes every block of the s×s
    square (:data:`FLASH_ATTENTION_EFFICIENCY`): a sliding window shorter than the row, and, with
    ``masked_captures``, every layer of a step replayed as a CUDA graph. The trainer measured in session 5
    captured its steps under transformers 5.17's explicit mask (benchmarks/results/session5/profile-graphs-*.txt);
    since ``vramplan.train.graphs.packing_decided`` keeps SDPA's causal kernel in an unpacked capture, the
    trainer's captured steps compute the causal half as its eager ones do (the default here)."""
    return sliding_window_of(layer, plan.seq_len) > 0 or (masked_captures and graphs_apply(arch, plan))


def attention_kernel(layer: Layer, masked: bool) -> AttentionKernel:
    """The SDPA kernel family a layer's bf16 attention runs, by its head width and whether it gets a mask."""
    if layer.head_dim > FLASH_MAX_HEAD_DIM:
        return WIDE_HEAD_ATTENTION
    if layer.head_dim > 128:
        return FLASH_ATTENTION_256
    return MASKED_FLASH_ATTENTION if masked else FLASH_ATTENTION


def unaligned_chunk_cost(seq: int, rows: int, window: int = 0) -> float:
    """How much slower a layer's chunked attention runs than if all its chunks were aligned: the share of its score work
    in chunks whose height or key count is no whole multiple of :data:`ALIGNED_ELEMENTS` costs
    :data:`UNALIGNED_CHUNK_SLOWDOWN` times as much (a row's length odd in bf16 takes cuBLAS off its aligned kernels)."""
    work = unaligned = 0
    for start, stop, first, upto in chunked_attention_chunks(seq, seq, rows, True, window):
        scores = (stop - start) * (upto - first)
        work += scores
        unaligned += scores if (stop - start) % ALIGNED_ELEMENTS or (upto - first) % ALIGNED_ELEMENTS else 0
    return 1.0 + (UNALIGNED_CHUNK_SLOWDOWN - 1.0) * unaligned / max(1, work)


def chunked_attention_efficiency(layer: Layer, plan: Plan) -> float:
    """The fraction of the bf16 peak a layer's chunked attention runs at: its row passes fused or not, over a wide
    head's causal rows or a sliding window's band."""
    fused = attention_kernel_of(layer, plan) == "chunked_fused"
    if band_window_of(layer, plan):
        return CHUNKED_FUSED_BAND_ATTENTION_EFFICIENCY if fused else CHUNKED_BAND_ATTENTION_EFFICIENCY
    return CHUNKED_FUSED_WIDE_HEAD_ATTENTION_EFFICIENCY if fused else CHUNKED_WIDE_HEAD_ATTENTION_EFFICIENCY


def attention_seconds(arch: Architecture, plan: Plan, rate: float, sms: int,
                      masked_captures: bool = False) -> tuple[float, float]:
    """(flash, wide-head) seconds of a micro-batch's bf16 attention at ``rate`` FLOP/s of peak on ``sms`` SMs.

    Each layer's forward (twice under checkpointing) and backward run at their kernel's rate
    (:func:`attention_kernel`) over the blocks they compute, causal half or, under a mask (:func:`_masked`),
    the whole square, scaled by the share of the SMs the kernel keeps busy (:func:`vramplan.occupancy.fill`):
    short rows with few heads leave SMs idle. ``masked_captures``: price captured steps as the session-5
    trainer ran them (see :func:`_masked`; its wide heads at :data:`CAPTURED_WIDE_HEAD_ATTENTION_EFFICIENCY`)."""
    flash = wide = 0.0
    forwards = _attention_forwards(plan)
    for layer in arch.layers:
        wide_heads = layer.head_dim > FLASH_MAX_HEAD_DIM
        window = band_window_of(layer, plan)
        if (wide_heads and wide_heads_chunked(plan)) or window:  # vramplan's chunked attention (over the band)
            rows = chunked_attention_chunk_rows(plan.micro_batch, layer.heads, plan.seq_len, window)
            keys = chunked_attention_keys_per_query(plan.seq_len, rows, window)
            seconds_at_peak = ((forwards + ATTENTION_BACKWARD_PASSES) * _attention_forward_flops(layer, plan, keys)
                               * unaligned_chunk_cost(plan.seq_len, rows, window) / chunked_attention_efficiency(layer, plan))
            if wide_heads:
                wide += seconds_at_peak
            else:
                flash += seconds_at_peak
            continue
        if wide_heads and masked_captures and graphs_apply(arch, plan):
            wide += _attention_flops(layer, plan, _keys_per_query(layer, plan.seq_len)) / CAPTURED_WIDE_HEAD_ATTENTION_EFFICIENCY
            continue
        masked = not wide_heads and _masked(layer, plan, arch, masked_captures)
        kernel = attention_kernel(layer, masked)
        keys = plan.seq_len if masked else _keys_per_query(layer, plan.seq_len)
        forward = _attention_forward_flops(layer, plan, keys)
        heads = layer.heads * plan.micro_batch  # every head of every row gets its own programs
        forward_fill = fill(plan.seq_len, heads, kernel.forward, not masked, sms)
        backward_fill = fill(plan.seq_len, heads, kernel.backward, not masked, sms)
        seconds_at_peak = (forwards * forward / (kernel.forward_efficiency * forward_fill)
                           + ATTENTION_BACKWARD_PASSES * forward / (kernel.backward_efficiency * backward_fill))
        if wide_heads:
            wide += seconds_at_peak
        else:
            flash += seconds_at_peak
    return flash / rate, wide / rate


def matmul_kernels(arch: Architecture, plan: Plan) -> float:
    """Matmul kernels of one micro-batch: :data:`MATMULS_PER_LORA_LINEAR` per adapted linear, one a pass
    per other linear (Gemma 4's per-layer input linears: forward and backward, not recomputed), the LM
    head's forward and dX per chunk of the chunked loss (once on the full loss)."""
    recomputes = _recomputes(plan)
    forward, recompute, backward = MATMULS_PER_LORA_LINEAR
    kernels = 0.0
    for layer in arch.layers:
        adapted = sum(1 for lin in layer.linears if lin.name in plan.lora_targets)
        layer_input = sum(1 for lin in layer.linears if lin.name not in plan.lora_targets and lin.name in _LAYER_INPUT_LINEARS)
        plain = len(layer.linears) - adapted - layer_input
        kernels += adapted * (forward + backward + recompute * recomputes) + plain * (2 + recomputes) + layer_input * 2
    if plan.mlp_tiles > 1:  # each tile launches the MLP's matmuls, and the backward runs the tiles' forward again
        tiles = plan.mlp_tiles
        kernels += 3 * len(_tiled_mlp_layers(arch)) * ((tiles - 1) * (forward + backward + recompute * recomputes)
                                                       + tiles * forward)
    kernels += 2 * len(arch.extra_linears)
    tokens = plan.micro_batch * plan.seq_len
    head_passes, head_slices = int8_head_walks(arch, plan)
    if head_passes:
        return kernels + head_passes * head_slices * HEAD_SLICE_COSTS[int8_vocab_major()][1]
    chunks = 1 if plan.loss == "full" else -(-tokens // loss_chunk_tokens(tokens, arch.vocab_size, 2, plan.loss_chunk_mb * 2**20))
    return kernels + 2 * chunks


def device_kernels(arch: Architecture, plan: Plan) -> float:
    """Kernels one micro-batch runs on the GPU: its host ops that launch device work (:func:`step_host_ops`'
    prologue, forward, recompute and backward; the optimizer's are outside), replayed or dispatched."""
    ops = step_host_ops(arch, plan)
    return ops["prologue"] + ops["forward"] + ops["recompute"] + ops["backward"]


def nf4_dequant_kernels(arch: Architecture, plan: Plan) -> float:
    """NF4 dequantize kernels of one micro-batch on vramplan's stack (:data:`NF4_DEQUANT_KERNEL_S` each): one
    per quantized adapted linear and pass (:func:`_passes`), and a tiled MLP's again per tile, as
    :func:`step_bytes` reads their weights; none on bf16 or int8 weights, or on the hf recipe's bitsandbytes path."""
    if plan.stack != "vramplan" or plan.quant != "nf4":
        return 0.0
    passes = _passes(plan)
    adapted = sum(1 for layer in arch.layers for lin in layer.linears if lin.name in plan.lora_targets)
    kernels = float(adapted * passes)
    if plan.mlp_tiles > 1:
        extra_passes = (passes + 1) * plan.mlp_tiles - passes
        kernels += 3 * len(_tiled_mlp_layers(arch)) * extra_passes
    return kernels


def kernel_seconds(arch: Architecture, plan: Plan) -> float:
    """GPU time a micro-batch's kernels take beyond their FLOPs and bytes: every kernel's gap
    (:data:`KERNEL_FLOOR_S`), each NF4 dequantization's ramp (:data:`NF4_DEQUANT_KERNEL_S`), and its share of the
    optimizer's prefetches of paged states (:data:`PREFETCH_S`) where the trainer makes them."""
    return (device_kernels(arch, plan) * KERNEL_FLOOR_S + nf4_dequant_kernels(arch, plan) * NF4_DEQUANT_KERNEL_S
            + 2 * prefetched_tensors(arch, plan) * PREFETCH_S / plan.grad_accum)


def prefetched_tensors(arch: Architecture, plan: Plan) -> int:
    """Paged adapter tensors whose two states vramplan's trainer prefetches before every step (switch
    ``prefetch_paged``); the hf recipe's sit in its fitted factors."""
    from vramplan.train import switches

    if plan.stack != "vramplan" or plan.optimizer != "paged_adamw8bit" or steps_fused(plan) \
            or not switches.enabled("prefetch_paged"):
        return 0
    return paged_tensors(arch, plan, flat=flat_step_applies(arch, plan))


def _recomputes(plan: Plan) -> bool:
    return plan.checkpointing in ("full", "offload")


def _lora_width(arch: Architecture, layer: Layer, plan: Plan) -> int:
    """Σ (in + out) over the adapted linears of a layer: LoRA's FLOPs per token are 2·r·that."""
    return sum(lin.d_in + lin.d_out for lin in layer.linears if lin.name in plan.lora_targets)


def _expert_lora_width(arch: Architecture, layer: Layer, plan: Plan) -> int:
    """Σ (in + out) over one routed expert's adapted fused matrices: a token pays it top-k times."""
    gate_up, down = EXPERT_TARGETS
    h, inter = arch.hidden_size, layer.expert_intermediate
    return ((h + 2 * inter) * (gate_up in plan.lora_targets) + (inter + h) * (down in plan.lora_targets)) \
        if layer.experts else 0


def step_flops(arch: Architecture, plan: Plan) -> dict[str, float]:
    """Matmul FLOPs of one micro-batch's forward and backward, by part (multiply-add = 2 FLOPs).

    - ``linears_forward``: 2·T·P over the decoder's linears (experts: the top-k active ones);
    - ``linears_backward``: the same again: frozen base weights need dX only, no dW;
    - ``lora``: forward 2·T·r·(in+out) per adapted linear, ×3 with its backward (dX, dA, dB);
    - ``lm_head``: forward and dX of the (frozen) head, 2·T·V·h each;
    - ``attention``: QKᵀ and PV, 4·T·keys·q_dim forward and 2.5× that backward (flash
      attention recomputes the scores). Flash kernels skip the blocks a causal or sliding mask
      removes (keys: s/2, about the window); the fp32 kernels hf's NF4 recipe falls back to (math
      for unmasked GQA, memory-efficient under the sliding layers' dense mask) multiply the whole
      s×s square and mask it afterwards (keys: s); ``attention_wide``: the same on layers whose heads are
      too wide for flash attention (:data:`FLASH_MAX_HEAD_DIM`), which run a slower kernel;
    - ``recompute``: under checkpointing, the layers' forward once more (linears, LoRA, attention);
    - ``mlp_tiles``: a tiled MLP (``Plan.mlp_tiles``) runs its dense gated MLPs' forward once more in the backward.
    """
    tokens = plan.micro_batch * plan.seq_len
    linear = sum(lin.params for lin in arch.extra_linears)
    active_experts = 0
    lora = 0
    attention = {"attention": 0.0, "attention_wide": 0.0}
    for layer in arch.layers:
        linear += layer.linear_params
        if layer.experts:
            active_experts += layer.top_k * 3 * arch.hidden_size * layer.expert_intermediate
        lora += _lora_width(arch, layer, plan) + layer.top_k * _expert_lora_width(arch, layer, plan)
        part = "attention_wide" if layer.head_dim > FLASH_MAX_HEAD_DIM else "attention"
        keys = plan.seq_len if not _bf16_attention(plan) else _keys_per_query(layer, plan.seq_len)
        attention[part] += _attention_flops(layer, plan, keys)
    forward = 2.0 * tokens * (linear + active_experts)
    lora_forward = 2.0 * tokens * plan.lora_rank * lora
    parts = {
        "linears_forward": forward,
        "linears_backward": forward,
        "lora": 3 * lora_forward,
        "lm_head": 2 * 2.0 * tokens * arch.vocab_size * arch.hidden_size,
        "recompute": 0.0,
    }
    parts.update(attention)
    if _recomputes(plan):
        parts["recompute"] = forward + lora_forward
    if plan.mlp_tiles > 1:
        parts["mlp_tiles"] = 2.0 * tokens * _tiled_mlp_params(arch)
    return parts


def _tiled_mlp_layers(arch: Architecture) -> list[Layer]:
    """The layers whose dense gated MLP a tiled plan runs in tiles (routed experts are not tiled)."""
    return [layer for layer in arch.layers if layer.mlp_intermediate and not layer.experts]


def _tiled_mlp_params(arch: Architecture) -> int:
    """The weights of those MLPs' gate, up and down projections."""
    return sum(3 * arch.hidden_size * layer.mlp_intermediate for layer in _tiled_mlp_layers(arch))


#: An attention backward's FLOPs over its forward's (flash attention recomputes the scores).
ATTENTION_BACKWARD_PASSES = 2.5


def _attention_forwards(plan: Plan) -> int:
    """Attention forwards a micro-batch runs: the forward, and again under checkpointing."""
    return 2 if _recomputes(plan) else 1


def _attention_forward_flops(layer: Layer, plan: Plan, keys: float) -> float:
    """QKᵀ and PV of one layer's forward over a micro-batch, ``keys`` per query: 4·T·keys·q_dim."""
    return 4 * plan.seq_len * keys * layer.q_dim * plan.micro_batch


def _attention_flops(layer: Layer, plan: Plan, keys: float) -> float:
    """One layer's attention FLOPs of a micro-batch: its forwards and its backward."""
    return (_attention_forwards(plan) + ATTENTION_BACKWARD_PASSES) * _attention_forward_flops(layer, plan, keys)


def attention_flops(arch: Architecture, plan: Plan) -> float:
    """The s² part of :func:`step_flops` (recompute included): it runs at its own efficiency."""
    flops = step_flops(arch, plan)
    return flops["attention"] + flops["attention_wide"]


def _passes(plan: Plan) -> int:
    """Passes over the layers' weights: forward, backward, and the recompute under checkpointing."""
    return 3 if _recomputes(plan) else 2


def _math_attention_layers(arch: Architecture, plan: Plan) -> list[Layer]:
    """Layers whose scores hf materializes: fp32 GQA without a mask falls back to SDPA's math kernel
    (the NF4 recipe's fp32 attention; its bf16 recipe runs SDPA's flash kernels, as vramplan's stack)."""
    if _bf16_attention(plan) and plan.attention != "eager":
        return []
    if plan.attention == "eager":
        return list(arch.layers)
    return [layer for layer in arch.layers if layer.attention != "sliding" and layer.kv_heads < layer.heads]


#: Per dequantized slice of an int8 head, per pass over it: (host ops, matmuls, bytes per head element).
#: Vocabulary-major (``_VocabMajorHead``): the dequantizing multiply, the logits' matmul, the
#: online-softmax kernel, the fp32 sum's rescale, the matmul back into it and its add; the int8 read,
#: the bf16 slice written and read by both matmuls. Token-major (each pass is the logits' or
#: d hidden's): the cast, the row scales, one matmul (and an add); the int8 read, the slice written, read once.
HEAD_SLICE_COSTS = {True: (6, 2, 1 + 2 + 2 + 2), False: (4, 1, 1 + 2 + 2)}


def int8_head_walks(arch: Architecture, plan: Plan) -> tuple[int, int]:
    """(passes over the head, slices per pass) of an int8 head's loss in one micro-batch (priced per slice by
    ``HEAD_SLICE_COSTS``). Vocabulary-major, each block of tokens (``memory.logits.int8_head_block``: usually
    the whole micro-batch) dequantizes the head once; token-major, every chunk of tokens twice (its
    logits, then d hidden). (0, 0) with a bf16 head, which the chunks read as it is."""
    if plan.head_quant != "int8" or plan.stack != "vramplan":
        return 0, 0
    tokens = plan.micro_batch * plan.seq_len
    budget = plan.loss_chunk_mb * 2**20
    if int8_vocab_major():
        block, rows = int8_head_block(tokens, arch.vocab_size, arch.hidden_size, 2, budget)
        return -(-tokens // block), -(-arch.vocab_size // rows)
    chunk = loss_chunk_tokens(tokens, arch.vocab_size, 2, budget)
    return 2 * -(-tokens // chunk), -(-arch.vocab_size // dequant_slice_rows(arch.vocab_size, arch.hidden_size))


def step_bytes(arch: Architecture, plan: Plan) -> dict[str, float]:
    """Bytes one micro-batch moves through GPU memory, by part.

    - ``weights``: each pass reads (and for NF4/int8 dequantizes) every base linear; the LM head twice,
      or an int8 head dequantized once per block of tokens (``int8_head_walks``);
    - ``activations``: the element-wise traffic of each layer per pass (``ACTIVATION_ACCESSES``);
    - ``logits``: full loss writes bf16 logits, an fp32 copy, its log-softmax and their
      gradients (~24 B per logit); the chunked loss keeps each chunk's fp32 logits (~8 B);
    - ``attention_scores``: b·heads·s² fp32 scores written and read ~12 times per layer
      (forward, recompute, backward) where the math kernel runs;
    - ``optimizer``: the 8-bit or fp32 AdamW pass over params, grads and states, once per
      ``grad_accum`` micro-batches;
    - ``mlp_tiles``: a tiled MLP's dequantizations per tile and its extra forward's activations.
    """
    tokens = plan.micro_batch * plan.seq_len
    stack = plan.stack
    passes = _passes(plan)
    hidden_acc, inter_acc = ACTIVATION_ACCESSES[stack]
    act = 2 if stack == "hf" and not _upcasts(plan) else ACTIVATION_BYTES[stack]  # hf's bf16 recipe: bf16
    weights = passes * arch.linear_params * WEIGHT_BYTES_PER_PASS[plan.quant]
    head_passes, _ = int8_head_walks(arch, plan)
    if head_passes:
        weights += head_passes * HEAD_SLICE_COSTS[int8_vocab_major()][2] * arch.vocab_size * arch.hidden_size
    else:
        weights += 2 * 2 * arch.vocab_size * arch.hidden_size
    activations = 0.0
    for layer in arch.layers:
        inter = layer.mlp_intermediate + layer.top_k * layer.expert_intermediate
        activations += tokens * (arch.hidden_size * hidden_acc + inter * inter_acc) * act
    activations *= passes + 1  # a backward touches about twice what its forward does
    logits = tokens * arch.vocab_size * (24 if plan.loss == "full" else 8)
    scores = sum(12 * plan.micro_batch * layer.heads * plan.seq_len * min(plan.seq_len, layer.sliding_window or plan.seq_len) * 4
                 for layer in _math_attention_layers(arch, plan))
    trainable = sum(_lora_width(arch, layer, plan) + layer.experts * _expert_lora_width(arch, layer, plan)
                    for layer in arch.layers) * plan.lora_rank
    per_param = 28.0 if plan.optimizer == "adamw" else 16.0
    parts = {
        "weights": float(weights),
        "activations": float(activations),
        "logits": float(logits),
        "attention_scores": float(scores),
        "optimizer": trainable * per_param / plan.grad_accum,
    }
    if plan.mlp_tiles > 1:
        # every tile dequantizes the MLP's weights again: T passes in each forward, 2T in the backward (the
        # tile's forward, then its dX), against one a pass untiled; and one more forward's activations
        extra_passes = (passes + 1) * plan.mlp_tiles - passes
        parts["mlp_tiles"] = float(extra_passes * _tiled_mlp_params(arch) * WEIGHT_BYTES_PER_PASS[plan.quant]
                                   + tokens * sum(layer.mlp_intermediate for layer in _tiled_mlp_layers(arch))
                                   * inter_acc * act)
    return parts


def step_pcie_bytes(arch: Architecture, plan: Plan) -> float:
    """Bytes over PCIe per micro-batch: offloaded checkpoints go to the host and come back."""
    if plan.checkpointing != "offload":
        return 0.0
    return 2.0 * plan.micro_batch * plan.seq_len * arch.hidden_size * 2 * arch.num_layers


def _norms_per_layer(arch: Architecture, layer: Layer) -> int:
    if arch.model_type.startswith("gemma4"):
        # four around attention and MLP, q_norm, k_norm and v_norm where the layer computes its own
        # K/V, the per-layer input's norm: 6.9 a layer on E2B, as the launch counter saw
        return 5 + (2 if layer.has_kv else 0) + (1 if layer.per_layer_input else 0)
    four = arch.model_type.startswith(("gemma2", "gemma3"))
    return (4 if four else 2) + (2 if layer.qk_norm else 0)


def _per_pass(counts: tuple[float, ...], n: float) -> list[float]:
    return [c * n for c in counts]


def optimizer_tensors(arch: Architecture, plan: Plan) -> int:
    """Trainable tensors the optimizer steps: LoRA's A and B of every adapted linear, or one when
    they are stepped as one flat tensor (``vramplan.stacks.vramplan.flat_step_applies``)."""
    if flat_step_applies(arch, plan) or (steps_fused(plan) and plan.parallel != "fsdp"):
        return 1  # the fused optimizer steps FlatLoRA's one buffer on one process
    return 2 * sum(1 for layer in arch.layers for lin in layer.linears if lin.name in plan.lora_targets)


def step_host_ops(arch: Architecture, plan: Plan) -> dict[str, float]:
    """Host ops of one micro-batch, by phase (``prologue``: the embedding lookups that open the forward,
    ``forward``: the rest of it, ``recompute``, ``backward``) and, divided
    by ``grad_accum``, of its share of the optimizer step (``optimizer``, ``step``); ``checkpointed``
    is the decoder layers' forward ops again when checkpointing is on: each of them saves tensors through
    torch.utils.checkpoint's (non-reentrant) Python pack hook, unpacked by another in the backward,
    a cost per op that :class:`Factors` ``checkpoint_host_ops`` weighs (fitted: the hooks' Python
    has no op count of its own).

    Counted from the architecture alone: per decoder layer its LoRA linears (and their
    dequantization), norms, the attention/activation/residual work, Gemma 4's per-layer input;
    the recompute exists under checkpointing; an int8 head's slices, per chunk of tokens; the
    optimizer's work is per trainable tensor for bitsandbytes (a Python loop over parameters) and
    nearly constant for torch's foreach AdamW. Apart from an int8 head's chunks, the sequence length
    and batch never enter: a host op costs the same for 512 tokens as for
    8,192, which is why small models train at one step time across lengths (H100: Llama-3.2-1B
    0.16-0.26 s from 512 to 8,192 tokens).
    """
    from vramplan.train import switches

    stack = plan.stack
    phases = [float(c) for c in HOST_OPS_PER_MODEL[stack]]
    chunk_ops = [0.0, 0.0, 0.0]
    rope_unfused = stack == "vramplan" and arch.model_type.startswith(ROPE_UNPATCHED_MODEL_TYPES) \
        and not switches.gemma4_rope_fused(graphs_apply(arch, plan))
    quantized = plan.quant != "bf16"
    norm = HOST_OPS_PER_NORM[stack]
    if stack == "hf" and not quantized:  # no fp32 upcast: the norms' casts dispatch
        norm = tuple(n + c for n, c in zip(norm, HF_NORM_CASTS))
    dequant = HOST_OPS_PER_DEQUANT[stack]
    if stack == "hf":
        dequant = tuple(d + HF_UNCOUNTED_DEQUANT_HOST_OPS for d in dequant)
    for layer in arch.layers:
        adapted = sum(1 for lin in layer.linears if lin.name in plan.lora_targets)
        # vramplan quantizes the adapted linears only; the hf recipe every linear of the layers
        dequantized = 0 if not quantized else len(layer.linears) if stack == "hf" else adapted
        per_layer = [
            _per_pass(HOST_OPS_PER_LINEAR[stack], adapted),
            _per_pass(dequant, dequantized),
            _per_pass(HOST_OPS_PER_PLAIN_LINEAR, sum(1 for lin in layer.linears if lin.name not in plan.lora_targets
                                                     and lin.name not in _LAYER_INPUT_LINEARS)),
            _per_pass(norm, _norms_per_layer(arch, layer)),
            list(HOST_OPS_PER_LAYER[stack]),
            _per_pass(HOST_OPS_ROPE_UNFUSED if layer.has_kv else HOST_OPS_ROPE_UNFUSED_Q_ONLY, int(rope_unfused)),
            _per_pass(HOST_OPS_PER_LAYER_INPUT[stack], 1 if layer.per_layer_input else 0),
        ]
        for counts in per_layer:
            phases = [p + c for p, c in zip(phases, counts)]
        chunk_ops = [c + u for c, u in zip(chunk_ops, chunked_attention_host_ops(layer, plan))]
        if layer.experts:  # hf loops over the experts in Python; vramplan's grouped path does not
            phases = [p + (layer.experts * 3 if stack == "hf" else 12) for p in phases]
    forward, recompute, backward = (p + c for p, c in zip(phases, chunk_ops))
    prologue = prologue_host_ops(arch)
    head_passes, head_slices = int8_head_walks(arch, plan)
    forward += head_passes * head_slices * HEAD_SLICE_COSTS[int8_vocab_major()][0]  # the fused loss runs in the forward
    recomputes = _recomputes(plan)
    tensors = optimizer_tensors(arch, plan)
    if steps_fused(plan):
        optimizer = FUSED_OPTIMIZER_HOST_OPS_PER_TENSOR * tensors + FUSED_OPTIMIZER_HOST_OPS_PER_STEP
    else:
        optimizer = OPTIMIZER_HOST_OPS_PER_TENSOR[plan.optimizer] * tensors + OPTIMIZER_HOST_OPS_PER_STEP[plan.optimizer]
    return {
        "prologue": prologue,
        "forward": forward - prologue,
        "recompute": recompute if recomputes else 0.0,
        "backward": backward,
        # the layers' part autograd records (a checkpoint's pack hook sees each saved tensor; none of the chunked
        # attention's, inside its Function: unrecorded_host_ops)
        "checkpointed": forward - chunk_ops[0] - HOST_OPS_PER_MODEL[stack][0] if recomputes else 0.0,
        "optimizer": optimizer / plan.grad_accum,
        "step": HOST_OPS_PER_STEP[stack] / plan.grad_accum,
    }


def unrecorded_host_ops(arch: Architecture, plan: Plan) -> dict[str, float]:
    """The ops of one micro-batch's forward, recompute and backward (each counted in :func:`step_host_ops`) that run
    inside the chunked attention's autograd Function: autograd records none of them, so each costs the host a
    dispatch and a launch (:data:`UNRECORDED_OP_SHARE` of a recorded op), and each still launches a kernel."""
    counts = [sum(ops) for ops in zip(*(chunked_attention_host_ops(layer, plan) for layer in arch.layers))]
    return dict(zip(("forward", "recompute", "backward"), counts or (0.0, 0.0, 0.0)))


def chunked_attention_host_ops(layer: Layer, plan: Plan) -> list[float]:
    """(forward, recompute, backward) host ops of a layer's chunked attention (:data:`HOST_OPS_CHUNKED_ATTENTION`):
    its extra ops over SDPA's one call (wide heads, or a sliding window's band); none where the layer runs SDPA."""
    kernel = attention_kernel_of(layer, plan)
    if not kernel.startswith("chunked"):
        return [0.0, 0.0, 0.0]
    chunks = -(-plan.seq_len // chunked_attention_chunk_rows(plan.micro_batch, layer.heads, plan.seq_len,
                                                             band_window_of(layer, plan)))
    ops = HOST_OPS_CHUNKED_ATTENTION_FUSED if kernel == "chunked_fused" else HOST_OPS_CHUNKED_ATTENTION
    forward = ops["call"] + ops["forward_chunk"] * chunks
    return [forward, forward, ops["call"] + ops["backward_chunk"] * chunks]


def prologue_host_ops(arch: Architecture) -> float:
    """The forward's frozen embedding lookups, in host ops: the part of a micro-batch's forward that
    runs before the first decoder layer and that a CUDA graph leaves eager (vramplan.train.graphs:
    ``StepGraphs.prologue``)."""
    ops = HOST_OPS_EMBEDDING_LOOKUP + (HOST_OPS_EMBEDDING_SCALE if arch.scales_embeddings else 0)
    if any(layer.per_layer_input for layer in arch.layers):
        ops += HOST_OPS_PER_LAYER_INPUT_LOOKUP
    return float(ops)


#: The phases of :func:`step_host_ops` one graph replays (vramplan.train.graphs.StepGraphs.body): the
#: forward from the embeddings, the chunked loss, the checkpoint's recompute and the backward. The
#: checkpoint hooks' Python ran once, while capturing. What stays eager: the prologue (embedding
#: lookups), the optimizer's step and the per-step bookkeeping (clipping, scheduler, zeroing).
CAPTURED_PHASES = ("forward", "recompute", "backward", "checkpointed")


def captured_phases(arch: Architecture, plan: Plan) -> tuple[str, ...]:
    """The phases of :func:`step_host_ops` that a CUDA graph replays instead of dispatching op by op:
    :data:`CAPTURED_PHASES` where vramplan's trainer captures the plan's steps
    (``vramplan.stacks.vramplan.graphs_apply``: one GPU, text, checkpoints on the GPU, no routed experts),
    none otherwise (eager plans, offloaded checkpoints, MoE models, the hf recipe, several GPUs). :func:`host_seconds_split` charges the captured phases :data:`GRAPH_REPLAY_HOST_OPS`
    together instead of their ops; the host term falls to what stays outside the graph (the optimizer's
    per-tensor Python above all), which a flat optimizer step (``Plan.steps_flat``) cuts to one tensor's
    (:func:`optimizer_tensors`)."""
    return CAPTURED_PHASES if graphs_apply(arch, plan) else ()


#: Host ops around one graph replay, per micro-batch: the packing check (a sync), filling the graph's
#: static inputs (embeddings, Gemma 4's per-layer inputs, positions, labels, the loss's denominator),
#: the replay and the loss's clone. Counted by ``benchmarks.launch_count.count_graph_prologue``: 13
#: (Llama, Qwen3, Gemma 3 structures), 14 (Gemma 4: its per-layer inputs' fill).
GRAPH_REPLAY_HOST_OPS = 13.0


#: The phases the host runs after the step's first wait on the GPU where the trainer waits before its step
#: (before session 10, and ``VRAMPLAN_DISABLE=overlap_optimizer`` since: :func:`optimizer_overlapped`): it read
#: the gradient norm (``float(clip_gradients(...))``) once the micro-batches were queued, so the optimizer's Python and the
#: per-step bookkeeping start only when the GPU has finished the backward, and add to the step instead of
#: overlapping it (:func:`combine`). Under CUDA graphs this is most of the host's work: on the H100
#: Llama-3.2-1B at 2,048 tokens took 0.062-0.082 s a step with graphs, about its ~40 ms of kernels plus
#: bitsandbytes' ~32 ms per-tensor step, and 0.049 s with that step made flat
#: (benchmarks/results/trainer_graphs_h100.jsonl). An eager step waits at the same sync, but its
#: fitted factors already hold that wait: charging it there too made the held-out error worse (9.8% to
#: 10.1% mean on the committed runs, with the matmul efficiency pushed to its grid's cap), so eager
#: plans keep all their host work overlapped.
AFTER_SYNC_PHASES = ("optimizer", "step")
#: bitsandbytes' 8-bit AdamW after a captured step's sync, in seconds per adapter tensor, profiled, not
#: fitted: with the GPU idle and nothing to overlap, its per-tensor Python costs far less than the eager
#: fit's 3 ops a tensor price it at (that fit holds the contention of an eager step's host). The four graph
#: profiles on the H100, two sessions' hosts: session 5 (benchmarks/results/session5/profile-graphs-*.txt)
#: Llama-3.2-1B's optimizer 15.3 ms for 224 adapter tensors (68 µs each), Gemma-4-E2B's 26.8 ms for 490
#: (55 µs); session 8 (results/session8/profile-graphs-*-2048.txt) 9.5 ms (42 µs) and 17.0 ms (35 µs).
#: Their mean; a host's speed moves it by ±35%, as it moves every host cost.
CAPTURED_OPTIMIZER_S_PER_TENSOR = 50e-6
#: Of that, ``zero_grad``'s share: a captured run zeroes each adapter gradient in place, one ``zero_()`` a tensor,
#: 10.8-11.4 µs of host time a tensor in the same four profiles (the ``Optimizer.zero_grad`` range's CPU total).
#: The overlapped trainer (:func:`optimizer_overlapped`) queues bitsandbytes' loop beside the backward, but
#: bitsandbytes' step ends on a sync (``train.optim._OneSyncPerStep``), so the zeroing and the step's
#: bookkeeping still run after the GPU has finished; queued whole (switch ``queued_optimizer``: no last sync,
#: one foreach zeroing) nothing does.
ZERO_GRAD_S_PER_TENSOR = 11e-6


def host_seconds_split(arch: Architecture, plan: Plan, factors: Factors) -> tuple[float, float]:
    """Host time of one micro-batch as (overlapping the GPU's work, after the step's sync): its host
    ops times the stack's fitted seconds per op; phases a CUDA graph replays count as one replay."""
    captured = captured_phases(arch, plan)
    ops = step_host_ops(arch, plan)
    ops["checkpointed"] *= factors.checkpoint_host_ops
    for phase, unrecorded in unrecorded_host_ops(arch, plan).items():
        if ops[phase]:  # no recompute without checkpointing
            ops[phase] -= (1 - UNRECORDED_OP_SHARE) * unrecorded
    # the fused optimizer reads the norm after its step; the overlapped trainer reads everything after it,
    # but bitsandbytes' step still ends on a sync unless queued whole
    stepped_after_replay = captured and not steps_fused(plan)
    bnb = stepped_after_replay and plan.optimizer != "adamw" and plan.stack == "vramplan"
    waits = stepped_after_replay and not optimizer_overlapped(plan)
    last_sync = bnb and not waits and not optimizer_queued(plan)
    after = AFTER_SYNC_PHASES if waits else ("step",) if last_sync else ()
    before = sum(n for phase, n in ops.items() if phase not in captured and phase not in after)
    before += GRAPH_REPLAY_HOST_OPS if captured else 0.0
    before_s = before * factors.seconds_per_host_op
    after_s = sum(ops[phase] for phase in after) * factors.seconds_per_host_op
    if bnb and not plan.steps_flat:
        # bitsandbytes' per-tensor step at its profiled captured cost, not the eager fit's ops
        tensors = optimizer_tensors(arch, plan) / plan.grad_accum
        profiled = tensors * CAPTURED_OPTIMIZER_S_PER_TENSOR - ops["optimizer"] * factors.seconds_per_host_op
        if waits:
            after_s += profiled
        elif last_sync:  # the loop beside the backward, the zeroing after bitsandbytes' last sync
            before_s += profiled - tensors * ZERO_GRAD_S_PER_TENSOR
            after_s += tensors * ZERO_GRAD_S_PER_TENSOR
        else:
            before_s += profiled
    return before_s * factors.host_scale, after_s * factors.host_scale


def optimizer_queued(plan: Plan) -> bool:
    """Whether the overlapped trainer also queues bitsandbytes' step whole (switch ``queued_optimizer``, on by
    default): no sync at its end and the gradients zeroed in one launch, so no host work follows the GPU's."""
    from vramplan.train import switches

    return optimizer_overlapped(plan) and switches.enabled("queued_optimizer")


def optimizer_overlapped(plan: Plan) -> bool:
    """Whether vramplan's trainer queues the optimizer's step before its one wait on the GPU
    (``train.recipe.train_step`` under the ``overlap_optimizer`` switch, on by default): the host's
    per-tensor step then runs beside the backward's kernels instead of after them. Not in fp16: a loss-scaled
    step reads its gradient norm before the update (an overflow must be known first), as the trainer before the
    overlap did; on the H100 Llama-3.2-1B's fp16 steps ran at 0.86-0.87x its bf16 steps' tokens/s (session 19)."""
    from vramplan.train import switches

    return plan.stack == "vramplan" and switches.enabled("overlap_optimizer") and plan.compute_dtype != "fp16"


def host_seconds(arch: Architecture, plan: Plan, factors: Factors) -> float:
    """Host time of one micro-batch: its host ops times the stack's fitted seconds per op (a CUDA
    graph's replayed phases as :data:`GRAPH_REPLAY_HOST_OPS`)."""
    return sum(host_seconds_split(arch, plan, factors))


# ------------------------------------------------------------------ time


def compute_tflops(gpu: GpuSpec, plan: Plan) -> float:
    """The GPU's dense tensor rate for the plan's compute dtype (TFLOP/s)."""
    return gpu.bf16_tflops if plan.compute_dtype == "bf16" and gpu.supports_bf16 else gpu.fp16_tflops


def collective_bytes_per_s(gpu: GpuSpec) -> float:
    """The bus bandwidth ring collectives reach on ``gpu``'s interconnect."""
    link = LINK_BYTES_PER_S.get(gpu.interconnect or "")
    if link is None:
        raise VramplanError(f"GPU {gpu.name} has no known interconnect ({gpu.interconnect!r}); known: "
                            f"{', '.join(LINK_BYTES_PER_S)}")
    return link * (NO_P2P_EFFICIENCY if gpu.kind in ("consumer", "laptop") else COLLECTIVE_EFFICIENCY)


def step_comm_bytes(arch: Architecture, plan: Plan) -> dict[str, float]:
    """Bytes each rank sends per micro-batch, by part, and what cannot overlap compute.

    - ``all_reduce`` (DDP): the LoRA gradients, 2(N−1)/N of them in a ring, once per
      optimizer step (``no_sync`` during accumulation), so / ``grad_accum`` per micro-batch;
    - ``all_gather`` (FSDP2): (N−1)/N of the frozen weights (and LoRA adapters) per gather,
      :data:`FSDP_GATHERS_PER_MICRO_BATCH` times for the layers; the embedding once and the
      LM head once in the forward (again in the backward on the full loss);
    - ``reduce_scatter`` (FSDP2): (N−1)/N of the LoRA gradients, every micro-batch;
    - ``host`` (FSDP2 CPU offload): each gather first copies the rank's shard to the GPU,
      the gradients' shard goes back: bytes over PCIe, not the peer link;
    - ``exposed``: the part that waits: DDP's last bucket, FSDP2's first layer and embedding.
    """
    from vramplan.memory.distributed import DDP_BUCKET_CAP_BYTES, ring_bytes_all_reduce, ring_bytes_gather
    from vramplan.stacks import step_memory
    from vramplan.stacks.distributed import WEIGHT_COMPONENTS, head_bytes, unsharded_layer_bytes

    n = plan.gpus
    parts = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0, "host": 0.0, "exposed": 0.0}
    if n == 1 and not plan.cpu_offload:  # (one GPU with CPU offload still copies every layer over PCIe)
        return parts
    single = step_memory(arch, plan.replace(gpus=1, parallel="none", cpu_offload=False)).phases
    grads = float(single["optimizer_step"].get("lora_grads", 0))
    if plan.parallel == "ddp":
        parts["all_reduce"] = ring_bytes_all_reduce(grads, n) / plan.grad_accum
        parts["exposed"] = ring_bytes_all_reduce(min(grads, DDP_BUCKET_CAP_BYTES), n) / plan.grad_accum
        return parts
    weights = {k: v for k, v in single["load"].items() if k in WEIGHT_COMPONENTS}
    lora = single["load"].get("lora_params", 0)
    embeddings = weights.get("embeddings", 0)
    layers = sum(weights.values()) - embeddings + lora
    head_gathers = 1 + (1 if plan.stack == "hf" or plan.loss == "full" else 0)
    embedding = embeddings - head_bytes(arch, weights) if arch.lm_head_params else 0
    head = head_bytes(arch, weights) if arch.lm_head_params else embeddings
    gathered = FSDP_GATHERS_PER_MICRO_BATCH * layers + embedding + head_gathers * head
    parts["all_gather"] = ring_bytes_gather(gathered, n)
    parts["reduce_scatter"] = ring_bytes_gather(grads, n)
    if plan.cpu_offload:
        parts["host"] = (gathered + grads) / n
    parts["exposed"] = ring_bytes_gather(unsharded_layer_bytes(arch, plan, weights, lora) + embedding, n)
    return parts


def step_seconds(arch: Architecture, plan: Plan, gpu: GpuSpec, factors: Factors | None = None,
                 masked_captures: bool = False) -> dict[str, float]:
    """Seconds of one micro-batch on one rank, by term (see the module docstring; ``host_after_sync``:
    the host work a captured step does after waiting on the GPU); :func:`combine` makes the step time.
    Multi-GPU plans add ``comm`` (overlappable) and ``comm_exposed``. ``masked_captures``: captured
    steps' attention as the session-5 trainer ran it, under an explicit mask (:func:`_masked`)."""
    factors = factors or factors_for(plan.stack)
    rate = compute_tflops(gpu, plan) * 1e12
    if rate <= 0 or gpu.bandwidth_gbs <= 0:
        raise VramplanError(f"GPU {gpu.name} has no compute rate or bandwidth in the catalog; its speed cannot be predicted")
    flops = step_flops(arch, plan)
    attention = flops.pop("attention")
    wide = flops.pop("attention_wide")
    flash_s = wide_s = 0.0
    if not _bf16_attention(plan):  # fp32 attention runs the math or memory-efficient kernel on every layer
        attention += wide
        # the upcast LM head multiplies in fp32 too (no tensor-core rate): at the stack's fitted fp32 efficiency
        attention += flops.pop("lm_head")
    else:  # SDPA's bf16 kernels, at their profiled rates (the fitted attention efficiency is hf's fp32 kernels')
        attention = 0.0
        flash_s, wide_s = attention_seconds(arch, plan, rate, gpu.sms, masked_captures)
    host, host_after_sync = host_seconds_split(arch, plan, factors)
    vramplan = plan.stack == "vramplan"  # cuBLAS at its profiled rate and cost per kernel; hf: its fitted rate
    matmul_efficiency = MATMUL_EFFICIENCY if vramplan else factors.matmul_efficiency
    seconds = {
        "host": host,
        "host_after_sync": host_after_sync,
        "matmul": sum(flops.values()) / (rate * matmul_efficiency) + (matmul_kernels(arch, plan) * MATMUL_KERNEL_S
                                                                       if vramplan else 0.0),
        "attention": attention / (rate * factors.attention_efficiency),
        "attention_wide": wide_s,
        "attention_flash": flash_s,
        "memory": sum(step_bytes(arch, plan).values()) / (gpu.bandwidth_gbs * 1e9 * factors.bandwidth_efficiency),
        "kernels": kernel_seconds(arch, plan),
        "pcie": step_pcie_bytes(arch, plan) / PCIE_BYTES_PER_S,
    }
    if plan.gpus > 1 or plan.cpu_offload:
        comm = step_comm_bytes(arch, plan)
        collectives = comm["all_reduce"] + comm["all_gather"] + comm["reduce_scatter"]
        link = collective_bytes_per_s(gpu) if collectives or comm["exposed"] else 1.0
        seconds["comm"] = collectives / link + comm["host"] / PCIE_BYTES_PER_S
        seconds["comm_exposed"] = comm["exposed"] / link
    return seconds


def _upcasts(plan: Plan) -> bool:
    """Whether the hf recipe ran prepare_model_for_kbit_training, which casts every parameter bitsandbytes
    left unquantized (norms, embeddings, the LM head) to fp32: the residual stream, the norms, attention
    and the MLP's activations then run in fp32. Its bf16 recipe stays in bf16."""
    return plan.stack == "hf" and plan.quant != "bf16"


def _bf16_attention(plan: Plan) -> bool:
    """Whether attention runs SDPA's 16-bit kernels (vramplan's stack, hf's bf16 recipe; hf's NF4 recipe runs fp32)."""
    return not _upcasts(plan)


def overlap(host: float, device: float) -> float:
    """Host and device time of one step together: (host^p + device^p)^(1/p), p = :data:`OVERLAP_SHARPNESS`."""
    p = OVERLAP_SHARPNESS
    return (host ** p + device ** p) ** (1 / p)


def combine(seconds: dict[str, float]) -> float:
    """A step's wall time from its terms: the host dispatches ops while the GPU runs earlier ones,
    so the step takes about the longer of the host's work and the device's (matmuls, attention,
    memory traffic; :func:`overlap`), plus offload transfers, which wait on PCIe. Measured on an
    H100: Llama-3.2-1B's step took 0.16-0.26 s from 512 to 8,192 tokens (host-bound), while
    Qwen3-4B's grew from 0.34 s to 0.67 s between 1,024 and 8,192 tokens
    (benchmarks/results/trainer_h100.jsonl)."""
    device = (seconds["matmul"] + seconds["attention"] + seconds["attention_wide"] + seconds.get("attention_flash", 0.0)
              + seconds["memory"] + seconds.get("kernels", 0.0))
    compute = overlap(seconds["host"], device) + seconds.get("host_after_sync", 0.0) + seconds["pcie"]
    # on several GPUs the collectives run on their own stream beside the compute (FSDP2's
    # prefetch, DDP's bucketed all-reduce during the backward); what cannot overlap is added
    return max(compute, seconds.get("comm", 0.0)) + seconds.get("comm_exposed", 0.0)


def predict_tokens_per_s(arch: Architecture, plan: Plan, gpu: GpuSpec, factors: Factors | None = None,
                         host_us: float | None = None) -> float:
    """Predicted training tokens per second of ``plan`` on ``gpu`` (on all ``plan.gpus`` GPUs of a box:
    N × a rank's tokens over the step time, communication included).

    Counted: the matmul FLOPs of forward, dX-only backward through the frozen weights,
    LoRA's forward and backward (its dA, dB), the LM head's forward and dX, the causal
    attention s² term and, under checkpointing, the recomputed forward; the memory
    traffic of NF4/int8 dequantization, activations, logits, materialized attention
    scores and the optimizer; offloaded checkpoints over PCIe; and the host's dispatch of every op.
    Not counted: data loading, logging, checkpoint saving, paged-optimizer evictions (the
    plan fits, so its states stay resident), thermal throttling. ``host_us``: the host's probe
    (``vramplan.host``), where ``factors`` are not given.
    """
    seconds = combine(step_seconds(arch, plan, gpu, factors or factors_for(plan.stack, host_us=host_us)))
    return plan.gpus * plan.micro_batch * plan.seq_len / seconds
