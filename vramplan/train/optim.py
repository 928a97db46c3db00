"""bitsandbytes' 8-bit AdamW stepping one flat tensor, with one device sync per step.

A LoRA run updates hundreds of small adapter tensors (224 for Llama-3.2-1B on all linears).
bitsandbytes launches one update kernel per tensor, after ~tens of µs of Python each, and
the trainer is bound by exactly that host work (H100: the same step time at 1k, 2k and 4k
tokens). ``FlatLoRA`` keeps every adapter as a view into one fp32 buffer, so the optimizer
updates one tensor: one launch, one Python pass. AdamW is elementwise (weight decay too), and
bitsandbytes' 8-bit state is blockwise (one absmax per 256 values, nothing per tensor): with each
adapter's segment starting on a 256-value boundary, every block holds one adapter's values (and
zero padding, which moves no absmax), so the updates equal bitsandbytes' per-tensor ones bit for
bit for adapters of 4,096 values or more (smaller ones bitsandbytes would keep in 32-bit state).
The adapters keep their modules and names (``….lora_A.weight``): state dicts and adapters are
unchanged; the optimizer's own state dict holds one tensor.

bitsandbytes 0.50's ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after the update
of every parameter (a guard for parameters spread over several GPUs). A LoRA run updates
hundreds of small adapter tensors (224 for Llama-3.2-1B on all linears), so the host waits for
the GPU 224 times a step, for kernels of a few microseconds each. The trainer runs on one GPU,
where the updates are ordered on one stream: the same loop with a single sync at the end (which
bitsandbytes also does, for paged states) computes the same values.
"""

from __future__ import annotations

import functools
import math

import torch

from vramplan.train import switches
from vramplan.train.ops import flat_adapters


ALIGN = 256  # bitsandbytes' 8-bit blockwise optimizer state: one absmax per 256 values


