"""Module surgery on a loaded transformers model: each patch is one small function.

``apply_kernel_patches`` applies them in one visible place. Kernel patches (RMSNorm, RoPE, SwiGLU/GeGLU
from ``vramplan.train.ops``) are added to ``KERNEL_PATCHES`` as ``(module class name, function)``
pairs; each function takes a module and returns a replacement (or patches it in place and
returns it), so a new kernel is one entry, not a new walk over the model.

What a patch must never do: change the forward loop of the decoder. Gemma 4's shared-KV
layers read K/V that earlier layers hand over through ``shared_kv_states``; replacing the
attention modules or the layer loop is how the upstream KV-sharing bug came back (tests in
tests/test_train_gemma4.py compare cached and uncached logits). Heads wider than 256 change only
the function transformers looks up for ``sdpa`` (``vramplan.train.attention.install``), after the
module has chosen its K/V.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from vramplan.train import attention, ops, switches
from vramplan.train.experts import NF4Experts, is_fused_experts

_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm",
              "Gemma2RMSNorm", "Gemma3RMSNorm", "Gemma4RMSNorm")
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP", "Gemma3MLP", "Gemma4TextMLP")

#: (class name of a transformers module, function returning its replacement): the fused Triton
#: RMSNorm (weights shared, not copied) and the gated MLP whose activation never stores its
#: intermediate product twice. The attention modules and the decoder loop are deliberately not replaced.
KERNEL_PATCHES: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
    *((name, ops.RMSNorm.from_hf) for name in _RMS_NORMS),
    *((name, ops.GatedMLP.from_hf) for name in _GATED_MLPS),
]


#: How a transformers rotary embedding builds cos/sin from the angles: both halves the same, so the
#: kernel may read one (``same_halves``). Looked for in the modeling module's source, once, at patch time.
_DUPLICATED_HALVES_SOURCE = "torch.cat((freqs, freqs), dim=-1)"


def builds_duplicated_halves(module) -> bool:
    """Whether a modeling module's rotary embedding returns cos/sin as ``cat(f, f)``."""
    try:
        return _DUPLICATED_HALVES_SOURCE in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def rope_pair(original: Callable, same_halves: bool = False) -> Callable:
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (Llama, Mistral, Qwen, Gemma 3) as one
    Triton launch each way instead of ~14 ops (rotate_half's slices, neg, cat, two multiplies and an
    add per tensor); the original where the kernel does not run (CPU tensors, other layouts)."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if ops.rope_applies(q, cos, unsqueeze_dim) and k.dim() == 4 and k.stride(-1) == 1 and k.shape[-1] == q.shape[-1]:
            return ops.apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, same_halves=same_halves)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.vramplan_original = original
    return apply_rotary_pos_emb


