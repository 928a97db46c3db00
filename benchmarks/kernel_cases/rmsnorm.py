"""RMSNorm forward+backward at the hidden sizes of Gemma-4-E2B/E4B and Llama-3.1-8B, 8192 tokens.

LoRA freezes the norm weights, so the main cases skip dW; one case per model also computes dW.
Variants: vramplan's kernel, the PyTorch reference (what transformers runs), torch.compile of it,
and Liger Kernel's LigerRMSNormFunction when installed.
"""

from __future__ import annotations

import torch

from benchmarks.fwd_bwd import compiled, default_backend, forward_backward, try_import
from benchmarks.harness import Case
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.rmsnorm import rms_norm, rms_norm_reference

TOKENS = 8192
# (model, hidden, offset, cast_mode): Gemma 4 scales by w in fp32 (offset 0), Llama rounds x̂ first.
MODELS = [("gemma-4-e2b", 1536, 0.0, "gemma"), ("gemma-4-e4b", 2560, 0.0, "gemma"),
          ("llama-3.1-8b", 4096, 0.0, "llama")]


def _ours(x, w, eps, offset, cast_mode):
    with kernel_mode("triton"):
        return rms_norm(x, w, eps, offset, cast_mode)


def cases(device: str, tokens: int = TOKENS, models=MODELS, compile_backend: str | None = "default") -> list[Case]:
    backend = default_backend(device) if compile_backend == "default" else compile_backend
    liger = try_import("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    compiled_reference = compiled(rms_norm_reference, backend)
    out = []
    for model, hidden, offset, cast_mode in models:
        for train_weight in (False, True):
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = (torch.rand(hidden, device=device) + 0.5).to(torch.bfloat16).requires_grad_(train_weight)
            dy = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            inputs = [x, w] if train_weight else [x]
            args = (x, w, 1e-6, offset, cast_mode)
            variants = {
                "vramplan": forward_backward(lambda a=args: _ours(*a), inputs, [dy]),
                "torch": forward_backward(lambda a=args: rms_norm_reference(*a), inputs, [dy]),
            }
            if compiled_reference is not None:
                variants["torch.compile"] = forward_backward(lambda a=args, c=compiled_reference: c(*a), inputs, [dy])
            if liger is not None:
                # Liger writes dx into dy (in_place); give it its own dy so the others' stays intact.
                liger_dy = dy.clone()
                variants["liger"] = forward_backward(
                    lambda: liger.apply(x, w, 1e-6, offset, cast_mode), inputs, [liger_dy])
            # forward reads x, writes y; backward reads x and dy, writes dx (rstd and w are negligible).
            bytes_moved = 5 * tokens * hidden * x.element_size()
            out.append(Case(
                op="rmsnorm", shape=f"{model} {tokens}x{hidden} {'+dW' if train_weight else 'frozen w'}",
                variants=variants, bytes_moved=bytes_moved, measure_peak_memory=True,
                notes="fwd+bwd, bf16", extra={"model": model, "cast_mode": cast_mode, "dw": train_weight},
            ))
    return out
