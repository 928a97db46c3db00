"""RoPE forward+backward on q and k at Gemma-4-E2B/E4B and Llama-3.1-8B shapes, 8192 tokens.

q and k are laid out as the models hand them over: Llama's are [batch, heads, seq, head_dim]
transposed views of the projections, Gemma 4's are [batch, seq, heads, head_dim] (unsqueeze_dim=2).
Gemma 4's full-attention layers (head_dim 512) turn only a quarter of the pairs (proportional
RoPE, partial_rotary_factor 0.25); vramplan skips the rest, the other variants rotate them by 0.

cos/sin are ``cat(f, f)`` as transformers builds them, so vramplan reads half of them
(``same_halves``, as the trainer's patch does; Liger always does).

The in-place kernel needs fresh non-leaf q and k each step, so every variant starts from a copy of
the projections' output (the copy is timed for all variants and counted in ``bytes_moved``).
"""

from __future__ import annotations

import torch

from benchmarks.fwd_bwd import compiled, default_backend, forward_backward, try_import
from benchmarks.harness import Case
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.rope import apply_rope, proportional_rotated_pairs, rope_reference

TOKENS = 8192
# (model, layer, q heads, kv heads, head_dim, theta, partial_rotary_factor, unsqueeze_dim)
LAYERS = [
    ("gemma-4-e2b", "sliding", 8, 1, 256, 10_000.0, 1.0, 2),
    ("gemma-4-e2b", "full", 8, 1, 512, 1_000_000.0, 0.25, 2),
    ("gemma-4-e4b", "sliding", 8, 2, 256, 10_000.0, 1.0, 2),
    ("gemma-4-e4b", "full", 8, 2, 512, 1_000_000.0, 0.25, 2),
    ("llama-3.1-8b", "all", 32, 8, 128, 500_000.0, 1.0, 1),
]


def rotary_cos_sin(tokens, head_dim, theta, factor, device, dtype=torch.bfloat16):
    """cos/sin [1, tokens, head_dim] as transformers' rotary embeddings build them (proportional
    RoPE pads inv_freq with zeros, so the non-rotated pairs get cos 1, sin 0)."""
    pairs = proportional_rotated_pairs(head_dim, factor)
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, device=device, dtype=torch.float32) / head_dim)
    inv_freq = torch.cat([inv_freq, torch.zeros(head_dim // 2 - pairs, device=device)])
    freqs = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype), pairs


def _layout(t, unsqueeze_dim):
    """The projections' [batch, seq, heads, dim] output as the attention layer passes it."""
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def cases(device: str, tokens: int = TOKENS, layers=LAYERS, compile_backend: str | None = "default") -> list[Case]:
    backend = default_backend(device) if compile_backend == "default" else compile_backend
    liger = try_import("liger_kernel.ops.rope", "LigerRopeFunction")
    compiled_reference = compiled(rope_reference, backend)
    out = []
    for model, layer, hq, hk, head_dim, theta, factor, unsqueeze_dim in layers:
        cos, sin, pairs = rotary_cos_sin(tokens, head_dim, theta, factor, device)
        q_src = torch.randn(1, tokens, hq, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k_src = torch.randn(1, tokens, hk, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        dq = _layout(torch.randn(1, tokens, hq, head_dim, device=device, dtype=torch.bfloat16), unsqueeze_dim)
        dk = _layout(torch.randn(1, tokens, hk, head_dim, device=device, dtype=torch.bfloat16), unsqueeze_dim)

        def fresh(u=unsqueeze_dim, q_src=q_src, k_src=k_src):
            return _layout(q_src.clone(), u), _layout(k_src.clone(), u)

        def ours(u=unsqueeze_dim, p=pairs, cos=cos, sin=sin, fresh=fresh):
            with kernel_mode("triton"):
                return apply_rope(*fresh(), cos, sin, unsqueeze_dim=u, rotated_pairs=p, same_halves=True)

        def reference(u=unsqueeze_dim, cos=cos, sin=sin, fresh=fresh, fn=rope_reference):
            return fn(*fresh(), cos, sin, u)

        inputs = [q_src, k_src]
        # vramplan's and Liger's backward rotate the incoming gradient in place: their own copies.
        variants = {
            "vramplan": forward_backward(ours, inputs, [dq.clone(), dk.clone()]),
            "torch": forward_backward(reference, inputs, [dq, dk]),
        }
        if compiled_reference is not None:
            variants["torch.compile"] = forward_backward(lambda r=reference, c=compiled_reference: r(fn=c), inputs, [dq, dk])
        if liger is not None:
            def liger_step(u=unsqueeze_dim, cos=cos, sin=sin, fresh=fresh):
                q, k = fresh()
                if u == 2:  # Liger takes [batch, heads, seq, head_dim]
                    q, k = q.transpose(1, 2), k.transpose(1, 2)
                return liger.apply(q, k, cos, sin)
            liger_dq, liger_dk = (g.transpose(1, 2) if unsqueeze_dim == 2 else g for g in (dq, dk))
            variants["liger"] = forward_backward(liger_step, inputs, [liger_dq.clone(), liger_dk.clone()])
        element = q_src.element_size()
        qk = tokens * (hq + hk) * head_dim * element
        # The copy (read + write q, k), forward (read + write the rotated part) and backward (same).
        rotated = qk * pairs * 2 // head_dim
        out.append(Case(
            op="rope", shape=f"{model} {layer} {tokens}x({hq}+{hk})x{head_dim} rot {2 * pairs}",
            variants=variants, bytes_moved=2 * qk + 4 * rotated, cuda_graph=True,
            notes="fwd+bwd, bf16, includes the copy of q/k every variant starts from",
            extra={"model": model, "layer": layer, "rotated_pairs": pairs},
        ))
    return out
