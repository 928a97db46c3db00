"""QLoRA linear, forward + backward, at training token counts.

Compared with what PEFT runs on bitsandbytes (``matmul_4bit`` for the base, then two separate
LoRA matmuls on x cast to the adapter dtype) and with dequantize-then-cuBLAS under autograd
(which keeps the bf16 weight alive for the backward, 2 bytes per weight for every layer until its
backward: the memory QLoRA exists to avoid; vramplan decodes W again in the backward instead).
vramplan's own base paths are timed too, so the per-shape choice (``FUSED_MAX_TOKENS``) can be
checked against the measurement: the fused Triton matmul only at token counts near that bound
(64 and 256 tokens; at 2,048 it took 20-500x as long), the dequant path everywhere. "vramplan QLoRALinear"
is the trainer's own call: the module, whose bf16 LoRA copies are cached for an optimizer step.

At 2,048 tokens a fwd+bwd is ~1 ms eager of which the GPU's share is far less, so the cases under
4,096 tokens are also timed from a CUDA graph (the GPU's time, which the TFLOP/s fraction uses).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from vramplan_kernels.nf4 import dequantize_nf4, quantize_nf4
from vramplan_kernels.qlora_linear import QLoRALinear, qlora_linear

LINEAR_SHAPES = {  # name: (in_features, out_features)
    "gemma4-e2b up 1536->6144": (1536, 6144),
    "gemma4-e4b up 2560->10240": (2560, 10240),
    "llama3.1-8b up 4096->14336": (4096, 14336),
    "llama3.1-8b down 14336->4096": (14336, 4096),
}
TOKENS = (2048, 8192)
#: token counts where the fused path is timed too (a short prompt, a decode batch): where reading
#: W would bound it (``FUSED_MAX_TOKENS`` and ``FUSED_MIN_WEIGHT`` are where auto uses it)
FUSED_TOKENS = (64, 256)
#: below this many tokens a fwd+bwd is short enough that launch gaps matter: timed from a CUDA graph too
GRAPH_BELOW_TOKENS = 4096
SMALL_SHAPES = ("gemma4-e2b up 1536->6144", "llama3.1-8b up 4096->14336")
RANK, ALPHA = 16, 32


def qlora_flops(tokens: int, in_features: int, out_features: int, rank: int) -> int:
    """Base forward and input gradient (2·M·K·N each) plus the six LoRA matmuls (forward 2, backward 4)."""
    return 4 * tokens * in_features * out_features + 6 * tokens * rank * (in_features + out_features)


def _peft_bitsandbytes(x, packed, state, a, b, scale, matmul_4bit):
    y = matmul_4bit(x, packed.t(), quant_state=state)
    return y + ((x.to(a.dtype) @ a.t() @ b.t()) * scale).to(y.dtype)


def _dequant_cublas(x, q, a, b, scale):
    y = x @ dequantize_nf4(q, x.dtype).t()
    return y + ((x.to(a.dtype) @ a.t() @ b.t()) * scale).to(y.dtype)


def _module(q, a, b, scale) -> QLoRALinear:
    module = QLoRALinear(q, None, RANK, RANK * scale, lora_dtype=a.dtype)
    with torch.no_grad():
        module.lora_A.weight.copy_(a)
        module.lora_B.weight.copy_(b)
    return module


def _variants(x, q, a, b, scale, grad_y, bnb_weight, matmul_4bit, with_fused):
    """One forward+backward per implementation; built in its own scope so each closure keeps its shape's tensors."""

    def step(forward, inputs=(x, a, b)):
        def run():
            return torch.autograd.grad(forward(), inputs, grad_y)
        return run

    module = _module(q, a, b, scale)
    variants = {
        "vramplan": step(lambda: qlora_linear(x, q, a, b, scale)),
        "vramplan QLoRALinear": step(lambda: module(x), (x, module.lora_A.weight, module.lora_B.weight)),
    }
    if with_fused:
        variants["vramplan fused"] = step(lambda: qlora_linear(x, q, a, b, scale, base_path="fused"))
    variants["vramplan dequant"] = step(lambda: qlora_linear(x, q, a, b, scale, base_path="dequant"))
    if bnb_weight is not None:
        packed, state = bnb_weight
        variants["bnb matmul_4bit + peft lora"] = step(
            lambda: _peft_bitsandbytes(x, packed, state, a, b, scale, matmul_4bit))
    variants["dequant + cublas (autograd)"] = step(lambda: _dequant_cublas(x, q, a, b, scale))
    return variants


def cases(device, shapes: dict[str, tuple[int, int]] | None = None, tokens=TOKENS,
          lora_dtype=torch.float32, fused_tokens=FUSED_TOKENS, small_shapes=SMALL_SHAPES) -> list[Case]:
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError:  # the GPU machine may not have it
        bitsandbytes = bnbf = None
    scale = ALPHA / RANK
    result = []
    for name, (k, n) in (shapes or LINEAR_SHAPES).items():
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        q = quantize_nf4(weight)
        a = (torch.randn(RANK, k, device=device, dtype=lora_dtype) * 0.02).requires_grad_()
        b = (torch.randn(n, RANK, device=device, dtype=lora_dtype) * 0.02).requires_grad_()
        bnb_weight = None
        if bnbf is not None:
            bnb_weight = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        token_counts = sorted({*tokens, *(fused_tokens if name in small_shapes else ())})
        for m in token_counts:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16).requires_grad_()
            grad_y = torch.randn(m, n, device=device, dtype=torch.bfloat16)
            variants = _variants(x, q, a, b, scale, grad_y, bnb_weight,
                                 bitsandbytes.matmul_4bit if bitsandbytes else None,
                                 with_fused=name in small_shapes and m in fused_tokens)
            result.append(Case(op="qlora_linear fwd+bwd", shape=f"{name}, {m} tokens, r{RANK}", variants=variants,
                               flops=qlora_flops(m, k, n, RANK), measure_peak_memory=True,
                               cuda_graph=m < GRAPH_BELOW_TOKENS,
                               notes=f"bf16 x, {str(lora_dtype).removeprefix('torch.')} LoRA, NF4 double quant"))
        del weight
    return result
