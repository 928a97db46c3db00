"""Gated MLP activations forward+backward at Gemma-4-E2B/E4B (GeGLU) and Llama-3.1-8B (SwiGLU)
intermediate sizes, 8192 tokens.

vramplan's variant runs as the trainer does, with ``inplace_backward``: dgate/dup overwrite the
saved gate/up (so those buffers hold gradients after the first run; elementwise timing does not
depend on the values). Liger Kernel does the same. ``measure_peak_memory`` shows the saving. Eager only: session 23
marked the cases for CUDA-graph timing and every variant's capture failed (torch's own included), while their eager
times already read 98-100% of the measured bandwidth (vramplan's 1.00-1.12x the best other, 1.05-1.19x Liger).
"""

from __future__ import annotations

import torch

from benchmarks.fwd_bwd import compiled, default_backend, forward_backward, try_import
from benchmarks.harness import Case
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference

TOKENS = 8192
MODELS = [("gemma-4-e2b", 6144, "geglu"), ("gemma-4-e2b shared-kv", 12288, "geglu"),
          ("gemma-4-e4b", 10240, "geglu"), ("llama-3.1-8b", 14336, "swiglu")]
_OURS = {"swiglu": swiglu, "geglu": geglu}
_REFERENCE = {"swiglu": swiglu_reference, "geglu": geglu_reference}
_LIGER = {"swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
          "geglu": ("liger_kernel.ops.geglu", "LigerGELUMulFunction")}


def _buffers(tokens, width, device):
    """gate and up as a projection leaves them: non-leaf tensors (``autograd.grad`` stops at them)."""
    gate = torch.randn(tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True) * 1
    up = torch.randn(tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True) * 1
    return gate, up


def _ours(op, gate, up):
    with kernel_mode("triton"):
        return _OURS[op](gate, up, inplace_backward=True)


def cases(device: str, tokens: int = TOKENS, models=MODELS, compile_backend: str | None = "default") -> list[Case]:
    backend = default_backend(device) if compile_backend == "default" else compile_backend
    out = []
    for model, width, op in models:
        reference = _REFERENCE[op]
        compiled_reference = compiled(reference, backend)
        liger = try_import(*_LIGER[op])
        dout = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
        gate, up = _buffers(tokens, width, device)  # the in-place variants overwrite these
        ref_gate, ref_up = _buffers(tokens, width, device)
        variants = {
            "vramplan": forward_backward(lambda g=gate, u=up, o=op: _ours(o, g, u), [gate, up], [dout]),
            "torch": forward_backward(lambda g=ref_gate, u=ref_up, r=reference: r(g, u), [ref_gate, ref_up], [dout]),
        }
        if compiled_reference is not None:
            variants["torch.compile"] = forward_backward(lambda g=ref_gate, u=ref_up, c=compiled_reference: c(g, u),
                                                         [ref_gate, ref_up], [dout])
        if liger is not None:
            liger_gate, liger_up = _buffers(tokens, width, device)
            variants["liger"] = forward_backward(lambda g=liger_gate, u=liger_up, f=liger: f.apply(g, u),
                                                 [liger_gate, liger_up], [dout])
        # forward reads gate, up and writes the product; backward reads dout, gate, up, writes dgate, dup.
        bytes_moved = 8 * tokens * width * gate.element_size()
        out.append(Case(op=op, shape=f"{model} {tokens}x{width}", variants=variants, bytes_moved=bytes_moved,
                        measure_peak_memory=True, notes="fwd+bwd, bf16", extra={"model": model}))
    return out