def rope_single(original: Callable, same_halves: bool = False) -> Callable:
    """Gemma 4's ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1)``, one tensor per call (its
    shared-KV layers rotate only q). Its full-attention layers' proportional RoPE has cos 1 and
    sin 0 beyond the rotated pairs, which the kernel computes exactly (x·1 − y·0 = x)."""

    def apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1):
        if ops.rope_applies(x, cos, unsqueeze_dim):
            return ops.apply_rope_one(x, cos, sin, unsqueeze_dim=unsqueeze_dim, same_halves=same_halves)
        return original(x, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.vramplan_original = original
    return apply_rotary_pos_emb


#: transformers modeling module -> the maker of its Triton ``apply_rotary_pos_emb``. The attention
#: modules call that function by its module-global name, so the replacement is set on the module
#: (as Liger does): process-wide, but it runs the original on anything but CUDA tensors.
ROPE_PATCHES: dict[str, Callable[[Callable], Callable]] = {
    **{f"transformers.models.{family}.modeling_{family}": rope_pair
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3")},
    "transformers.models.gemma4.modeling_gemma4": rope_single,
}
#: Where the patch is applied whatever the plan. Gemma 4 is patched only for captured steps (``switches.gemma4_rope_fused``):
#: eager it measured slower (H100, E2B at 2,048 tokens: 4,820 tok/s patched, 5,254 not: it rotates q and k in
#: separate calls, and its full layers' partial rotary runs padded over the whole head), under CUDA graphs 1.05x
#: faster (switches.py); Llama-3.2-1B gains 17% eager (8,426 -> 9,841).
GEMMA4_ROPE_MODULE = "transformers.models.gemma4.modeling_gemma4"
ROPE_PATCHED_BY_DEFAULT = tuple(name for name in ROPE_PATCHES if name != GEMMA4_ROPE_MODULE)


def patch_rope(model: nn.Module, modules=tuple(ROPE_PATCHES)) -> list[str]:
    """Point the modeling modules of ``model``'s classes (among ``modules``) at the Triton RoPE;
    return the modules patched now."""
    patched = []
    for name in sorted({type(m).__module__ for m in model.modules()} & set(modules)):
        module = importlib.import_module(name)
        current = module.apply_rotary_pos_emb
        if not hasattr(current, "vramplan_original"):
            module.apply_rotary_pos_emb = ROPE_PATCHES[name](current, builds_duplicated_halves(module))
            patched.append(name)
    return patched


def replace_modules(root: nn.Module, choose: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace every submodule for which ``choose(path, module)`` returns a module; return the paths."""
    replaced = []
    for path, module in list(root.named_modules()):
        new = choose(path, module)
        if new is None or new is module:
            continue
        parent_path, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent_path) if parent_path else root, name, new)
        replaced.append(path)
    return replaced


def is_lora_target(path: str, module: nn.Module, targets: tuple[str, ...]) -> bool:
    """A linear whose own name (the last part of its path) the plan's LoRA targets list."""
    return isinstance(module, nn.Linear) and path.rpartition(".")[2] in targets


def add_lora(layer: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, quant: str, double_quant: bool,
             lora_dtype: torch.dtype, storage=None) -> list[str]:
    """Swap the target linears of one decoder layer for QLoRALinear (quantized where the layer lives);
    ``storage(shape)`` gives the adapters' tensors (``optim.AdapterArena.take``) when set."""

    def choose(path: str, module: nn.Module):
        if is_lora_target(path, module, targets):
            return ops.QLoRALinear.from_linear(module, rank=rank, alpha=alpha, quant=quant, double_quant=double_quant,
                                               lora_dtype=lora_dtype, storage=storage)
        return None

    return replace_modules(layer, choose)


def quantize_experts(layer: nn.Module, device: torch.device, double_quant: bool = True) -> list[str]:
    """Swap each fused experts module of one decoder layer for ``NF4Experts`` quantized on ``device``
    (frozen, not adapted); return the replaced paths. Called before the layer moves to ``device``."""
    return replace_modules(layer, lambda path, module: NF4Experts.from_hf(module, device, double_quant)
                           if is_fused_experts(module) else None)


def add_expert_lora(layer: nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
                    lora_dtype: torch.dtype) -> list[str]:
    """LoRA on the NF4 routed experts' fused matrices the targets name (``EXPERT_TARGETS``); return
    ``<experts path>.<parameter>`` for each adapted one. Fused bf16 experts are refused by ``Plan``."""
    adapted = []
    for path, module in layer.named_modules():
        if isinstance(module, NF4Experts):
            adapted += [f"{path}.{name}" for name in module.add_lora(targets, rank, alpha, lora_dtype)]
    return adapted


def _attention_attribute_over(model: nn.Module, name: str, bound: int) -> bool:
    """Whether some attention module of ``model`` has an int ``name`` above ``bound`` (read off the modules: a
    heterogeneous config, as Gemma 4's is in newer transformers, refuses a global ``head_dim``)."""
    return any(isinstance(getattr(m, name, None), int) and getattr(m, name) > bound
               for m in model.modules() if "Attention" in type(m).__name__)


def has_wide_heads(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` has heads wider than SDPA's flash kernels take."""
    return _attention_attribute_over(model, "head_dim", attention.FLASH_MAX_HEAD_DIM)


def has_sliding_windows(model: nn.Module) -> bool:
    """Whether some attention module of ``model`` names a sliding window (Gemma 2/3/4's local layers, as
    ``sliding_window``): what lets the chunked attention apply a window whose mask was left out."""
    return _attention_attribute_over(model, "sliding_window", 0)


def apply_kernel_patches(model: nn.Module, captured: bool = False) -> list[str]:
    """The module patches of ``KERNEL_PATCHES``, the RoPE function patch and, for heads wider than 256 (and sliding
    windows' bands), chunked attention in transformers' sdpa function (``vramplan.train.attention``); return the
    replaced module paths.
    ``captured``: the steps will replay as CUDA graphs, where Gemma 4's Triton RoPE pays (switch ``rope_gemma4``);
    eager, its per-call host work loses to transformers' RoPE."""
    patches = dict(KERNEL_PATCHES)
    bands = switches.enabled("sliding_band_attention") and has_sliding_windows(model)
    if bands or (switches.enabled("wide_head_attention") and has_wide_heads(model)):
        attention.install(bands=bands)
    if switches.enabled("rope"):
        patch_rope(model, ROPE_PATCHED_BY_DEFAULT + ((GEMMA4_ROPE_MODULE,) if switches.gemma4_rope_fused(captured) else ()))
    return replace_modules(model, lambda path, module: patches[type(module).__name__](module)
                           if type(module).__name__ in patches else None)


def tile_mlps(model: nn.Module, tiles: int) -> int:
    """Run every fused gated MLP of ``model`` over its tokens in ``tiles`` tiles (``Plan.mlp_tiles``); return how many."""
    mlps = [m for m in model.modules() if isinstance(m, ops.GatedMLP)]
    for mlp in mlps:
        mlp.tiles = tiles
    return len(mlps)


class HostResidentEmbedding(nn.Module):
    """An embedding table kept in CPU memory; only the looked-up rows travel to the GPU.

    Gemma 4's per-layer embeddings (``embed_tokens_per_layer``: 2.35 B parameters in E2B) are
    pure lookups and frozen, so keeping them on the host saves GBs of GPU memory for a copy of
    b·s·layers·256 values per step. The table is a plain attribute, not a parameter or buffer,
    so ``model.to("cuda")`` leaves it where it is.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        weight = embedding.weight.detach().to("cpu")
        self.table = weight.pin_memory() if torch.cuda.is_available() else weight
        self.padding_idx = embedding.padding_idx
        scale = getattr(embedding, "scalar_embed_scale", 1.0)
        self.embed_scale = float(scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows gathered straight into pinned memory, copied without blocking, scaled on the device.

        (E2B at 2,048 tokens gathers 37 MB a step: gathering into pageable memory, scaling there and
        copying synchronously cost tens of ms of host time. The product is the same bf16 multiply.)
        """
        ids = input_ids.to("cpu").reshape(-1)
        rows = torch.empty((ids.numel(), self.table.shape[1]), dtype=self.table.dtype,
                           pin_memory=input_ids.is_cuda and self.table.is_pinned())
        torch.index_select(self.table, 0, ids, out=rows)  # the lookup of F.embedding (padding_idx only affects grads)
        rows = rows.view(*input_ids.shape, -1).to(input_ids.device, non_blocking=True)
        if self.embed_scale == 1.0:
            return rows
        return rows.mul_(torch.tensor(self.embed_scale, dtype=rows.dtype))


def keep_per_layer_embeddings_on_host(model: nn.Module) -> bool:
    """Move Gemma 4's per-layer embedding table out of the model's device placement; True if there was one."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    table = getattr(base, "embed_tokens_per_layer", None)
    if not isinstance(table, nn.Embedding):
        return False
    base.embed_tokens_per_layer = HostResidentEmbedding(table)
    return True


def keep_input_embeddings_on_host(model: nn.Module) -> bool:
    """Move an untied token embedding to the host; True if moved.

    Untied, the input table is a frozen lookup that nothing else reads (1.05 GB in bf16 for
    Llama-3.1-8B, 2.1 GB for 70B) while the GPU needs only b·s rows of it a step. A tied table
    is also the LM head's weight, which every token multiplies, so it stays on the GPU.
    Subclasses (Gemma's scaled embedding) are left alone: their forward does more than look up.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(embedding) is not nn.Embedding or head is None or head.weight is embedding.weight:
        return False
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    if getattr(base, "embed_tokens", None) is not embedding:
        return False
    base.embed_tokens = HostResidentEmbedding(embedding)
    return True


class Int8TokenTable(nn.Module):
    """A frozen token table as int8 rows with one absmax scale each (``ops.Int8Rows``), half the bf16 bytes.

    Called as the input embedding it gathers int8 rows and their scales and dequantizes only
    those (times Gemma's sqrt(hidden) scale, as its scaled embedding does); read through
    ``rows`` it is the LM head the fused loss dequantizes a slice at a time. Tied, one table
    serves both: the same module sits at ``embed_tokens`` and inside the head, so ``.to()`` and
    ``named_buffers`` see one copy. Buffers, not parameters: nothing trains them or shards them.
    """

    def __init__(self, weight: torch.Tensor, embed_scale: float = 1.0, padding_idx: int | None = None):
        super().__init__()
        rows = ops.Int8Rows.quantize(weight)
        self.register_buffer("qweight", rows.data)
        self.register_buffer("qscale", rows.scale)
        self.dtype, self.embed_scale, self.padding_idx = weight.dtype, float(embed_scale), padding_idx

    @property
    def rows(self) -> "ops.Int8Rows":
        return ops.Int8Rows(self.qweight, self.qscale, self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows.lookup(input_ids)
        if self.embed_scale == 1.0:
            return rows
        return rows.mul_(torch.tensor(self.embed_scale, dtype=rows.dtype))  # the bf16 multiply of Gemma's embedding


class Int8LMHead(nn.Module):
    """The LM head over an ``Int8TokenTable``: training reads ``rows`` (the fused loss); calling it
    (evaluation, generate) dequantizes the whole head once per call."""

    def __init__(self, table: Int8TokenTable, bias: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def rows(self) -> "ops.Int8Rows":
        return self.table.rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.table.rows.dequantize()
        return nn.functional.linear(hidden.to(weight.dtype), weight, self.bias)


def quantize_token_head(model: nn.Module) -> str:
    """Store the frozen LM head as int8 rows; a tied token embedding becomes the same table. Return what was done.

    An untied input embedding is left as it is (on a GPU it already lives on the host:
    ``keep_input_embeddings_on_host``). The bf16 table is dropped once both users point at the
    int8 one.
    """
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise AssertionError(f"{type(model).__name__}'s LM head is {type(head).__name__}, not a linear layer")
    tied = isinstance(embedding, nn.Embedding) and embedding.weight is head.weight
    if tied:
        table = Int8TokenTable(embedding.weight, getattr(embedding, "scalar_embed_scale", 1.0), embedding.padding_idx)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        if getattr(base, "embed_tokens", None) is not embedding:
            raise AssertionError(f"{type(model).__name__}: the tied token embedding is not its decoder's embed_tokens")
        base.embed_tokens = table
    else:
        table = Int8TokenTable(head.weight)
    model.set_output_embeddings(Int8LMHead(table, head.bias))
    return "tied token embedding and LM head: one int8 table" if tied else "LM head: int8"
