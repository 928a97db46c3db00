"""Bytes of the frozen base weights, by storage format."""

from __future__ import annotations

NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
DQ_BLOCK = 256  # double quantization: one fp32 scale per 256 absmax values


def nf4_weight_bytes(params: int, double_quant: bool = True) -> int:
    """NF4 (bitsandbytes, blocksize 64): 4 bits per weight plus the block absmax.

    Without double quantization each absmax is fp32 (4 bytes / 64 weights, ≈4.5 bits per
    weight); with it the absmax is stored as 8 bits with an fp32 scale (and offset) per
    256 blocks (≈4.127 bits per weight).
    """
    blocks = -(-params // NF4_BLOCK)
    if double_quant:
        absmax = blocks + (-(-blocks // DQ_BLOCK)) * 4 + 4
    else:
        absmax = blocks * 4
    return params // 2 + params % 2 + absmax


def int8_weight_bytes(params: int, rows: int) -> int:
    """LLM.int8 (bitsandbytes): one byte per weight plus an fp32 scale per output row (SCB)."""
    return params + 4 * rows


def dense_bytes(params: int, dtype_bytes: int) -> int:
    """Plain tensors: embeddings, norms, an untied LM head, bf16 base weights."""
    return params * dtype_bytes


def linear_weight_bytes(arch, quant: str, double_quant: bool) -> int:
    """All decoder linears (not the LM head) stored as ``quant``: what the quantizer converts."""
    if quant == "nf4":
        return sum(nf4_weight_bytes(lin.params, double_quant) for layer in arch.layers for lin in layer.linears) + sum(
            nf4_weight_bytes(lin.params, double_quant) for lin in arch.extra_linears)
    if quant == "int8":
        rows = sum(lin.d_out for layer in arch.layers for lin in layer.linears) + sum(lin.d_out for lin in arch.extra_linears)
        return int8_weight_bytes(arch.linear_params, rows)
    return dense_bytes(arch.linear_params, 2)


#: Up to this many tokens a NF4 matmul on a weight of at least this many elements decodes tiles in
#: registers and needs no buffer; they must equal ``vramplan_kernels.qlora_linear``'s (a test checks; the
#: planner does not import torch).
FUSED_MAX_TOKENS = 64
FUSED_MIN_WEIGHT = 1 << 24


def dequant_buffer_bytes(arch, quant: str, tokens: int) -> int:
    """vramplan's NF4 linears dequantize into one reused bf16 buffer, grown to the largest quantized
    weight that takes that path (kernels/qlora_linear.py ``_dequant_buffer``; up to ``FUSED_MAX_TOKENS``
    tokens, weights of ``FUSED_MIN_WEIGHT`` elements or more are fused instead) and kept from the first
    step on: one weight's bf16 bytes in every phase of a step."""
    if quant != "nf4":
        return 0
    sizes = [lin.params for layer in arch.layers for lin in layer.linears]
    if tokens <= FUSED_MAX_TOKENS:
        sizes = [params for params in sizes if params < FUSED_MIN_WEIGHT]
    return 2 * max(sizes, default=0)


def expert_matrix_params(layer, hidden_size: int) -> int:
    """One MoE layer's routed expert matrices (gate, up and down of every expert); the rest of
    ``layer.expert_params`` is the router."""
    return layer.experts * 3 * hidden_size * layer.expert_intermediate


def nf4_expert_bytes(arch, double_quant: bool) -> int:
    """The routed experts as vramplan's trainer holds them under NF4 (vramplan/train/experts.py):
    each expert's gate_up [2I, H] and down [H, I] quantized on its own, the router left bf16."""
    total = 0
    for layer in arch.layers:
        if layer.expert_params:
            h, inter = arch.hidden_size, layer.expert_intermediate
            matrices = layer.experts * (nf4_weight_bytes(2 * inter * h, double_quant) + nf4_weight_bytes(h * inter, double_quant))
            total += matrices + dense_bytes(layer.expert_params - expert_matrix_params(layer, h), 2)
    return total


def expert_dequant_buffer_bytes(arch) -> int:
    """The bf16 pair of buffers every routed expert is decoded into in turn, shared by all layers."""
    return 2 * max((expert_matrix_params(layer, arch.hidden_size) // max(layer.experts, 1) for layer in arch.layers),
                   default=0)


def head_weight_bytes(params: int, vocab: int, head_quant: str) -> int:
    """The token embedding / LM head on the GPU: bf16, or int8 rows with one fp32 absmax scale per
    vocabulary row (kernels/int8_rows.py), which is ``int8_weight_bytes`` with one row per token."""
    return int8_weight_bytes(params, vocab) if head_quant == "int8" else dense_bytes(params, 2)
