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

from vramplan.train.ops import flat_adapters


ALIGN = 256  # bitsandbytes' 8-bit blockwise optimizer state: one absmax per 256 values


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
            total += -(-p.numel() // ALIGN) * ALIGN
        flat = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.grad = torch.zeros_like(flat)
        with torch.no_grad():
            for p, start in zip(params, offsets):
                view = flat[start:start + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
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

    def step(self, closure=None):
        self.flat.gather_grads()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat.zero_grad(set_to_none)


def _loss_of(closure):
    """An optimizer's closure run with gradients on (steps run under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _OneSyncPerStep:
    """Mixed in before a bitsandbytes ``Optimizer8bit`` subclass: its ``step`` loop minus the per-parameter sync."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = _loss_of(closure)
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                last = p
        if last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)  # paged states are written asynchronously
        return loss


class FusedAdamW8bit(torch.optim.Optimizer):
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
        self._step = torch.zeros((), dtype=torch.float32, device=device)
        self.state[self.flat.param]["step"] = self._step
        self._lr = torch.full((), float(lr), dtype=torch.float32, device=device)
        self._lr_value = float(lr)
        self._scale = torch.ones((), dtype=torch.float32, device=device)

    def _own_state(self) -> dict:
        q = self._quant
        return {"state1": q.m, "absmax1": q.m_absmax, "state2": q.v, "absmax2": q.v_absmax}

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
        lr = self.param_groups[0]["lr"]
        if lr != self._lr_value:
            self._lr.fill_(float(lr))
            self._lr_value = lr
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


def fused_update_applies(plan, sharded: bool = False) -> bool:
    """Whether the trainer steps with :class:`FusedAdamW8bit`: switched on
    (``VRAMPLAN_ENABLE=fused_optimizer``), for an 8-bit AdamW plan (paged or not: the fused
    states are not paged) with fp32 adapters (the kernel's parameter type) on one process (FSDP
    shards the parameters, DDP's reducer owns the gradients: those keep bitsandbytes)."""
    from vramplan.train import switches

    if not switches.enabled("fused_optimizer") or plan.optimizer == "adamw" or plan.lora_dtype != "fp32" or sharded:
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def flat_update_pays(model, plan=None) -> bool:
    """Whether to step the adapters as one flat tensor for this model: when the plan asks for it
    (``plan.steps_flat``) or the environment switches it on (``VRAMPLAN_ENABLE=flat_optimizer``),
    never for :data:`FLAT_DECLINED`. Under CUDA graphs on the H100 it took Llama-3.2-1B from
    27,329 to 41,411 tok/s at 2,048 tokens and Llama-3.1-8B from 7,386 to 8,855, for 0.29-0.38 GB
    more (benchmarks/results/trainer_graphs_h100.jsonl)."""
    from vramplan.stacks.vramplan import FLAT_DECLINED
    from vramplan.train import switches

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