def aligned(numel: int) -> int:
    """A flat layout's room for ``numel`` values: whole blocks of ALIGN, so every tensor starts a block."""
    return -(-numel // ALIGN) * ALIGN


class AdapterArena:
    """The flat fp32 buffer a flat or fused optimizer step keeps the adapters in, made before the layers.

    Made after them, it copies adapters that were allocated one by one among the layers' NF4 blocks,
    and their freed places stay reserved: the fused optimizer read 0.1 GB over bitsandbytes' per-tensor
    step on Llama-3.2-1B (H100, session 7). ``take`` hands out the adapters as views in the order
    ``FlatLoRA`` lays them out, which then adopts the buffer without a copy."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device):
        self.buffer = torch.empty(sum(aligned(math.prod(s)) for s in shapes), dtype=torch.float32, device=device)
        self.used = 0

    def take(self, shape) -> torch.Tensor:
        numel = math.prod(shape)
        if self.used + numel > self.buffer.numel():
            raise ValueError(f"the adapter arena holds {self.buffer.numel()} values; {tuple(shape)} does not fit")
        view = self.buffer[self.used:self.used + numel].view(*shape)
        self.used += aligned(numel)
        return view


def _adopted(params: list[torch.nn.Parameter], offsets: list[int], total: int) -> torch.Tensor | None:
    """The buffer the adapters already are views of, at ``offsets`` (an ``AdapterArena`` in this
    layout), as one flat tensor; None when they are not laid out so."""
    storage = params[0].untyped_storage()
    if storage.nbytes() != total * params[0].element_size():
        return None
    for p, start in zip(params, offsets):
        if p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != start or not p.is_contiguous():
            return None
    return params[0].new_empty(0).set_(storage, 0, (total,), (1,))


class FlatLoRA:
    """Parameters re-pointed at views of one flat buffer (``param``) and their gradients at views of
    one flat gradient (``grad``).

    On one process the adapters' backward writes their gradients there itself (``ops.flat_adapters``:
    one launch per backward for all of them instead of a cast per adapter), and ``.grad`` of every
    adapter stays a view of ``grad``: zeroing is one ``zero_``, never None. Under torch.distributed
    (DDP's reducer waits for autograd's per-parameter gradients) the gradients come from autograd
    as usual and are gathered with one foreach copy before a step. Either way an adapter without a
    gradient contributes zeros: all LoRA adapters get one every step; a frozen one would still feel
    momentum and weight decay.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("FlatLoRA takes a non-empty list of parameters of one dtype on one device")
        self.params = params
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += aligned(p.numel())
        flat = _adopted(params, offsets, total)
        if flat is None:  # adapters made one by one: copied into a fresh buffer
            flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
            with torch.no_grad():
                for p, start in zip(params, offsets):
                    view = flat[start:start + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view
        self.grad = torch.zeros_like(flat)
        self.grad_views = [self.grad[start:start + p.numel()].view_as(p) for p, start in zip(params, offsets)]
        self.param = torch.nn.Parameter(flat)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.grads_in_place = not distributed
        if self.grads_in_place:
            self._point_grads()
        # held weakly there: they live as long as the optimizer
        flat_adapters(self.param, self.grad if self.grads_in_place else None)

    def _point_grads(self) -> None:
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def gather_grads(self) -> None:
        """``param.grad``: the adapters' gradients in one buffer, or None when none has one."""
        if self.grads_in_place:
            self._point_grads()  # a gradient someone replaced is copied in
            self.param.grad = self.grad
            return
        present = [(view, p.grad) for view, p in zip(self.grad_views, self.params) if p.grad is not None]
        if not present:
            self.param.grad = None
            return
        if len(present) < len(self.params):
            self.grad.zero_()
        torch._foreach_copy_([view for view, _ in present], [g for _, g in present])
        self.param.grad = self.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.grads_in_place:
            self.grad.zero_()  # the views stay: the backward writes into them
            self._point_grads()
        else:
            for p in self.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()
        self.param.grad = None


class _OneFlatTensor:
    """Mixed in before a bitsandbytes optimizer: it is built on, and steps, one ``FlatLoRA``."""

    def __init__(self, params, *args, **kwargs):
        self.flat = FlatLoRA(list(params))
        super().__init__([self.flat.param], *args, **kwargs)

    def step(self, closure=None, sync: bool = True):
        self.flat.gather_grads()
        return super().step(closure, sync=sync)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat.zero_grad(set_to_none)

    def zero_grad_queued(self) -> None:
        self.zero_grad(set_to_none=False)  # one buffer already: one launch


def _loss_of(closure):
    """An optimizer's closure run with gradients on (steps run under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _OneSyncPerStep:
    """Mixed in before a bitsandbytes ``Optimizer8bit`` subclass: its ``step`` loop minus the per-parameter sync.

    ``sync=False`` leaves out the last one too, for a caller that waits on the GPU itself before it reads
    anything the step wrote (``train.recipe.train_step``): the host then goes on queueing while the GPU works.

    With the switch ``prefetch_paged`` off (the default), a paged state is prefetched to the GPU on its first step
    only: each prefetch is a ``cudaMemPrefetchAsync`` (two a paged tensor a step) that held the stream ~39 µs on the
    H100 though the pages were resident (session 12: 1.33x on Llama-3.2-1B at rank 64). Without memory pressure the
    pages stay where the first one put them; evicted pages fault back on access."""

    @torch.no_grad()
    def step(self, closure=None, sync: bool = True):
        loss = _loss_of(closure)
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        prefetch = switches.enabled("prefetch_paged")
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                first = len(self.state[p]) == 0
                if first:
                    self.init_state(group, p, gindex, pindex)
                if first or prefetch:
                    self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                last = p
        if sync and last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)  # paged states are written asynchronously
        return loss

    def zero_grad_queued(self) -> None:
        """Zero every gradient in place in one foreach launch (CUDA graphs add into the buffers they hold),
        not one ``zero_()`` a tensor: hundreds of host ops fewer for a LoRA run's adapters."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)


def queues_whole(optimizer) -> bool:
    """Whether ``optimizer``'s step ends on a sync of its own that a caller waiting itself may leave out
    (``step(sync=False)``, ``zero_grad_queued``): bitsandbytes' loop here. The fused optimizers never wait."""
    return isinstance(optimizer, _OneSyncPerStep)


#: bitsandbytes' names of an ``AdamW8bitState``'s tensors, in its field order (m, m_absmax, v, v_absmax)
BNB_STATE_NAMES = ("state1", "absmax1", "state2", "absmax2")


def _bnb_named(q) -> dict:
    """An ``AdamW8bitState``'s tensors under bitsandbytes' state names, as both fused optimizers keep them."""
    return dict(zip(BNB_STATE_NAMES, (q.m, q.m_absmax, q.v, q.v_absmax)))


class _DeviceScalars:
    """lr, the step count and the clipping scale of a fused 8-bit AdamW as one-value device tensors,
    which the kernel reads: no Python float in a launch, so no host sync and a graph can replay it."""

    def _device_scalars(self, lr: float, device) -> None:
        self._step = torch.zeros((), dtype=torch.float32, device=device)
        self._lr = torch.full((), float(lr), dtype=torch.float32, device=device)
        self._lr_value = float(lr)
        self._scale = torch.ones((), dtype=torch.float32, device=device)

    def _refresh_lr(self) -> None:
        """lr from ``param_groups[0]`` (torch LR schedulers set it there) with a ``fill_``, when it changed."""
        lr = self.param_groups[0]["lr"]
        if lr != self._lr_value:
            self._lr.fill_(float(lr))
            self._lr_value = lr


class FusedAdamW8bit(_DeviceScalars, torch.optim.Optimizer):
    """bitsandbytes-free 8-bit AdamW over one ``FlatLoRA``: one launch per step
    (``vramplan_kernels.adamw8bit``), no host sync, capturable in a CUDA graph.

    lr, the step count and the clipping scale live on the device: ``step()`` refreshes lr from
    ``param_groups[0]["lr"]`` (so torch LR schedulers work) with a ``fill_``, whose value travels in
    the launch (a pinned staging buffer would race the previous step's copy), and then runs
    :meth:`update`, the part a graph may capture. The states are bitsandbytes' blockwise layout
    under its names (``state1``/``absmax1``, ``state2``/``absmax2``, ``step``), allocated here
    once and loaded in place, so pointers a graph captured stay valid across ``load_state_dict``.
    Not paged: for LoRA the states are tens of MB.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        from vramplan_kernels.adamw8bit import AdamW8bitState

        self.flat = FlatLoRA(list(params))
        if self.flat.param.dtype != torch.float32:
            raise ValueError("FusedAdamW8bit steps fp32 parameters")
        super().__init__([self.flat.param], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        device = self.flat.param.device
        self._quant = AdamW8bitState.zeros(self.flat.param.numel(), device)
        self.state[self.flat.param] = self._own_state()
        self._device_scalars(lr, device)
        self.state[self.flat.param]["step"] = self._step

    def _own_state(self) -> dict:
        return _bnb_named(self._quant)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradients' global L2 norm as a 0-d device tensor (read it after the step); the next
        update scales them by min(1, max_norm/(norm+1e-6)), or skips itself if the norm is not finite."""
        from vramplan_kernels.adamw8bit import clip_scale

        self.flat.gather_grads()
        norm, scale = clip_scale(self.flat.grad, float(max_norm))
        self._scale.copy_(scale)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = _loss_of(closure)
        self._refresh_lr()
        self.flat.gather_grads()
        if self.flat.param.grad is not None:
            self.update()
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """The device work of a step, lr as last refreshed: what a CUDA graph captures."""
        from vramplan_kernels.adamw8bit import adamw8bit_step

        group = self.param_groups[0]
        self._step.add_(1)
        adamw8bit_step(self.flat.param.data, self.flat.grad, self._quant, self._lr, self._step, self._scale,
                       group["betas"], group["eps"], group["weight_decay"])
        self._scale.fill_(1.0)

    def capture(self, max_norm: float | None = None) -> "torch.cuda.CUDAGraph":
        """A CUDA graph of (clipping and) :meth:`update` on this optimizer's buffers; replay it after
        refreshing lr as ``step()`` does. The warm-up (kernel compilation, outside the capture) runs
        the update with a NaN scale, which writes nothing, and takes its step count back."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if max_norm is not None:
                self.clip_grad_norm_(max_norm)
            self._scale.fill_(math.nan)
            self.update()
            self._step.sub_(1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if max_norm is not None:
                self.clip_grad_norm_(max_norm)
            self.update()
        return graph

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat.zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads into the buffers this optimizer holds (in place); also takes the state of
        bitsandbytes' flat 8-bit AdamW (the same layout, ``step`` an int)."""
        super().load_state_dict(state_dict)
        loaded = dict(self.state[self.flat.param])
        loaded.update(loaded.pop("__bnb_optimizer_quant_state__", {}))  # where bitsandbytes' state_dict hides them
        own = {**self._own_state(), "step": self._step}
        if loaded:
            for key, buffer in own.items():
                value = torch.as_tensor(loaded[key])
                if value.numel() != buffer.numel():
                    raise ValueError(f"optimizer state {key!r} holds {value.numel()} values for {buffer.numel()}: "
                                     "a state saved for other adapters")
                buffer.copy_(value.reshape(buffer.shape))
        self.state[self.flat.param] = own
        self._lr_value = None  # refreshed at the next step


class FusedShardedAdamW8bit(_DeviceScalars, torch.optim.Optimizer):
    """The fused 8-bit AdamW on FSDP2's sharded LoRA parameters (DTensors, which bitsandbytes does
    not take): one blockwise state per parameter's local shard (``DTensor.to_local()``, blocked from
    the shard's first value), updated in place shard by shard with the kernel of
    :class:`FusedAdamW8bit` (one launch per shard; FSDP2 owns the shards' storage, so there is no
    one flat buffer to step). lr, step and the clipping scale are device tensors as there; the
    scale comes from the gradients' global norm, summed over ranks on the device (no host sync).

    Checkpoints hold whole states, as for torch AdamW under FSDP2, so a run resumes on any number of
    ranks: :meth:`state_dict` (a collective: every rank calls it) gathers each parameter's codes
    whole, its absmax per shard, and ``shards`` (values per rank: the blocking they were saved
    with); :meth:`load_state_dict` cuts this rank's range out (see :func:`local_state`). Where the
    new shards' blocks are not the saved ones (another world size, a shard not a multiple of 256
    values), the moments are converted through fp32 and quantized again: within one code step.
    Not paged (states of tens to hundreds of MB a rank).
    """

    cuts_its_own_shards = True  # distributed.shard_optimizer_state leaves its whole state to load_state_dict

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        from vramplan_kernels.adamw8bit import AdamW8bitState

        params = list(params)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        locals_ = [_local(p) for p in params]
        if any(t.dtype != torch.float32 for t in locals_):
            raise ValueError("FusedShardedAdamW8bit steps fp32 parameters")
        device = locals_[0].device
        self._quant = [AdamW8bitState.zeros(t.numel(), t.device) for t in locals_]
        self._device_scalars(lr, device)
        self._own_state()

    @property
    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def _own_state(self) -> None:
        for p, q in zip(self._params, self._quant):
            self.state[p] = {**_bnb_named(q), "step": self._step}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradients' global L2 norm (a 0-d device tensor, reduced over ranks); the next update
        scales them by min(1, max_norm/(norm+1e-6)), or skips itself if the norm is not finite."""
        from vramplan.train.distributed import grad_norm
        from vramplan_kernels.adamw8bit import clip_scale_of

        norm = grad_norm(self._params)
        self._scale.copy_(clip_scale_of(norm, float(max_norm)))
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        from vramplan_kernels.adamw8bit import adamw8bit_step

        loss = _loss_of(closure)
        self._refresh_lr()
        group = self.param_groups[0]
        self._step.add_(1)
        for p, q in zip(self._params, self._quant):
            if p.grad is None or q.m.numel() == 0:  # no gradient (as torch AdamW), or a rank's empty shard
                continue
            adamw8bit_step(_local(p), _local_grad(p), q, self._lr, self._step, self._scale,
                           group["betas"], group["eps"], group["weight_decay"])
        self._scale.fill_(1.0)
        return loss

    def state_dict(self) -> dict:
        """Whole states (a collective under FSDP2): per parameter its codes (flat, the parameter's
        values in order), absmax of every shard in rank order, ``shards`` and ``step``."""
        out = super().state_dict()
        out["state"] = {}
        for index, (p, pieces) in enumerate(zip(self._params, self._gathered())):
            named = [_bnb_named(q) for q in pieces]
            out["state"][index] = {**{name: torch.cat([n[name] for n in named]) for name in BNB_STATE_NAMES},
                                   "shards": torch.tensor(_shard_sizes(p)[0]), "step": self._step.clone()}
        return out

    def _gathered(self) -> list[list]:
        """Every rank's state of every parameter: one all-gather of each rank's states as bytes."""
        from torch.distributed.tensor import DTensor
        from vramplan_kernels.adamw8bit import AdamW8bitState

        mesh = next((p.device_mesh for p in self._params if isinstance(p, DTensor)), None)
        if mesh is None or mesh.size() == 1:
            return [[q] for q in self._quant]
        sizes = [_shard_sizes(p)[0] for p in self._params]
        layout = [[(s[r], -(-s[r] // ALIGN)) for s in sizes] for r in range(mesh.size())]
        lengths = [sum(2 * n + 8 * blocks for n, blocks in rank) for rank in layout]
        mine = torch.cat([t.reshape(-1).view(torch.uint8) for q in self._quant
                          for t in (q.m, q.v, q.m_absmax, q.v_absmax)])
        mine = torch.nn.functional.pad(mine, (0, max(lengths) - mine.numel()))
        buffers = [torch.empty_like(mine) for _ in lengths]
        torch.distributed.all_gather(buffers, mine, group=mesh.get_group())
        out = [[] for _ in self._params]
        for rank, buffer in zip(layout, buffers):
            at = 0
            for pieces, (n, blocks) in zip(out, rank):
                parts = []
                for count, dtype in ((n, torch.uint8), (n, torch.uint8), (4 * blocks, torch.float32),
                                     (4 * blocks, torch.float32)):
                    parts.append(buffer[at:at + count].clone().view(dtype))  # a fresh storage: aligned for the view
                    at += count
                pieces.append(AdamW8bitState(parts[0], parts[2], parts[1], parts[3]))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads whole states (this class's, or torch AdamW's ``exp_avg``/``exp_avg_sq``, quantized)
        into this rank's buffers, in place."""
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved = state_dict["state"]
        for index, (p, q) in enumerate(zip(self._params, self._quant)):
            entry = saved.get(index, saved.get(str(index)))
            if entry is None:
                continue
            sizes, rank = _shard_sizes(p)
            start = sum(sizes[:rank])
            loaded = local_state(entry, start, start + q.m.numel(), _numel(p), q.m.device)
            for mine, value in ((q.m, loaded.m), (q.m_absmax, loaded.m_absmax), (q.v, loaded.v),
                                (q.v_absmax, loaded.v_absmax)):
                mine.copy_(value)
            self._step.copy_(torch.as_tensor(entry["step"], dtype=torch.float32).reshape(()))
        self._own_state()
        self._lr_value = None  # refreshed at the next step


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter's (or gradient's) values on this rank, flat: a view of the DTensor's local shard
    (``view`` fails rather than copy: an update must land in the shard itself)."""
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t.data).view(-1)


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).reshape(-1).contiguous()


def _numel(p: torch.Tensor) -> int:
    return math.prod(p.shape)


def _shard_sizes(p: torch.Tensor) -> tuple[list[int], int]:
    """(values each rank holds of ``p``, this rank): FSDP2's Shard(0) cuts dim 0 as ``torch.chunk``
    does, trailing ranks possibly empty (``distributed.like`` cuts the same way)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return [p.numel()], 0
    size, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    rows = [len(c) for c in torch.chunk(torch.empty(p.shape[0], device="meta"), size)]
    per_row = _numel(p) // max(p.shape[0], 1)
    return [r * per_row for r in rows] + [0] * (size - len(rows)), rank


