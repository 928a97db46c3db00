"""An MoE layer's routed experts frozen in NF4: what replaces transformers' fused experts module.

transformers 5 holds an MoE layer's experts as one module with two fused 3-D parameters,
``gate_up_proj`` [E, 2·I, H] (gate rows first, then up) and ``down_proj`` [E, H, I], not as
linears, so ``add_lora`` never saw them and they stayed bf16: 57 GB of Qwen3-30B-A3B's 61 GB.
Here each expert's two matrices are quantized on their own (bitsandbytes-compatible NF4 via
``vramplan_kernels.nf4``), so a step dequantizes only the experts its tokens are routed to,
one at a time, into one reused pair of buffers.

The forward computes what transformers' eager experts forward computes for the same routing
(``top_k_index`` [T, K], ``top_k_weights`` [T, K]): for each routed expert, ``act(x Wg^T) ·
(x Wu^T)`` times ``Wd^T``, scaled by the token's routing weight, summed into the token's row.
The experts are frozen; the backward recomputes each expert's product from the saved input
(nothing per expert is kept between forward and backward) and returns d hidden and d routing
weights (the router sits on the path from the trainable attention adapters).

When the plan targets them (``EXPERT_TARGETS``), each expert's two matrices also get a LoRA pair,
with PEFT's ``ParamWrapper`` math for a 3-D parameter: expert e's weight [out, in] becomes
``W_e + (alpha / r) · B_e A_e``. Here A is held [E, r, in] and B [E, out, r] (one contiguous block
per expert); PEFT holds them as one linear pair, ``lora_A`` [E·r, in] (expert e's rows e·r … e·r+r−1)
and ``lora_B`` [out, r·E] (expert e's columns e, e+E, …): ``to_peft`` / ``from_peft`` convert.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vramplan.errors import VramplanError
from vramplan.plan import EXPERT_TARGETS
from vramplan.train.ops import NF4Tensor, dequantize_nf4, quantize_nf4

#: transformers classes whose eager forward is the gated expert loop this module reproduces
#: (read in transformers 5.17 and 5.24: same parameters, same [gate; up] layout, same signature).
FUSED_EXPERTS = ("Qwen3MoeExperts", "Gemma4TextExperts")
CALL_SIGNATURE = ("hidden_states", "top_k_index", "top_k_weights")

_buffers: dict[tuple, torch.Tensor] = {}


def expert_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One dense buffer per (shape, dtype, device), shared by every layer's experts: each routed
    expert is dequantized into it, used and overwritten by the next (layers run one at a time)."""
    key = (tuple(shape), dtype, torch.device(device))
    buffer = _buffers.get(key)
    if buffer is None:
        buffer = _buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers module holding the experts as fused 3-D tensors (any family)."""
    weight = getattr(module, "gate_up_proj", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 3


def check_layout(module: nn.Module) -> None:
    """Refuse, naming the fix, an experts module whose layout or call is not the one reproduced here."""
    name = type(module).__name__
    if name not in FUSED_EXPERTS:
        raise VramplanError(f"{name}: vramplan can quantize the fused experts of {', '.join(FUSED_EXPERTS)} only; "
                            "set quant to bf16 to train this MoE with its experts frozen in bf16")
    e, two_i, h = module.gate_up_proj.shape
    layout = dict(has_bias=False, is_transposed=False, is_concatenated=True, has_gate=True, has_post_expert_norm=False)
    odd = [key for key, value in layout.items() if getattr(module, key, value) != value]
    params = tuple(inspect.signature(type(module).forward).parameters)[1:4]
    if odd or two_i % 2 or tuple(module.down_proj.shape) != (e, h, two_i // 2) or params != CALL_SIGNATURE \
            or getattr(module, "num_experts", e) != e:
        raise VramplanError(f"{name} in this transformers version is not laid out as gate_up_proj [E, 2I, H] / "
                            f"down_proj [E, H, I] called with {', '.join(CALL_SIGNATURE)}; set quant to bf16")


class ExpertLoRA(nn.Module):
    """One LoRA pair per expert for one fused matrix: ``A`` [E, r, in], ``B`` [E, out, r] (B zero at init,
    A as PEFT's ``nn.Linear(in, E·r)`` initialises its weight: kaiming-uniform, a=√5)."""

    def __init__(self, experts: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        bound = 1.0 / d_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) on a [*, d_in] weight
        self.A = nn.Parameter(torch.empty(experts, rank, d_in, dtype=dtype, device=device).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(experts, d_out, rank, dtype=dtype, device=device))

    def to_peft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's (``lora_A.weight`` [E·r, in], ``lora_B.weight`` [out, r·E])."""
        e, r, d_in = self.A.shape
        return self.A.reshape(e * r, d_in), self.B.permute(1, 2, 0).reshape(self.B.shape[1], r * e)

    def from_peft(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        b, a = peft_delta_factors(lora_a, lora_b, self.A.shape[0])
        with torch.no_grad():
            self.A.copy_(a)
            self.B.copy_(b)


def peft_delta_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stored pair as per-expert factors (B [E, out, r], A [E, r, in]): delta_e = scale · B_e A_e."""
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)
    return b, a


def peft_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int, scale: float) -> torch.Tensor:
    """The [E, out, in] update PEFT adds to a fused expert parameter laid out [E, out, in]."""
    b, a = peft_delta_factors(lora_a.float(), lora_b.float(), experts)
    return scale * torch.bmm(b, a)


class NF4Experts(nn.Module):
    """Frozen routed experts, each expert's ``gate_up`` [2I, H] and ``down`` [H, I] in NF4, optionally
    with LoRA (``gate_up_lora`` / ``down_lora``, see ``add_lora``)."""

    def __init__(self, gate_up: list[NF4Tensor], down: list[NF4Tensor], act_fn: nn.Module,
                 parameter_order: tuple[str, ...] = ("gate_up_proj", "down_proj")):
        super().__init__()
        self.num_experts = len(gate_up)
        self.intermediate_dim, self.hidden_dim = gate_up[0].shape[0] // 2, gate_up[0].shape[1]
        self.gate_up, self.down = gate_up, down  # moved by _apply, never cast: their scales stay fp32
        self.act_fn = act_fn
        # transformers' registration order of the fused parameters: PEFT nests one ParamWrapper per
        # targeted parameter in this order, which decides its key names (``peft_key_prefixes``)
        self.parameter_order = parameter_order
        self.gate_up_lora: ExpertLoRA | None = None
        self.down_lora: ExpertLoRA | None = None
        self.scaling = 0.0

    @classmethod
    def from_hf(cls, experts: nn.Module, device: torch.device, double_quant: bool = True) -> "NF4Experts":
        """Quantize ``experts`` on ``device`` one expert matrix at a time: the device holds one
        expert's bf16 slice beside the packed copies, never the layer's fused bf16 tensors."""
        check_layout(experts)
        gate_up, down = [], []
        for e in range(experts.gate_up_proj.shape[0]):
            gate_up.append(quantize_nf4(experts.gate_up_proj[e].detach().to(device), double_quant=double_quant))
            down.append(quantize_nf4(experts.down_proj[e].detach().to(device), double_quant=double_quant))
        order = tuple(n for n, p in experts.named_parameters(recurse=False) if n in ("gate_up_proj", "down_proj"))
        return cls(gate_up, down, experts.act_fn, order)

    def add_lora(self, targets, rank: int, alpha: float, dtype: torch.dtype) -> list[str]:
        """LoRA on the fused matrices ``targets`` names (``EXPERT_TARGETS``); return the adapted parameter names."""
        device = self.gate_up[0].device
        adapted = []
        h, i, e = self.hidden_dim, self.intermediate_dim, self.num_experts
        gate_up_target, down_target = EXPERT_TARGETS
        if gate_up_target in targets:
            self.gate_up_lora = ExpertLoRA(e, h, 2 * i, rank, dtype, device)
            adapted.append("gate_up_proj")
        if down_target in targets:
            self.down_lora = ExpertLoRA(e, i, h, rank, dtype, device)
            adapted.append("down_proj")
        self.scaling = alpha / rank
        return adapted

    def loras(self) -> dict[str, ExpertLoRA]:
        """The adapted fused parameters' names (transformers') -> their LoRA pairs."""
        return {name: lora for name, lora in (("gate_up_proj", self.gate_up_lora), ("down_proj", self.down_lora))
                if lora is not None}

    def peft_key_prefixes(self) -> dict[str, str]:
        """Adapted parameter -> the module path suffix PEFT saves its pair under: the parameter PEFT
        wraps first is innermost (``experts.base_layer.lora_A``), the last outermost (``experts.lora_A``)."""
        adapted = [name for name in self.parameter_order if name in self.loras()]
        return {name: ".base_layer" * (len(adapted) - 1 - k) for k, name in enumerate(adapted)}

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, device=self.gate_up[0].device)).device
        self.gate_up = [q.to(device) for q in self.gate_up]
        self.down = [q.to(device) for q in self.down]
        return super()._apply(fn, recurse)

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in (*self.gate_up, *self.down))

    def dequantized(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s (gate_up [2I, H], down [H, I]) decoded into the shared buffers."""
        device = self.gate_up[expert].device
        gate_up = expert_buffer(self.gate_up[expert].shape, dtype, device)
        down = expert_buffer(self.down[expert].shape, dtype, device)
        return dequantize_nf4(self.gate_up[expert], out=gate_up), dequantize_nf4(self.down[expert], out=down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        adapters = [t for lora in (self.gate_up_lora, self.down_lora)
                    for t in ((None, None) if lora is None else (lora.A, lora.B))]
        return RoutedExperts.apply(hidden_states, top_k_index, top_k_weights, self, *adapters)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, base=nf4, lora={sorted(self.loras()) or None}")


def routed(top_k_index: torch.Tensor, num_experts: int):
    """(expert, its tokens, their top-k slots) for each expert some token is routed to, in
    transformers' order (slot-major); an index of ``num_experts`` (expert parallelism's "not here") is skipped."""
    for expert in torch.unique(top_k_index).tolist():
        if expert >= num_experts:
            continue
        slot, token = torch.where(top_k_index.t() == expert)
        yield expert, token, slot


def with_lora(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ, x·Aᵀ): one expert's matrix with its adapter, in x's dtype."""
    y = nn.functional.linear(x, weight)
    if a is None:
        return y, None
    xa = nn.functional.linear(x, a.to(x.dtype))
    return y + scaling * nn.functional.linear(xa, b.to(x.dtype)), xa


def lora_backward(grad_y: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scaling: float, grads: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Add one expert's dA [r, in] and dB [out, r] into ``grads`` (fp32 slices; None: not wanted)
    and return the adapter's share of dx."""
    grad_xa = scaling * (grad_y @ b.to(grad_y.dtype))
    if grads is not None:
        grads[0].add_((grad_xa.t() @ x).float())
        grads[1].add_(scaling * (grad_y.t() @ xa).float())
    return grad_xa @ a.to(grad_y.dtype)


class RoutedExperts(torch.autograd.Function):
    """The experts' sum over routed tokens with frozen NF4 weights and optional per-expert LoRA;
    saves only its inputs (nothing per expert)."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, experts: NF4Experts, gu_a=None, gu_b=None, dn_a=None, dn_b=None):
        ctx.save_for_backward(hidden, top_k_index, top_k_weights, gu_a, gu_b, dn_a, dn_b)
        ctx.experts = experts
        s = experts.scaling
        out = torch.zeros_like(hidden)
        for expert, token, slot in routed(top_k_index, experts.num_experts):
            gate_up, down = experts.dequantized(expert, hidden.dtype)
            x = hidden[token]
            gu, _ = with_lora(x, gate_up, *_pair(gu_a, gu_b, expert), s)
            gate, up = gu.chunk(2, dim=-1)
            y, _ = with_lora(experts.act_fn(gate) * up, down, *_pair(dn_a, dn_b, expert), s)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, top_k_index, top_k_weights, gu_a, gu_b, dn_a, dn_b = ctx.saved_tensors
        experts: NF4Experts = ctx.experts
        s = experts.scaling
        needs = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weights = torch.zeros_like(top_k_weights) if needs[2] else None
        # fp32 gradients of (gate_up A, B) and (down A, B), where the adapter exists and trains
        grads = [[torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in pair]
                 if pair[0] is not None and (needs[4 + 2 * k] or needs[5 + 2 * k]) else None
                 for k, pair in enumerate(((gu_a, gu_b), (dn_a, dn_b)))]
        if grad_hidden is None and grad_weights is None and grads == [None, None]:
            return (None,) * 8
        for expert, token, slot in routed(top_k_index, experts.num_experts):
            gate_up, down = experts.dequantized(expert, hidden.dtype)
            x, g = hidden[token], grad_out[token].to(hidden.dtype)
            gu, xa = with_lora(x, gate_up, *_pair(gu_a, gu_b, expert), s)
            with torch.enable_grad():
                gate, up = gu.detach().chunk(2, dim=-1)
                gate.requires_grad_(True)
                act = experts.act_fn(gate)
            inner = act.detach() * up
            y, ia = with_lora(inner, down, *_pair(dn_a, dn_b, expert), s)
            if grad_weights is not None:
                grad_weights[token, slot] = (g * y).sum(-1).to(grad_weights.dtype)
            if grad_hidden is None and grads == [None, None]:
                continue
            grad_y = g * top_k_weights[token, slot, None]
            grad_inner = grad_y @ down
            if dn_a is not None:
                grad_inner += lora_backward(grad_y, inner, ia, dn_a[expert], dn_b[expert], s, _at(grads[1], expert))
            grad_gate, = torch.autograd.grad(act, gate, grad_inner * up)
            grad_gu = torch.cat([grad_gate, grad_inner * act.detach()], dim=-1)
            if gu_a is not None and (grad_hidden is not None or grads[0] is not None):
                lora_x = lora_backward(grad_gu, x, xa, gu_a[expert], gu_b[expert], s, _at(grads[0], expert))
            if grad_hidden is not None:
                grad_x = grad_gu @ gate_up
                grad_hidden.index_add_(0, token, grad_x + lora_x if gu_a is not None else grad_x)
        lora_grads = []
        for pair, params in zip(grads, ((gu_a, gu_b), (dn_a, dn_b))):
            lora_grads += [None, None] if pair is None else [g.to(p.dtype) for g, p in zip(pair, params)]
        return (grad_hidden, None, grad_weights, None, *lora_grads)


def _at(grads, expert: int):
    return None if grads is None else (grads[0][expert], grads[1][expert])


def _pair(a: torch.Tensor | None, b: torch.Tensor | None, expert: int):
    return (None, None) if a is None else (a[expert], b[expert])
