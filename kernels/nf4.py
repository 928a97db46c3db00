"""NF4 quantization, bit-compatible with bitsandbytes (blocksize 64, double-quantized absmax).

Layout (bitsandbytes 0.50, ``functional.quantize_4bit`` / its default backend): the weight is
flattened and cut into blocks of ``blocksize`` values; each block stores its absolute maximum
(fp32) and one 4-bit index per value into the 16-entry NF4 code book, two indices per byte,
the *first* value in the high nibble. A value is scaled by ``x * (1 / absmax)`` — except in a
trailing partial block, where bitsandbytes divides (``x / absmax``) and stores the absmax
clamped to 1e-38; both quirks are reproduced so packed bytes come out identical. The index is
the count of code-book midpoints strictly below the scaled value (``torch.bucketize``), so a
tie goes to the lower code. A padding nibble (odd numel) encodes 0.0, i.e. index 7.

Double quantization: ``offset = absmax.mean()``; ``absmax - offset`` is quantized to 8 bits
with bitsandbytes' signed dynamic code book in blocks of 256, one fp32 scale per block. (This
step is tiny and runs in PyTorch; bitsandbytes' CPU and CUDA kernels pick the 8-bit code in two
slightly different ways near ties, and each device follows its own.)
Decoding is ``code8[q] * scale + offset`` as two separate roundings (bitsandbytes runs them as
two kernels), so the Triton kernels are compiled with ``enable_fp_fusion=False``: an FMA would
round once and differ from bitsandbytes in the last bit.

The dequantize kernel is the hot path of QLoRA (every forward and backward of every linear):
it reads 4.13 bits per weight and writes 16, so it is bound by memory bandwidth, and at a 2B
model's weights (5 MB packed, ~10 µs) by the latency of its loads too. The word kernel reads
the packed bytes as int32 words and stores 16 bytes a thread, in one wave of programs that each
loop over their tiles with the next tile's loads in flight; the byte kernel takes any size
and alignment. The fused QLoRA matmul decodes tiles with the same absmax helpers.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from vramplan_kernels.dispatch import interpreting, sm_count, use_triton

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256)  # what the kernels' tiles hold; bitsandbytes also allows larger
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' fixed block size for the nested (double) quantization
_TINY = 1e-38  # bitsandbytes clamps an all-zero block's absmax to this before dividing


@functools.lru_cache(maxsize=None)
def nf4_code(device: str) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def nf4_midpoints(device: str) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def dynamic_code(device: str) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (``create_dynamic_map()``), 256 sorted values."""
    signed_exponent_bits, values = 7, []
    for i in range(signed_exponent_bits):
        fraction_items = 2**i + 1  # 7 bits besides the sign, all of them exponent bits
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += (10 ** (-(signed_exponent_bits - 1) + i) * means).tolist()
        values += (-(10 ** (-(signed_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


@dataclass
class NF4Tensor:
    """A frozen weight in NF4, in bitsandbytes' layout (so checkpoints and kernels interchange)."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 codes [n_blocks] when double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None  # float32 [ceil(n_blocks / 256)]
    absmax_offset: float | torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None  # float32 [256]

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def nbytes(self) -> int:
        tensors = [self.packed, self.absmax, self.absmax_scale, self.absmax_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> "NF4Tensor":
        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return replace(self, packed=move(self.packed), absmax=move(self.absmax), absmax_scale=move(self.absmax_scale),
                       absmax_offset=move(self.absmax_offset), absmax_code=move(self.absmax_code))

    def offset_tensor(self) -> torch.Tensor:
        """The offset as a 1-element fp32 tensor on the weight's device (read by the kernels without a sync)."""
        offset = self.absmax_offset
        if isinstance(offset, torch.Tensor):
            return offset.reshape(1).to(device=self.device, dtype=torch.float32)
        return torch.tensor([float(offset or 0.0)], dtype=torch.float32, device=self.device)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Tensor":
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_type {quant_state.quant_type!r}: only nf4 weights load as NF4Tensor")
        if quant_state.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {quant_state.blocksize}: NF4Tensor supports {BLOCKSIZES}")
        packed = packed.view(torch.uint8).reshape(-1)
        if not quant_state.nested:
            return cls(packed, quant_state.absmax.float(), torch.Size(quant_state.shape), quant_state.dtype,
                       quant_state.blocksize)
        if quant_state.state2.blocksize != ABSMAX_BLOCKSIZE:
            raise ValueError(f"nested blocksize {quant_state.state2.blocksize}: NF4Tensor expects {ABSMAX_BLOCKSIZE}")
        return cls(packed, quant_state.absmax, torch.Size(quant_state.shape), quant_state.dtype, quant_state.blocksize,
                   absmax_scale=quant_state.state2.absmax, absmax_offset=quant_state.offset,
                   absmax_code=quant_state.state2.code)

    def to_bnb(self):
        """(packed [ceil(numel/2), 1], QuantState) as ``bitsandbytes.functional.quantize_4bit`` returns them."""
        from bitsandbytes.functional import QuantState

        code = nf4_code(str(self.device))
        if not self.double_quant:
            state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type="nf4", dtype=self.dtype)
        else:
            nested = QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=ABSMAX_BLOCKSIZE,
                                dtype=torch.float32)
            state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                               quant_type="nf4", dtype=self.dtype, offset=self.offset_tensor().reshape(()),
                               state2=nested)
        return self.packed.reshape(-1, 1), state


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _absmax_of_blocks(absmax_ptr, scale_ptr, code8_ptr, offset_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """The fp32 absmax of each block index in ``block``, decoding the 8-bit codes when double-quantized."""
    stored, scale = _load_absmax(absmax_ptr, scale_ptr, block, mask, DOUBLE_QUANT)
    return _decode_absmax(stored, scale, code8_ptr, offset_ptr, mask, DOUBLE_QUANT)


@triton.jit
def _load_absmax(absmax_ptr, scale_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """(the stored absmax: 8-bit code or fp32, the fp32 scale of its 256-block group or 1): the
    loads from DRAM, apart so a kernel can issue them a tile ahead."""
    if DOUBLE_QUANT:
        stored = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + block // 256, mask=mask, other=0.0)
    else:
        stored = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        scale = stored
    return stored, scale


@triton.jit
def _decode_absmax(stored, scale, code8_ptr, offset_ptr, mask, DOUBLE_QUANT: tl.constexpr):
    if DOUBLE_QUANT:
        absmax = tl.load(code8_ptr + stored, mask=mask, other=0.0) * scale + tl.load(offset_ptr)
    else:
        absmax = stored
    return absmax


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, code4_ptr, out_ptr,
    n, n_bytes,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    # A program owns BLOCK_BYTES packed bytes = BLOCK_BYTES // (BLOCKSIZE // 2) whole blocks, laid out
    # [blocks, bytes of a block]: one absmax load (and decode) per block, contiguous byte loads.
    HALF: tl.constexpr = BLOCKSIZE // 2
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    pid = tl.program_id(0).to(tl.int64)
    block = pid * ROWS + tl.arange(0, ROWS)
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    absmax = _absmax_of_blocks(absmax_ptr, scale_ptr, code8_ptr, offset_ptr, block, block * BLOCKSIZE < n,
                               DOUBLE_QUANT)[:, None]
    high = tl.load(code4_ptr + (packed >> 4)) * absmax
    low = tl.load(code4_ptr + (packed & 0xF)) * absmax
    values = tl.reshape(tl.join(high, low), [ROWS * BLOCKSIZE])  # [rows, half, 2] row-major = flat order
    index = pid * (ROWS * BLOCKSIZE) + tl.arange(0, ROWS * BLOCKSIZE)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n)


@triton.jit
def _nf4_quantize_kernel(
    x_ptr, midpoints_ptr, packed_ptr, absmax_ptr,
    n, n_blocks,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    block = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + index, mask=index < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    # typed: Triton 3.6 reads a bare 1e-38 (below fp32's normal range) as fp64
    clamped = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    partial = (block + 1) * BLOCKSIZE > n  # bitsandbytes divides in the trailing partial block
    scaled_full = x * tl.math.div_rn(tl.full(clamped.shape, 1.0, tl.float32), clamped)[:, None]
    scaled_tail = tl.math.div_rn(x, tl.broadcast_to(clamped[:, None], x.shape))
    scaled = tl.where(partial[:, None], scaled_tail, scaled_full)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        code += (scaled > tl.load(midpoints_ptr + i)).to(tl.int32)
    high, low = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM * BLOCKSIZE // 2, 2]))
    byte = pid * (BLOCKS_PER_PROGRAM * BLOCKSIZE // 2) + tl.arange(0, BLOCKS_PER_PROGRAM * BLOCKSIZE // 2)
    tl.store(packed_ptr + byte, ((high << 4) | low).to(tl.uint8), mask=byte < (n + 1) // 2)
    tl.store(absmax_ptr + block, tl.where(partial, clamped, absmax), mask=block < n_blocks)


@triton.jit(do_not_specialize=["tiles_per_program"])
def _nf4_dequantize_words_kernel(
    words_ptr, absmax_ptr, scale_ptr, code8_ptr, offset_ptr, code4_ptr, out_ptr,
    n, n_words, tiles_per_program,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, WORDS: tl.constexpr, PREFETCH_ABSMAX: tl.constexpr,
):
    """The packed bytes read as int32 words, 8 values each, laid out [words, 8]: every thread
    stores its words' 8 bf16 values as one 16-byte store (the byte kernel's [blocks, bytes, 2]
    join compiles to 2-byte stores on sm_90). A program decodes ``tiles_per_program``
    consecutive tiles of WORDS words, so a small weight runs as one wave of programs instead of
    2-3 waves whose last one idles most of the GPU; it loads its next tile before decoding the
    current one, so two tiles' words are in flight (the byte kernel keeps ~16 KB of loads in
    flight an SM; at ~1 µs of loaded DRAM latency 3 TB/s asks for ~23 KB: a small decode is bound
    by latency as much as by bytes, a reading that benchmarks/kernel_cases/nf4.py's sweep checks)."""
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, 8)
    # bit offset of a little-endian word's 8 values: byte lane // 2, the first value of a byte in its high nibble
    shift = (lane // 2) * 8 + (1 - lane % 2) * 4
    start = pid * tiles_per_program * WORDS
    end = tl.minimum(start + tiles_per_program * WORDS, n_words)  # this program's words stop here
    word = start + tl.arange(0, WORDS)
    packed = tl.load(words_ptr + word, mask=word < end, other=0)
    stored, scale = _load_absmax(absmax_ptr, scale_ptr, (word * 8) // BLOCKSIZE, word < end, DOUBLE_QUANT)
    for _ in range(tiles_per_program):
        # the next tile's words (and absmax) are loaded before this one is decoded: two tiles'
        # loads in flight a program
        next_word = word + WORDS
        next_packed = tl.load(words_ptr + next_word, mask=next_word < end, other=0)
        if PREFETCH_ABSMAX:
            next_stored, next_scale = _load_absmax(absmax_ptr, scale_ptr, (next_word * 8) // BLOCKSIZE,
                                                   next_word < end, DOUBLE_QUANT)
        else:  # 32 registers a thread instead of 40: 16 programs of 4 warps an SM instead of 12
            stored, scale = _load_absmax(absmax_ptr, scale_ptr, (word * 8) // BLOCKSIZE, word < end, DOUBLE_QUANT)
            next_stored, next_scale = stored, scale
        nibble = (packed[:, None] >> shift[None, :]) & 0xF
        absmax = _decode_absmax(stored, scale, code8_ptr, offset_ptr, word < end, DOUBLE_QUANT)
        values = tl.load(code4_ptr + nibble) * absmax[:, None]
        index = word[:, None] * 8 + lane[None, :]
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n)
        word, packed, stored, scale = next_word, next_packed, next_stored, next_scale


@dataclass(frozen=True)
class DequantConfig:
    """How a decode is launched. ``words`` > 0: the word kernel with ``words`` int32 words per tile
    and, with ``programs_per_sm`` > 0, at most that many programs per SM, each looping over its
    share of tiles (0: one tile per program). ``words`` == 0: the byte kernel with
    ``block_bytes`` packed bytes per program (any size, any alignment)."""

    words: int = 256
    num_warps: int = 4
    programs_per_sm: int = 12
    block_bytes: int = 1024
    prefetch_absmax: bool = True


BYTE_KERNEL = DequantConfig(words=0, programs_per_sm=0)
#: The word kernel's launch for every weight (tests; the trainer picks per size, below).
WORD_KERNEL_BY_DEFAULT = False
#: Small weights decode with the word kernel: 256-word tiles on 4 warps, at most 16 programs an SM
#: (32 registers a thread without the absmax prefetch), one wave. On the H100 in CUDA graphs
#: (benchmarks/results/session9/call1-kernels.md) Gemma-4-E2B's MLP weights (4.7 MB packed) took 10.2
#: against the byte kernel's 11.2 µs, its q (1.5 MB) 4.5 against 4.7 and its k/v (0.2 MB) 2.5 against 2.7,
#: while from Llama-3.1-8B's q (8.4 MB) up the byte kernel was as fast or faster (benchmarks/results/kernels.md).
SMALL_WEIGHT_LAUNCH = DequantConfig(programs_per_sm=16, prefetch_absmax=False)
SMALL_WEIGHT_MAX_BYTES = 6 * 2**20


def _dequant_config(n_bytes: int) -> DequantConfig:
    """The launch for a weight of ``n_bytes`` packed bytes.

    Fixed, not autotuned per call: the autotuner's per-launch bookkeeping (argument dicts, a key
    with every tensor's dtype as a string) cost ~35 µs of host time per decode on the reference
    GPU, ~340 decodes a step. The byte kernel autotuned on the H100 over 1024/2048/4096 bytes ×
    4/8 warps was within 5% across them. The word kernel stores 16 bytes a thread and runs as one
    wave, which pays where a weight is too small for the byte kernel's waves to fill the GPU
    (``SMALL_WEIGHT_LAUNCH``). ``benchmarks/kernel_cases/nf4.py`` times the alternatives beside it.
    """
    if n_bytes < 4096:  # a few tiles: the byte kernel's single launch is as good
        return BYTE_KERNEL
    if WORD_KERNEL_BY_DEFAULT:
        return DequantConfig()
    return SMALL_WEIGHT_LAUNCH if n_bytes <= SMALL_WEIGHT_MAX_BYTES else BYTE_KERNEL


def programs_that_fit(registers: int, num_warps: int, device: torch.device | None = None) -> int:
    """How many programs of ``num_warps`` warps at ``registers`` registers a thread an SM holds at
    once (0 when unknown): registers are handed out per warp in units of 256, and an SM of
    compute capability 8.0-9.0 holds 64K registers, 64 warps and 32 programs."""
    if not registers:
        return 0
    total, warps = 65536, 64
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total = getattr(props, "regs_per_multiprocessor", total) or total
        warps = getattr(props, "max_threads_per_multi_processor", warps * 32) // 32 or warps
    per_warp = -(-registers * 32 // 256) * 256
    return max(1, min(total // (per_warp * num_warps), warps // num_warps, 32))


class _DequantLaunch:
    """Everything ``_dequantize_triton`` passes to the kernel besides ``out``, computed once per weight.

    Rebuilding these per call (the fp32 code book, the offset as a device tensor, the grid, the
    device string) cost several host ops on every decode. An NF4Tensor's fields never change
    in place (``.to`` returns a new one), so the plan lives as long as the tensor.

    After the first launch through Triton's JIT the compiled kernel is launched directly: the
    JIT's per-call binding, specialization and cache-key work cost about 20 µs of host time per
    decode on the reference GPU (~340 decodes per step). That is sound because every argument
    but ``out`` is the same on each call (same tensors, same sizes), so the kernel the JIT would
    pick differs only with ``out``'s dtype and 16-byte alignment, the key of ``compiled``.
    """

    __slots__ = ("tensors", "n", "n_bytes", "config", "sms", "kernel", "tensors_in", "inputs", "grid", "constexprs",
                 "constexpr_values", "head", "tail", "compiled")

    def __init__(self, q: "NF4Tensor", config: DequantConfig | None = None):
        if q.double_quant:
            scale, code8, offset = q.absmax_scale, q.absmax_code.float(), q.offset_tensor()
        else:
            scale = code8 = offset = q.absmax  # unread placeholders
        #: the kernels' inputs in byte form (the fused QLoRA matmul reads them too)
        self.tensors = (q.packed, q.absmax, scale, code8, offset, nf4_code(str(q.device)))
        self.n, self.n_bytes = q.numel(), q.packed.numel()
        config = config or _dequant_config(self.n_bytes)
        if config.words and (self.n_bytes % 4 or q.packed.data_ptr() % 16 or q.packed.stride(-1) != 1):
            config = BYTE_KERNEL  # the words view needs whole, aligned int32 words
        self.sms = sm_count(q.device)
        self._use(config, q.blocksize, q.double_quant)
        self.compiled: dict[tuple[torch.dtype, bool], object] = {}

    def _use(self, config: DequantConfig, blocksize: int, double_quant: bool) -> None:
        self.config = config
        if config.words:
            self.kernel = _nf4_dequantize_words_kernel
            self.tensors_in = (self.tensors[0].view(torch.int32), *self.tensors[1:])
            self.constexprs = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, WORDS=config.words,
                                   PREFETCH_ABSMAX=config.prefetch_absmax)
        else:
            self.kernel = _nf4_dequantize_kernel
            self.tensors_in = self.tensors
            self.constexprs = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, BLOCK_BYTES=config.block_bytes)
        self.constexpr_values = tuple(self.constexprs.values())  # in the kernels' signature order
        self.constexprs.update(num_warps=config.num_warps, enable_fp_fusion=False)
        self._spread(config.programs_per_sm)

    def _spread(self, programs_per_sm: int) -> None:
        """The grid and the scalar arguments for at most ``programs_per_sm`` word-kernel programs
        an SM (0: one tile each)."""
        if self.config.words:
            n_words = self.n_bytes // 4
            tiles = triton.cdiv(n_words, self.config.words)
            per_program = triton.cdiv(tiles, self.sms * programs_per_sm) if programs_per_sm else 1
            self.grid = (triton.cdiv(tiles, per_program), 1, 1)
            scalars = (n_words, per_program)
        else:
            self.grid = (triton.cdiv(self.n_bytes, self.config.block_bytes), 1, 1)
            scalars = (self.n_bytes,)
        self.inputs = (*self.tensors_in, self.n, *scalars)  # ``out`` goes between the tensors and n
        self.head, self.tail = self.inputs[:6], (*self.inputs[6:], *self.constexpr_values)  # around ``out``

    def args(self, out: torch.Tensor) -> tuple:
        """The kernel's positional arguments for a decode into ``out``, constexprs last."""
        return (*self.inputs[:6], out, *self.inputs[6:], *self.constexpr_values)

    def __call__(self, out: torch.Tensor) -> None:
        key = (out.dtype, out.data_ptr() % 16 == 0)
        launch = self.compiled.get(key)
        if launch is None:
            self.compiled[key] = self._first_launch(self.args(out))
        else:
            launch(*self.head, out, *self.tail)

    def _jit(self, *args) -> object:
        return self.kernel[self.grid](*args[:-len(self.constexpr_values)], **self.constexprs)

    def _first_launch(self, args: tuple):
        """Launch through the JIT (compiling if needed); return the launcher for the next calls:
        the compiled kernel's own (Triton 3.6 to 3.9 take every argument there, constexprs
        included, as the JIT passes them), or the JIT where this Triton's refuses the arguments."""
        try:
            kernel = self._jit(*args)
        except Exception as err:  # noqa: BLE001 - a Triton that cannot build the word kernel
            if not self.config.words:
                raise
            warnings.warn(f"NF4 word kernel did not build on this Triton ({type(err).__name__}: {err}); "
                          "decoding with the byte kernel", RuntimeWarning, stacklevel=2)
            self._use(BYTE_KERNEL, self.constexprs["BLOCKSIZE"], self.constexprs["DOUBLE_QUANT"])
            return self._first_launch(self.args(args[6]))
        # One wave needs the programs an SM to fit at once: if this Triton's build of the kernel
        # takes more registers than ``DequantConfig`` assumed, spread the tiles over fewer programs
        # (``tiles_per_program`` is not specialized on, so the compiled kernel serves any value).
        wanted = self.config.programs_per_sm if self.config.words else 0
        fit = programs_that_fit(getattr(kernel, "n_regs", 0), self.config.num_warps, args[0].device)
        if wanted and fit and fit < wanted:
            self._spread(fit)
            args = self.args(args[6])
        try:
            runner = kernel[self.grid]
            runner(*args)  # decodes the same values again, once: proves the arguments bind
        except Exception:  # noqa: BLE001 - any Triton whose compiled-kernel launcher differs
            return self._jit
        return runner


def _dequant_launch(q: "NF4Tensor") -> _DequantLaunch:
    launch = q.__dict__.get("_launch")
    if launch is None:
        launch = q.__dict__["_launch"] = _DequantLaunch(q)
    return launch


def _decode(launch: _DequantLaunch, out: torch.Tensor) -> torch.Tensor:
    if interpreting() and out.dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: decode to
        # fp32 there and let torch round, so the interpreter checks everything else bit for bit.
        staging = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        launch(staging)
        return out.copy_(staging)
    launch(out)
    return out


def _dequantize_triton(q: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    return _decode(_dequant_launch(q), out)


def _quantize_triton(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = weight.contiguous().reshape(-1)
    n = x.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    per_program = 4 if interpreting() else 16
    _nf4_quantize_kernel[(triton.cdiv(n_blocks, per_program),)](
        x, nf4_midpoints(str(x.device)), packed, absmax, n, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, enable_fp_fusion=False)
    return packed, absmax


# --------------------------------------------------------------------------------------------
# PyTorch reference (the same arithmetic, step by step)
# --------------------------------------------------------------------------------------------


def _quantize_reference(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = weight.reshape(-1).float()
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    clamped = absmax.clamp(min=_TINY)
    scaled = blocks * (1.0 / clamped)[:, None]
    if n % blocksize:
        absmax[-1] = clamped[-1]
        scaled[-1] = blocks[-1] / clamped[-1]
    scaled = scaled.clamp(-1, 1).reshape(-1)[: n + n % 2]
    codes = torch.bucketize(scaled, nf4_midpoints(str(x.device))).to(torch.uint8)
    if n % 2:
        codes[-1] = 7  # bitsandbytes pads with 0.0, whose index is 7
    return (codes[0::2] << 4) | codes[1::2], absmax


def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization of the absmax, as bitsandbytes' ``quantize_blockwise(absmax - mean, blocksize=256)``."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // ABSMAX_BLOCKSIZE)
    blocks = torch.nn.functional.pad(centred, (0, n_blocks * ABSMAX_BLOCKSIZE - n)).view(n_blocks, ABSMAX_BLOCKSIZE)
    scale = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / scale.clamp(min=_TINY))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    code = dynamic_code(str(absmax.device))
    midpoints = (code[:-1] + code[1:]) / 2
    if absmax.is_cuda:  # bitsandbytes' CUDA kernel: a search for the nearest code
        codes = torch.bucketize(scaled, midpoints)
    else:  # its CPU kernel: the nearest code of the closest point on a 65,536-step grid over [-1, 1]
        grid = torch.arange(65536, dtype=torch.float64, device=absmax.device) / 65535 * 2 - 1
        lookup = torch.bucketize(grid.float(), midpoints)
        codes = lookup[(((scaled + 1) * 0.5) * 65535 + 0.5).long()]
    return codes.to(torch.uint8), scale, offset, code


def _decoded_absmax(q: NF4Tensor) -> torch.Tensor:
    if not q.double_quant:
        return q.absmax.float()
    n_blocks = q.absmax.numel()
    scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[:n_blocks]
    return q.absmax_code.float()[q.absmax.long()] * scale + q.offset_tensor()


def _dequantize_reference(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = q.numel()
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = _decoded_absmax(q).repeat_interleave(q.blocksize)[:n]
    return (nf4_code(str(q.device))[codes] * absmax).to(dtype).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor, blocksize: int) -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantizes fp32/fp16/bf16 weights, not {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize}: use one of {BLOCKSIZES} (QLoRA uses 64)")


def _nf4_tensor(weight, packed, absmax, blocksize, double_quant) -> NF4Tensor:
    if not double_quant:
        return NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    codes, scale, offset, code = _quantize_absmax(absmax)
    return NF4Tensor(packed, codes, weight.shape, weight.dtype, blocksize, absmax_scale=scale, absmax_offset=offset,
                     absmax_code=code)


def quantize_nf4_reference(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    _check_weight(weight, blocksize)
    packed, absmax = _quantize_reference(weight.detach(), blocksize)
    return _nf4_tensor(weight, packed, absmax, blocksize, double_quant)


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _dequantize_reference(q, dtype or q.dtype)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``weight`` to NF4 exactly as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``."""
    _check_weight(weight, blocksize)
    if not use_triton(weight):
        return quantize_nf4_reference(weight, blocksize, double_quant)
    packed, absmax = _quantize_triton(weight.detach(), blocksize)
    return _nf4_tensor(weight, packed, absmax, blocksize, double_quant)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight back in ``dtype`` (default: its original dtype); ``out`` reuses a buffer of ``q.shape``."""
    dtype = out.dtype if out is not None else (dtype or q.dtype)
    if not use_triton(q.packed):
        result = _dequantize_reference(q, dtype)
        return out.copy_(result) if out is not None else result
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return _dequantize_triton(q, out)


def dequantize_nf4_with(q: "NF4Tensor", out: torch.Tensor, config: DequantConfig) -> torch.Tensor:
    """Decode into ``out`` with an explicit launch ``config`` (benchmarks compare launches with
    it); the launch plan is kept per config on the weight, as ``dequantize_nf4`` keeps its own."""
    plans = q.__dict__.setdefault("_launches", {})
    launch = plans.get(config)
    if launch is None:
        launch = plans[config] = _DequantLaunch(q, config)
    return _decode(launch, out)