def local_state(entry: dict, start: int, stop: int, numel: int, device):
    """Values [start, stop) of a parameter's whole saved state as a state blocked from ``start``.

    ``entry["shards"]`` says how the saved state was blocked (each shard from its first value).
    Where every new block is a saved block (the same shards, or boundaries 256 values apart), the
    codes and absmax are taken as saved: a resume on the same ranks continues bit for bit.
    Otherwise the saved blocks are dequantized to fp32 and this range quantized again (each value
    moves by at most one code step). torch AdamW's whole ``exp_avg``/``exp_avg_sq`` are quantized.
    """
    from vramplan_kernels.adamw8bit import BLOCKSIZE, AdamW8bitState

    if "exp_avg" in entry:
        m, v = (entry[k].reshape(-1)[start:stop].to(device=device, dtype=torch.float32) for k in ("exp_avg", "exp_avg_sq"))
        return AdamW8bitState.quantized(m, v)
    codes = tuple(entry[name] for name in BNB_STATE_NAMES)
    sizes = [int(s) for s in entry["shards"]]
    if codes[0].numel() != numel or sum(sizes) != numel:
        raise ValueError(f"optimizer state of {codes[0].numel()} values for a parameter of {numel}: "
                         "a state saved for other adapters")
    pieces, aligned, offset, block = [], True, 0, 0
    for size in sizes:
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            aligned &= (lo - start) % BLOCKSIZE == 0 and (lo - offset) % BLOCKSIZE == 0 and \
                (hi == offset + size or (hi - offset) % BLOCKSIZE == 0)
            first, last = (lo - offset) // BLOCKSIZE, -(-(hi - offset) // BLOCKSIZE)  # the saved blocks it touches
            whole = slice(offset + first * BLOCKSIZE, min(offset + size, offset + last * BLOCKSIZE))
            blocks = slice(block + first, block + last)
            piece = AdamW8bitState(*(t[whole if i % 2 == 0 else blocks].to(device) for i, t in enumerate(codes)))
            pieces.append((piece, lo - whole.start, hi - whole.start))
        offset, block = offset + size, block + -(-size // BLOCKSIZE)
    if not pieces:  # an empty shard
        return AdamW8bitState.zeros(0, device)
    if aligned:  # each piece is whole saved blocks
        return AdamW8bitState(*(torch.cat(column) for column in zip(*[(p.m, p.m_absmax, p.v, p.v_absmax)
                                                                        for p, _, _ in pieces])))
    moments = [(m[a:b], v[a:b]) for p, a, b in pieces for m, v in [p.moments()]]
    return AdamW8bitState.quantized(torch.cat([m for m, _ in moments]), torch.cat([v for _, v in moments]))


def fused_update_applies(plan, sharded: bool = False) -> bool:
    """Whether the trainer steps with the fused 8-bit AdamW, as the planner prices it
    (``stacks.vramplan.steps_fused``): :class:`FusedAdamW8bit` on one process, and under FSDP
    (``sharded``) :class:`FusedShardedAdamW8bit`; never under DDP, whose reducer owns the gradients."""
    from vramplan.stacks.vramplan import fsdp_steps_fused, steps_fused

    if sharded:
        return fsdp_steps_fused(plan)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return steps_fused(plan) and plan.parallel != "fsdp" and not distributed


def flat_update_pays(model, plan=None) -> bool:
    """Whether to step the adapters as one flat tensor for this model: when the plan asks for it
    (``plan.steps_flat``) or the environment switches it on (``VRAMPLAN_ENABLE=flat_optimizer``),
    never for :data:`FLAT_DECLINED`. Under CUDA graphs on the H100 it took Llama-3.2-1B from
    27,329 to 41,411 tok/s at 2,048 tokens and Llama-3.1-8B from 7,386 to 8,855, for 0.29-0.38 GB
    more (benchmarks/results/trainer_graphs_h100.jsonl)."""
    from vramplan.stacks.vramplan import FLAT_DECLINED

    if not ((plan is not None and plan.steps_flat) or switches.enabled("flat_optimizer")):
        return False
    return model_type(model) not in FLAT_DECLINED


def model_type(model) -> str:
    """The text model's ``model_type`` (a multimodal config's text part)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", "")


@functools.lru_cache(maxsize=None)
def eight_bit_adamw(paged: bool, flat: bool = True) -> type:
    """The bitsandbytes class for the plan's optimizer, with one sync per step and (``flat``) one
    flat tensor for all the parameters it is given (one class per kind, made on first use:
    importing bitsandbytes is slow and loud). ``flat=False`` where something else owns the
    parameters' storage (FSDP)."""
    import bitsandbytes as bnb

    base = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    mixins = (_OneFlatTensor, _OneSyncPerStep) if flat else (_OneSyncPerStep,)
    return type(base.__name__, (*mixins, base), {"__doc__": base.__doc__, "__module__": __name__})
