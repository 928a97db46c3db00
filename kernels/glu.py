"""Gated MLP activations, fused: SwiGLU ``silu(gate) · up`` and GeGLU ``gelu_tanh(gate) · up``.

transformers' gated MLPs compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Unfused,
autograd keeps ``gate``, ``up`` *and* ``act_fn(gate)`` (an extra [tokens, intermediate] tensor —
for gated MLPs the largest activations of a layer) and launches three elementwise kernels. Here
one kernel writes the product, backward keeps only ``gate`` and ``up`` and recomputes the
activation from ``gate``, and with ``inplace_backward=True`` it writes ``dgate``/``dup`` into
those two saved buffers instead of allocating two more (as Liger Kernel does). That is safe when
nothing else holds ``gate`` and ``up`` — true for the outputs of ``gate_proj``/``up_proj`` in an
HF MLP, LoRA-wrapped or not — and the trainer turns it on; the default leaves inputs untouched.
It also rules out a second backward through the same graph (``retain_graph=True``), and it is
ignored for leaf tensors, whose gradient would otherwise share their storage.

The tanh-approximate GELU (``gelu_pytorch_tanh``, Gemma's ``hidden_activation``) is computed as
``g · sigmoid(2k(g + 0.044715 g³))``, ``k = sqrt(2/π)``: the same function as
``0.5 g (1 + tanh(k(g + 0.044715 g³)))``, written with the sigmoid Triton has everywhere.
Everything is computed in fp32 (fp64 for fp64 inputs) and rounded once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import use_triton

SILU, GELU_TANH = 0, 1
_KINDS = {"silu": SILU, "swish": SILU, "gelu_pytorch_tanh": GELU_TANH, "gelu_new": GELU_TANH,
          "gelu_fast": GELU_TANH, "gelu_python_tanh": GELU_TANH}
# Class names of transformers' activation modules (ACT2FN) whose function one of the kernels computes.
_HF_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_pytorch_tanh",
                   "PytorchGELUTanh": "gelu_pytorch_tanh", "NewGELUActivation": "gelu_new",
                   "FastGELUActivation": "gelu_fast"}
_BLOCK = 1024


@triton.jit
def _sigmoid(x):
    # exp of a non-positive number never overflows; both branches are accurate in their tail.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _activation_and_slope(g, KIND: tl.constexpr):
    """act(g) and d act / d g."""
    if KIND == 0:
        sig = _sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    else:
        # tl.full keeps the constants' precision in fp64 (a bare float literal is fp32).
        two_k = tl.full(g.shape, 1.5957691216057308, g.dtype)  # 2 * sqrt(2 / pi)
        cubic = tl.full(g.shape, 0.044715, g.dtype)
        sig = _sigmoid(two_k * (g + cubic * g * g * g))
        slope = sig + g * sig * (1.0 - sig) * two_k * (1.0 + 3.0 * cubic * g * g)
        return g * sig, slope


@triton.jit
def _glu_forward_kernel(GATE, UP, OUT, n, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(ACC)
    act, _ = _activation_and_slope(g, KIND)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(DOUT, GATE, UP, DGATE, DUP, n, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(ACC)
    act, slope = _activation_and_slope(g, KIND)
    # DGATE/DUP may be GATE/UP themselves: every element is read above before it is written.
    tl.store(DGATE + offs, (dout * u * slope).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * act).to(DUP.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind, inplace_backward):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"glu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _glu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, KIND=kind, ACC=_acc(gate.dtype), BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.kind, ctx.inplace_backward = kind, inplace_backward
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = (gate, up) if ctx.inplace_backward else (torch.empty_like(gate), torch.empty_like(up))
        n = gate.numel()
        _glu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
            dout, gate, up, dgate, dup, n, KIND=ctx.kind, ACC=_acc(gate.dtype), BLOCK=_BLOCK,
        )
        return dgate, dup, None, None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _gated(kind: int, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool) -> torch.Tensor:
    if use_triton(gate):
        # A leaf's gradient would become its own storage: never in place there.
        inplace_backward = inplace_backward and not (gate.is_leaf or up.is_leaf)
        return GatedActivationFunction.apply(gate, up, kind, inplace_backward)
    return (swiglu_reference if kind == SILU else geglu_reference)(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` (Llama, Qwen, Mistral)."""
    return _gated(SILU, gate, up, inplace_backward)


def geglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``)."""
    return _gated(GELU_TANH, gate, up, inplace_backward)


def gated_mlp_act(kind: str, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``ACT2FN[kind](gate) * up`` for an HF activation name (``config.hidden_act``/``hidden_activation``)."""
    if kind not in _KINDS:
        raise ValueError(f"glu: no fused kernel for activation {kind!r}; choose one of {', '.join(_KINDS)}")
    return _gated(_KINDS[kind], gate, up, inplace_backward)


def hf_activation(mlp: torch.nn.Module) -> str:
    """The activation name of an HF gated MLP, read from its ``act_fn`` module."""
    name = type(getattr(mlp, "act_fn", None)).__name__
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"glu: {type(mlp).__name__}.act_fn is {name}, which no fused kernel computes")
    return _HF_ACTIVATIONS[name]


def gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """An HF gated MLP's forward (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) with the fused activation.

    In place backward by default: here ``gate`` and ``up`` are the projections' fresh outputs.
    """
    act = gated_mlp_act(hf_activation(mlp), mlp.gate_proj(x), mlp.up_proj(x), inplace_backward)
    return mlp.down_proj(act)


def _tiles_of(flat: torch.Tensor, tiles: int) -> tuple[torch.Tensor, ...]:
    """``flat``'s rows in ``tiles`` parts, never an empty one (a kernel launched over no rows is a
    launch with no grid)."""
    return flat.tensor_split(max(1, min(tiles, flat.shape[0])))


def run_in_tiles(run, x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``run`` (a token-wise function) over ``x``'s tokens in ``tiles`` parts, the results joined."""
    outs = [run(part) for part in _tiles_of(x.reshape(-1, x.shape[-1]), tiles)]
    return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])


class TiledMLPFunction(torch.autograd.Function):
    """An MLP run over the tokens in tiles, keeping only its input for the backward.

    A gated MLP's intermediates (gate, up, their product: three [tokens, intermediate] tensors, 4-8x
    the hidden width) are a layer's largest activations, and under checkpointing they set the
    layer's working set. Here the forward runs each tile without autograd and saves ``x`` alone;
    the backward runs each tile again with autograd and backpropagates it at once, so one tile's
    intermediates live at a time (the idea of Unsloth's and Arctic's TiledMLP). The cost is one more
    forward of the MLP. The trainable parameters' gradients are accumulated into their ``.grad`` by
    those inner backwards (as reentrant checkpointing does), not returned: the outer backward must
    be ``backward()``, not ``autograd.grad`` over the parameters, and no reducer may count them
    (DDP, FSDP): the trainer tiles on one process only.
    """

    @staticmethod
    def forward(ctx, x, run, tiles, *params):
        ctx.run, ctx.tiles = run, tiles
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run_in_tiles(run, x, tiles)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        start = 0
        for part, grad_part in zip(_tiles_of(flat, ctx.tiles), _tiles_of(grad_flat, ctx.tiles)):
            end = start + part.shape[0]
            part = part.requires_grad_()
            with torch.enable_grad():
                out = ctx.run(part)
            torch.autograd.backward(out, grad_part)
            grad_x[start:end] = part.grad
            start = end
        return (grad_x.view_as(x), None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


class GatedMLP(torch.nn.Module):
    """Drop-in for an HF gated MLP: the same projection modules (LoRA-wrapped or quantized ones
    included, under the same names), with the fused activation between them. ``tiles`` > 1 runs it
    over the tokens in that many tiles (:class:`TiledMLPFunction` where autograd records it)."""

    def __init__(self, gate_proj: torch.nn.Module, up_proj: torch.nn.Module, down_proj: torch.nn.Module, kind: str,
                 tiles: int = 1):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"glu: no fused kernel for activation {kind!r}; choose one of {', '.join(_KINDS)}")
        self.gate_proj, self.up_proj, self.down_proj, self.kind = gate_proj, up_proj, down_proj, kind
        self.tiles = tiles

    @classmethod
    def from_hf(cls, mlp: torch.nn.Module) -> "GatedMLP":
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, hf_activation(mlp))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        act = gated_mlp_act(self.kind, self.gate_proj(x), self.up_proj(x), inplace_backward=True)
        return self.down_proj(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles <= 1:
            return self._run(x)
        if torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            if params or x.requires_grad:
                return TiledMLPFunction.apply(x, self._run, self.tiles, *params)
        return run_in_tiles(self._run, x, self.tiles)  # no autograd (checkpointing's first forward): tiles too

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", tiles={self.tiles}" if self.tiles > 1 else "")

