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
The experts are frozen and not adapted; the backward recomputes each expert's product from the
saved input (nothing per expert is kept between forward and backward) and returns d hidden and
d routing weights (the router sits on the path from the trainable attention adapters).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vramplan.errors import VramplanError
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


class NF4Experts(nn.Module):
    """Frozen routed experts, each expert's ``gate_up`` [2I, H] and ``down`` [H, I] in NF4."""

    def __init__(self, gate_up: list[NF4Tensor], down: list[NF4Tensor], act_fn: nn.Module):
        super().__init__()
        self.num_experts = len(gate_up)
        self.intermediate_dim, self.hidden_dim = gate_up[0].shape[0] // 2, gate_up[0].shape[1]
        self.gate_up, self.down = gate_up, down  # moved by _apply, never cast: their scales stay fp32
        self.act_fn = act_fn

    @classmethod
    def from_hf(cls, experts: nn.Module, device: torch.device, double_quant: bool = True) -> "NF4Experts":
        """Quantize ``experts`` on ``device`` one expert matrix at a time: the device holds one
        expert's bf16 slice beside the packed copies, never the layer's fused bf16 tensors."""
        check_layout(experts)
        gate_up, down = [], []
        for e in range(experts.gate_up_proj.shape[0]):
            gate_up.append(quantize_nf4(experts.gate_up_proj[e].detach().to(device), double_quant=double_quant))
            down.append(quantize_nf4(experts.down_proj[e].detach().to(device), double_quant=double_quant))
        return cls(gate_up, down, experts.act_fn)

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
        return RoutedExperts.apply(hidden_states, top_k_index, top_k_weights, self)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, base=nf4")


def routed(top_k_index: torch.Tensor, num_experts: int):
    """(expert, its tokens, their top-k slots) for each expert some token is routed to, in
    transformers' order (slot-major); an index of ``num_experts`` (expert parallelism's "not here") is skipped."""
    for expert in torch.unique(top_k_index).tolist():
        if expert >= num_experts:
            continue
        slot, token = torch.where(top_k_index.t() == expert)
        yield expert, token, slot


class RoutedExperts(torch.autograd.Function):
    """The experts' sum over routed tokens with frozen NF4 weights; saves only its three inputs."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, experts: NF4Experts):
        ctx.save_for_backward(hidden, top_k_index, top_k_weights)
        ctx.experts = experts
        out = torch.zeros_like(hidden)
        for expert, token, slot in routed(top_k_index, experts.num_experts):
            gate_up, down = experts.dequantized(expert, hidden.dtype)
            gate, up = nn.functional.linear(hidden[token], gate_up).chunk(2, dim=-1)
            y = nn.functional.linear(experts.act_fn(gate) * up, down) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, top_k_index, top_k_weights = ctx.saved_tensors
        experts: NF4Experts = ctx.experts
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weights = torch.zeros_like(top_k_weights) if ctx.needs_input_grad[2] else None
        for expert, token, slot in routed(top_k_index, experts.num_experts):
            gate_up, down = experts.dequantized(expert, hidden.dtype)
            x, g = hidden[token], grad_out[token].to(hidden.dtype)
            with torch.enable_grad():
                gate, up = nn.functional.linear(x, gate_up).detach().chunk(2, dim=-1)
                gate.requires_grad_(True)
                act = experts.act_fn(gate)
            inner = act.detach() * up
            if grad_weights is not None:
                y = nn.functional.linear(inner, down)
                grad_weights[token, slot] = (g * y).sum(-1).to(grad_weights.dtype)
            if grad_hidden is None:
                continue
            grad_inner = (g * top_k_weights[token, slot, None]) @ down
            grad_gate, = torch.autograd.grad(act, gate, grad_inner * up)
            grad_up = grad_inner * act.detach()
            grad_hidden.index_add_(0, token, torch.cat([grad_gate, grad_up], dim=-1) @ gate_up)
        return grad_hidden, None, grad_weights, None

