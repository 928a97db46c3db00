"""A micro-batch's forward and backward replayed as one CUDA graph.

The trainer is host-bound on small models: an H100 step of Llama-3.2-1B at 2,048 tokens takes
≈220 ms of wall time for ≈42 ms of kernels (benchmarks/results/profiles), because the host
spends 100-300 µs of Python and launch work on each of ~15,000 operations (forward, the
checkpoint's recompute, backward). Captured once, the same kernels replay from one launch:
measured on the H100, that step took 72-82 ms (28,000-33,000 tok/s, from 8,400-12,300) and
Gemma-4-E2B's 208-224 ms (from ≈450), for about 0.1 GB more (trainer_graphs_h100.jsonl, less the embedding leak those runs had).

What the graph holds, and what it may not:

* Its inputs are static buffers filled before each replay: the token embeddings (looked up
  eagerly: Llama-8B's and Gemma 4's tables stay in host memory, and a host gather cannot be
  captured), Gemma 4's per-layer inputs, positions, labels and the loss's denominator (the
  target tokens of the whole accumulated batch, so accumulation stays exact).
* Gradients accumulate into ``.grad`` tensors allocated before capture, outside the graph's
  memory: the captured backward adds into them, so several micro-batches accumulate and the
  optimizer, run eagerly, reads them. They are zeroed in place, never set to None. They are
  views of one buffer made before the first, eager, pass: left to that pass's backward they
  land one by one among its activations, and each keeps its page of the pool mapped after the
  pass, so the pages cannot go back before the capture (measured on the H100: Qwen3-1.7B at
  rank 128 without checkpointing reserved 7.17 GB for 5.20 GB allocated, with 1.0 GB free in
  the regular pool after the steps; benchmarks/results/session21).
* Each graph casts the adapters to the compute dtype itself (``LoRACopies`` is invalidated
  before capture), so a replay never reads a copy another graph or the eager path made. The
  eager pass's copies are dropped before the capture, for the same reason as the gradients.
* Checkpointed layers recompute through ``recompute.checkpoint_without_leaf`` inside a capture:
  torch 2.11's own non-reentrant checkpoint roots a node on a CPU leaf, whose end-of-backward
  stream sync breaks the capture.
* One capture per (shape, packed-or-not); a shape is captured the second time it is seen, so
  the first, eager, pass has compiled and autotuned every Triton kernel for it. The recipe pads
  each micro-batch to the plan's full width (``WIDTH_BUCKETS``, ``data.bucketed_width``): packed
  rows of a real dataset are all slightly different lengths, and would otherwise never repeat a
  shape. One width, not several: a new shape's eager first pass runs while the captured graphs'
  pool holds its working set, so each extra width can hold two steps' activations at once
  (measured on the H100, Llama-3.2-1B without checkpointing on rows of spread lengths, 8 widths:
  6 shapes captured and a 10.2 GB process for a plan priced at 7.2 GB,
  benchmarks/results/session5/real_shapes.jsonl). Packed rows are nearly full, so the padding is
  a few per cent of the tokens. transformers
  decides packing with a host sync (``find_packed_sequence_indices``), which a capture may not
  contain: the decision is made before the capture, from the positions, and handed to it.
* Every backward of a graphed run, eager or captured, runs on one side stream: autograd keeps the
  stream an adapter's gradient was last accumulated on, and a capture that has to wait on the
  legacy default stream fails ("would make the legacy stream depend on a capturing stream").

Anything the graph cannot hold runs eagerly: multimodal batches, several ranks, CPU offload of
checkpoints, and a shape whose capture failed (noted once).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from vramplan.train import attention, switches
from vramplan.train.loss import summed_loss, summed_loss_of_hidden

#: Beyond this many captured shapes the rest run eagerly (each graph keeps its own inputs; all
#: share one memory pool). With widths padded to one, shapes still differ by packed or not and by
#: a short last micro-batch.
MAX_GRAPHS = 16
#: The widths the recipe pads micro-batches to (``data.bucketed_width``): one, the plan's seq_len.
WIDTH_BUCKETS = 1


@dataclass
class StaticInputs:
    """The buffers one graph reads; filled by ``fill`` before each replay."""

    embeds: torch.Tensor
    per_layer: torch.Tensor | None
    position_ids: torch.Tensor
    labels: torch.Tensor
    denominator: torch.Tensor
    loss: torch.Tensor  # the micro-batch's summed token loss, written by the graph

    @classmethod
    def like(cls, embeds, per_layer, batch) -> "StaticInputs":
        return cls(embeds=torch.empty_like(embeds),
                   per_layer=None if per_layer is None else torch.empty_like(per_layer),
                   position_ids=torch.empty_like(batch["position_ids"]), labels=torch.empty_like(batch["labels"]),
                   denominator=torch.ones((), device=embeds.device), loss=torch.zeros((), device=embeds.device))

    @torch.no_grad()
    def fill(self, embeds, per_layer, batch, denominator) -> None:
        """Copy the step's inputs in, recording no autograd history: a lookup whose output requires
        grad (transformers' ``enable_input_require_grads`` hook marks it so) would otherwise chain a
        ``CopyBackwards`` onto the buffer every replay, each keeping that step's embeddings alive
        (8 MiB a step on Llama-3.2-1B at 2,048 tokens, measured on the H100)."""
        self.embeds.copy_(embeds)
        if per_layer is not None:
            self.per_layer.copy_(per_layer)
        self.position_ids.copy_(batch["position_ids"])
        self.labels.copy_(batch["labels"])
        self.denominator.copy_(denominator)


def is_packed(position_ids: torch.Tensor) -> bool:
    """Whether any row holds several sequences: its positions restart somewhere after the first token."""
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())


@contextlib.contextmanager
def packing_decided(packed: bool):
    """transformers' packed-sequence detection without its host sync: the answer is known already.

    Rows that are not packed also keep SDPA's causal kernel while a graph is captured. transformers
    5.17 builds an explicit s×s mask whenever ``is_tracing`` (stream capture included) is true, so a
    captured step ran its full-attention layers as a masked kernel over the whole square: 2.3× the
    eager attention time on the H100 (benchmarks/results/session5/profile-graphs-*.txt). A graph
    replays one shape whose packing is part of its key, so ``is_causal`` is exactly right there;
    transformers 5.2x already skips the mask for an absent padding mask. Packed layers still get their masks, and
    sliding-window layers too unless the installed sdpa function applies their windows itself: that rule is
    ``vramplan.train.attention.sliding_masks_left_out``'s, which this context opens underneath its own."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices

    def known(position_ids):
        if not packed:
            return None
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    with attention.sliding_masks_left_out():
        original_skip = masking_utils._ignore_causal_mask_sdpa
        signature = inspect.signature(original_skip)

        @functools.wraps(original_skip)
        def skip_causal_mask(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments
            local = given.get("local_attention_size")
            if (not packed and given.get("padding_mask") is None and given.get("q_length") == given.get("kv_length")
                    and (local is None or given.get("kv_length", 0) < local)):
                return True
            return original_skip(*args, **kwargs)

        masking_utils.find_packed_sequence_indices = known
        masking_utils._ignore_causal_mask_sdpa = skip_causal_mask
        try:
            yield
        finally:
            masking_utils.find_packed_sequence_indices = original
            masking_utils._ignore_causal_mask_sdpa = original_skip


@contextlib.contextmanager
def graph_safe_checkpoints(model: nn.Module):
    """The model's checkpointed layers recompute through ``recompute.checkpoint_without_leaf`` while
    the context is open: no CPU leaf for the end-of-backward stream sync to trip on, and no read of
    the CUDA generator's state (both forbidden while capturing)."""
    from vramplan.train.recompute import checkpoint_without_leaf

    layers = [m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None]
    saved = [m._gradient_checkpointing_func for m in layers]
    for m in layers:
        m._gradient_checkpointing_func = checkpoint_without_leaf
    try:
        yield
    finally:
        for m, func in zip(layers, saved):
            m._gradient_checkpointing_func = func


def routes_experts(model: nn.Module) -> bool:
    """Whether the model has routed MoE experts: their forward reads the router's choice on the host
    (which experts got tokens), a sync no capture may hold, so such a model trains eagerly."""
    from vramplan.train.experts import FUSED_EXPERTS, NF4Experts

    return any(isinstance(m, NF4Experts) or type(m).__name__ in FUSED_EXPERTS for m in model.modules())


def steps_will_replay(model: nn.Module, plan) -> bool:
    """Whether the run's steps will replay as CUDA graphs, as far as load time can tell (a GPU and one process
    aside, which ``StepGraphs.for_run`` checks): the plan asks, the environment allows, no routed experts."""
    return plan.captures_steps and switches.enabled("cuda_graphs") and not routes_experts(model)


class StepGraphs:
    """The captured micro-batch steps of one text model on one GPU (see the module docstring)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.model, self.params = model, list(params)
        self.decoder = model.get_decoder()
        self.per_layer = bool(getattr(self.decoder, "hidden_size_per_layer_input", 0))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, StaticInputs] | None] = {}
        self.seen: set[tuple] = set()
        self.pool = None
        self.grad_tensors: list[torch.Tensor] | None = None
        self.stream: torch.cuda.Stream | None = None
        self.notes: list[str] = []
        self.replays = 0  # micro-batches replayed from a graph
        self.eager_runs = 0  # and run eagerly (a shape's first pass, or a shape without a graph)

    def summary(self) -> str:
        """How the run's micro-batches ran: a real dataset's shapes must repeat for replays to dominate."""
        captured = sum(entry is not None for entry in self.graphs.values())
        total = self.replays + self.eager_runs
        return (f"CUDA graphs: {captured} shape{'s' * (captured != 1)} captured; {self.replays} of {total} "
                "micro-batches replayed, the rest eager")

    @classmethod
    def for_run(cls, model: nn.Module, params: list[nn.Parameter], plan, device: torch.device,
                world_size: int = 1) -> "StepGraphs | None":
        """The run's graphs when the plan asks for them (``plan.captures_steps``), the environment does
        not switch them off (``VRAMPLAN_DISABLE=cuda_graphs``) and the run can hold them; else None."""
        if switches.enabled("cuda_graphs") and cls.available(model, plan, device, world_size):
            return cls(model, params)
        return None

    @staticmethod
    def available(model: nn.Module, plan, device: torch.device, world_size: int = 1) -> bool:
        """Whether this run's steps can be captured at all."""
        return (device.type == "cuda" and world_size == 1 and plan.captures_steps and hasattr(model, "get_decoder")
                and not routes_experts(model))

    # -- the pieces a replay runs ---------------------------------------------------------------
    def prologue(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen lookups the graph cannot hold: token embeddings (and Gemma 4's per-layer inputs)."""
        with torch.no_grad():
            ids = batch["input_ids"]
            embeds = self.decoder.embed_tokens(ids)
            per_layer = self.decoder.get_per_layer_inputs(ids, embeds) if self.per_layer else None
        return embeds, per_layer

    def body(self, static: StaticInputs) -> None:
        """Forward from the embeddings, the chunked loss and the backward: what one graph holds."""
        kwargs = {"inputs_embeds": static.embeds, "position_ids": static.position_ids, "use_cache": False}
        if static.per_layer is not None:
            kwargs["per_layer_inputs"] = static.per_layer
        hidden = self.decoder(**kwargs).last_hidden_state
        loss, _ = summed_loss_of_hidden(self.model, hidden, static.labels)  # the eager step's loss, head and all
        (loss / static.denominator).backward()
        static.loss.copy_(loss.detach())

    # -- capture and replay ---------------------------------------------------------------------
    def _grads_in_place(self) -> None:
        """Point every ``.grad`` at the tensor the graphs add into (made once, before the first capture).

        An eager micro-batch, or a ``zero_grad(set_to_none=True)``, may have replaced or dropped one:
        its value moves back into the captured tensor, so a replay never writes to freed memory."""
        if self.grad_tensors is None:
            self.grad_tensors = self._held_gradients()
        for p, held in zip(self.params, self.grad_tensors):
            if p.grad is not held:
                if p.grad is None:
                    held.zero_()
                else:
                    held.copy_(p.grad)
                p.grad = held

    def _held_gradients(self) -> list[torch.Tensor]:
        """The tensors the graphs add into: views of one zeroed buffer (one allocation, pages of their own), or the
        gradients already there (an optimizer's flat buffer) and a tensor each for the rest."""
        kinds = {(p.dtype, p.device) for p in self.params}
        if (any(p.grad is not None for p in self.params) or len(kinds) != 1
                or not all(p.is_contiguous() for p in self.params)):
            return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        (dtype, device), = kinds
        sizes = [p.numel() for p in self.params]
        flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        return [view.view_as(p) for view, p in zip(torch.split(flat, sizes), self.params)]

    def _drop_eager_copies(self) -> None:
        """Drops the adapters' compute-dtype copies the eager pass made (each module's ``LoRACopies``): the capture
        makes its own, and these would keep the pages they sit on mapped through it."""
        for module in self.model.modules():
            copies = getattr(module, "_lora_copies", None)
            if copies is not None:
                copies.drop()

    def _capture(self, embeds, per_layer, batch, packed: bool):
        from vramplan_kernels.qlora_linear import LoRACopies

        static = StaticInputs.like(embeds, per_layer, batch)  # filled before each replay, the first included
        self._grads_in_place()  # captured kernels record, they do not run: the replay after this computes
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        self._drop_eager_copies()
        torch.cuda.empty_cache()  # the eager first pass's cached blocks: the graph's pool takes their place
        LoRACopies._generation += 1  # the graph makes its own compute-dtype copies of the adapters
        try:
            with self._on_own_stream() as stream, packing_decided(packed), \
                    graph_safe_checkpoints(self.model), torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.body(static)
        finally:
            LoRACopies._generation += 1  # and the eager path never reuses those
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = graph.pool()
        # the eager passes on the side stream left their blocks cached outside the graph's pool: the
        # graph's own pool holds a step's working set from now on, so hand those back
        torch.cuda.empty_cache()
        return graph, static

    @contextlib.contextmanager
    def _on_own_stream(self):
        """Every backward of a graphed run, eager or captured, on one side stream: autograd remembers
        the stream each adapter's gradient was last accumulated on, and a capture may not wait on
        the legacy default stream (nor may anything be captured on it)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield self.stream
        torch.cuda.current_stream().wait_stream(self.stream)

    def _eager(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor) -> torch.Tensor:
        self.eager_runs += 1
        with self._on_own_stream():
            loss, _ = summed_loss(self.model, batch)
            (loss / denominator).backward()
        return loss.detach()

    def summed_loss(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor) -> torch.Tensor:
        """One micro-batch's forward and backward, through its graph when it has one (capturing it
        when due) and eagerly otherwise; returns its summed token loss."""
        if self.grad_tensors is None:
            self._grads_in_place()  # before the first pass, so its backward adds into them (see the module docstring)
        if any(k not in ("input_ids", "position_ids", "labels") for k in batch):
            return self._eager(batch, denominator)
        packed = is_packed(batch["position_ids"])
        key = (tuple(batch["input_ids"].shape), packed)
        if key not in self.seen:
            self.seen.add(key)
            return self._eager(batch, denominator)  # eager first: compiles and autotunes the kernels for this shape
        entry = self.graphs.get(key, False)
        if entry is None:
            return self._eager(batch, denominator)
        embeds, per_layer = self.prologue(batch)
        if entry is False:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs[key] = None
                return self._eager(batch, denominator)
            try:
                entry = self._capture(embeds, per_layer, batch, packed)
            except Exception as err:  # a capture that met a sync or an unsupported call: this shape stays eager
                self.graphs[key] = None
                first = err.__context__ or err  # capture_end's error hides the call that broke the capture
                self.notes.append(f"CUDA graph capture failed for shape {key[0]} ({type(first).__name__}: "
                                  f"{str(first).splitlines()[0][:160]}); running it eagerly")
                torch.cuda.synchronize()
                return self._eager(batch, denominator)
            self.graphs[key] = entry
        graph, static = entry
        self._grads_in_place()
        static.fill(embeds, per_layer, batch, denominator)
        graph.replay()
        self.replays += 1
        return static.loss.clone()
