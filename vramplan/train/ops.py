"""Every kernel the trainer calls, imported through this one module.

The ops live in ``vramplan_kernels``: Triton kernels on CUDA tensors, their PyTorch references
on the CPU (see ``vramplan_kernels.dispatch``), so the same trainer runs in CI and on a GPU.
"""

from vramplan_kernels.glu import GatedMLP
from vramplan_kernels.int8_rows import Int8Rows
from vramplan_kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from vramplan_kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from vramplan_kernels.qlora_linear import QLoRALinear, flat_adapters
from vramplan_kernels.rmsnorm import RMSNorm
from vramplan_kernels.rope import apply_rope, apply_rope_one, rope_applies

__all__ = ["GatedMLP", "Int8Rows", "NF4Tensor", "QLoRALinear", "RMSNorm", "apply_rope", "apply_rope_one", "flat_adapters",
           "dequantize_nf4",
           "default_chunk_size", "linear_cross_entropy", "quantize_nf4", "rope_applies"]
