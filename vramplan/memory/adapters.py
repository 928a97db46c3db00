"""LoRA adapters: their parameters and gradients, the only trainable state."""

from __future__ import annotations

from vramplan.plan import EXPERT_TARGETS

#: bitsandbytes pages an 8-bit optimizer's states only for a parameter of at least this many elements
#: (``Optimizer8bit.get_state_buffer``: below ``1e5`` the states are ``zeros_like`` on the device, in torch's
#: pool). Rank-16 adapters of 1,024-6,144-wide layers (Qwen3-0.6B, 1.7B) all stay under it.
PAGED_MIN_NUMEL = 100_000


def lora_param_count(arch, rank: int, targets: tuple[str, ...]) -> int:
    """r·(d_in + d_out) for every targeted linear of every layer (A is r×d_in, B is d_out×r).

    Expert weights of MoE layers are fused 3-D tensors in transformers 5, not nn.Linear,
    so PEFT's module-name targets do not reach them; shared experts' linears they do. The
    experts' own matrices are adapted only when named (``EXPERT_TARGETS``): ``expert_lora_param_count``.
    """
    return sum(lora_tensor_numels(arch, rank, targets))


def expert_lora_param_count(arch, rank: int, targets: tuple[str, ...]) -> int:
    """One LoRA pair per routed expert and targeted fused matrix: gate_up [2I, H] takes r·(H + 2I),
    down [H, I] takes r·(I + H) (PEFT's ``lora_A`` [E·r, in] and ``lora_B`` [out, r·E])."""
    return sum(_expert_numels(arch, rank, targets))


def lora_tensor_numels(arch, rank: int, targets: tuple[str, ...]) -> list[int]:
    """Each adapter tensor's element count: A (r·d_in) and B (d_out·r) per targeted linear, then per
    expert layer the fused pairs PEFT makes (:func:`_expert_numels`)."""
    wanted = set(targets)
    linears = [n for layer in arch.layers for lin in layer.linears if lin.name in wanted
               for n in (rank * lin.d_in, lin.d_out * rank)]
    return linears + _expert_numels(arch, rank, targets)


def _expert_numels(arch, rank: int, targets: tuple[str, ...]) -> list[int]:
    """The routed experts' adapter tensors: A [E·r, in] and B [out, r·E] per targeted fused matrix and layer."""
    gate_up, down = EXPERT_TARGETS
    h = arch.hidden_size
    numels = []
    for layer in arch.layers:
        if layer.experts and layer.expert_params:
            inter, e = layer.expert_intermediate, layer.experts
            numels += [e * rank * h, 2 * inter * rank * e] * (gate_up in targets) + [e * rank * inter, h * rank * e] * (down in targets)
    return numels


def _language_numels(arch, plan) -> list[int]:
    """The language model's adapter tensors where ``plan`` trains it."""
    return lora_tensor_numels(arch, plan.lora_rank, plan.lora_targets) if "language" in plan.train_parts else []


def _tower_params(arch, plan) -> int:
    """The towers' adapters and the projector ``plan`` trains."""
    from vramplan.memory import towers

    return towers.tower_lora_params(arch, plan) + towers.projector_params(arch, plan)


def trainable_params(arch, plan) -> int:
    """Every trainable parameter of ``plan``: the language model's adapters where it trains them, the towers'
    adapters and the projector."""
    return sum(_language_numels(arch, plan)) + _tower_params(arch, plan)


def paged_params(arch, plan, flat: bool = False) -> int:
    """The trainable parameters whose 8-bit states bitsandbytes pages (``PAGED_MIN_NUMEL`` and up); ``flat``:
    the adapters stepped as one flat tensor, paged whole. Towers' adapters and the projector count as paged."""
    numels = _language_numels(arch, plan)
    paged = numels if flat else [n for n in numels if n >= PAGED_MIN_NUMEL]
    return sum(paged) + _tower_params(arch, plan)


def paged_tensors(arch, plan, flat: bool = False) -> int:
    """How many of the language model's adapter tensors bitsandbytes pages, each prefetched on its own; ``flat``:
    the one flat tensor. Towers' adapters are left out."""
    if flat:
        return 1
    return sum(1 for n in _language_numels(arch, plan) if n >= PAGED_MIN_NUMEL)


#: torch's caching allocator serves requests of at most 1 MiB from its small pool, in 2 MiB segments of their own
#: (c10/cuda/CUDACachingAllocator.cpp, ``kSmallSize``).
SMALL_POOL_MAX_BYTES = 2**20


def small_pool_gradient_bytes(arch, plan) -> int:
    """The language model's adapter gradients (in the adapters' dtype, ``plan.lora_dtype``) that torch's small pool
    serves (each at most 1 MiB): rank-16 adapters' all, rank-256 ones' few (A and B of 2,048-wide layers are 2 MiB in
    fp32)."""
    dtype_bytes = 4 if plan.lora_dtype == "fp32" else 2
    return sum(n * dtype_bytes for n in _language_numels(arch, plan) if n * dtype_bytes <= SMALL_POOL_MAX_BYTES)


def lora_param_bytes(trainable: int, dtype_bytes: int) -> int:
    """The adapter weights themselves (fp32 by PEFT's default, or bf16)."""
    return trainable * dtype_bytes


def lora_grad_bytes(trainable: int, dtype_bytes: int) -> int:
    """One gradient per adapter weight, in the weight's dtype; freed by zero_grad(set_to_none)."""
    return trainable * dtype_bytes


#: Bytes a trainable parameter's 16-bit compute copy takes (``vramplan_kernels.qlora_linear.LoRACopies``).
ADAPTER_COPY_BYTES = 2


def adapter_copy_bytes(trainable: int) -> int:
    """fp32 adapters' bf16 copies, made on a step's first forward and held to the next optimizer step
    (``LoRACopies``; a captured step's graph casts the adapters itself, vramplan/train/graphs.py, and keeps the copies
    for its replays). Measured on the H100: under graphs torch's allocated peak grows 10 bytes a trainable parameter
    (Llama-3.2-1B, rank 16 to 128 at 2,048 tokens: +0.79 GB for 78.9 M parameters; benchmarks/results/session11,
    session 9's campaign), where weights, gradients and 8-bit states account for 8. Eager steps hold them too (session
    24: the eager allocated peaks agree within 20 MB once these and the gradients' timing are priced)."""
    return ADAPTER_COPY_BYTES * trainable
