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
# (norm, rows per token, width, offset, cast_mode, has weight): Gemma 4 scales by w in fp32
# (offset 0), Llama rounds x̂ first. Gemma 4 also normalises q and k per head (q_norm over
# 8 heads × 256 on sliding layers) and v without a weight (v_norm; E2B has one KV head).
MODELS = [("gemma-4-e2b", 1, 1536, 0.0, "gemma", True), ("gemma-4-e4b", 1, 2560, 0.0, "gemma", True),
          ("llama-3.1-8b", 1, 4096, 0.0, "llama", True), ("gemma-4-e2b q_norm", 8, 256, 0.0, "gemma", True),
          ("gemma-4-e2b v_norm", 1, 256, 0.0, "gemma", False)]


def _ours(x, w, eps, offset, cast_mode):
    with kernel_mode("triton"):
        return rms_norm(x, w, eps, offset, cast_mode)


def cases(device: str, tokens: int = TOKENS, models=MODELS, compile_backend: str | None = "default") -> list[Case]:
    backend = default_backend(device) if compile_backend == "default" else compile_backend
    liger = try_import("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    compiled_reference = compiled(rms_norm_reference, backend)
    out = []
    for model, per_token, hidden, offset, cast_mode, has_weight in models:
        rows = tokens * per_token
        for train_weight in (False, True) if has_weight else (False,):
            x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = (torch.rand(hidden, device=device) + 0.5).to(torch.bfloat16).requires_grad_(train_weight)
            w = w if has_weight else None
            dy = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
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
                variants["liger"] = forward_backward(lambda a=args: liger.apply(*a), inputs, [liger_dy])
            # forward reads x, writes y; backward reads x and dy, writes dx (rstd and w are negligible).
            bytes_moved = 5 * rows * hidden * x.element_size()
            weight_note = "+dW" if train_weight else "frozen w" if has_weight else "no weight"
            out.append(Case(
                op="rmsnorm", shape=f"{model} {rows}x{hidden} {weight_note}",
                variants=variants, bytes_moved=bytes_moved, measure_peak_memory=True, cuda_graph=True,
                notes="fwd+bwd, bf16", extra={"model": model, "cast_mode": cast_mode, "dw": train_weight},
            ))
    return out
