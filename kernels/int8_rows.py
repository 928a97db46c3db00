"""A frozen [rows, cols] matrix stored as int8 with one absmax scale per row (LLM.int8's row-wise absmax).

Meant for the token embedding / LM head: 128,256 x 2,048 is 0.525 GB in bf16 and 0.263 GB here;
Gemma 4's 262,144 x 5,376 is 2.8 GB and 1.4 GB. One scale per *row* (per vocabulary entry) because
both uses touch rows: the embedding lookup dequantizes exactly the rows it gathers, and the
fused loss dequantizes a slice of rows at a time into a small temporary, never the whole table.

Row ``i`` is ``data[i] * scale[i]`` with ``scale = absmax / 127``: the row's largest magnitude
is exact, every other value is off by at most ``scale / 2``. Dequantizing is one elementwise
multiply (int8 x fp32 written into the compute dtype), so no Triton kernel pays for itself here.
"""

from __future__ import annotations

import torch

DEQUANT_SLICE_BYTES = 32 * 1024**2
"""Budget of one dequantized slice of rows (the fused loss's temporary): 8,192 rows of a 2,048-wide
head in bf16, 3,072 of a 5,376-wide one. Large enough that each slice's matmul fills the GPU."""

_QMAX = 127


def slice_rows(cols: int, dtype: torch.dtype) -> int:
    """Rows per dequantized slice so that one slice fits DEQUANT_SLICE_BYTES (a multiple of 128 once ≥ 256)."""
    rows = max(1, DEQUANT_SLICE_BYTES // (cols * torch.empty((), dtype=dtype).element_size()))
    if rows >= 256:
        rows -= rows % 128
    return rows


class Int8Rows:
    """int8 ``data`` [rows, cols] and fp32 ``scale`` [rows]; ``dtype`` is what dequantizing produces."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        if data.dtype != torch.int8 or data.dim() != 2 or scale.shape != data.shape[:1]:
            raise ValueError(f"Int8Rows needs int8 data [rows, cols] and a scale per row; got {data.dtype} "
                             f"{tuple(data.shape)} and {tuple(scale.shape)}")
        self.data, self.scale, self.dtype = data, scale, dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> "Int8Rows":
        """Row-wise absmax quantization of ``weight``, a slice of rows at a time: quantizing a 2.8 GB
        bf16 table through one fp32 copy would need 5.6 GB more for a moment."""
        weight = weight.detach()
        data = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        step = slice_rows(weight.shape[1], torch.float32)
        for start in range(0, weight.shape[0], step):
            rows = weight[start:start + step].to(torch.float32, copy=True)  # never divide the caller's weight in place
            absmax = rows.abs().amax(dim=1)
            scale[start:start + step] = absmax / _QMAX
            rows.div_(scale[start:start + step].clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1))
            data[start:start + step] = rows.round_().clamp_(-_QMAX, _QMAX)
        return cls(data, scale, dtype or weight.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, start: int = 0, end: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:end`` in ``self.dtype`` (into ``out`` when given: the fused loss reuses one buffer)."""
        end = self.shape[0] if end is None else end
        if out is None:
            out = torch.empty((end - start, self.shape[1]), dtype=self.dtype, device=self.device)
        return torch.mul(self.data[start:end], self.scale[start:end].unsqueeze(1), out=out)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` (any shape), dequantized: an embedding lookup that reads ids.numel() rows."""
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), self.shape[1]), dtype=self.dtype, device=self.device)
        torch.mul(self.data.index_select(0, flat), self.scale.index_select(0, flat).unsqueeze(1), out=out)
        return out.view(*ids.shape, self.shape[1])
