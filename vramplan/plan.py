"""The settings of one fine-tuning run: what `fit` chooses, `estimate` prices and `train` runs.

A Plan is plain data. It is written to ``plan.json`` by ``vramplan fit --out`` and read by
``train``, ``check`` and ``calibrate``, so every field has a JSON-friendly type and the
file is validated on load with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramplan.errors import VramplanError

QUANTS = ("bf16", "int8", "nf4")
CHECKPOINTING = ("none", "full", "offload")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
ATTENTION = ("sdpa", "eager")
LOSSES = ("chunked", "full")
STACKS = ("vramplan", "hf")
COMPUTE_DTYPES = ("bf16", "fp16")
LORA_DTYPES = ("fp32", "bf16")
PARALLEL = ("none", "ddp", "fsdp")
#: The frozen token embedding / LM head: bf16, or int8 with one absmax scale per vocabulary row.
HEAD_QUANTS = ("bf16", "int8")
MODALITIES = ("text", "image", "audio")
#: The parts of a multimodal model LoRA can adapt (Unsloth's finetune_vision_layers / _language_layers, plus audio).
TRAIN_PARTS = ("language", "vision", "audio")
_MODALITY_ALIASES = {"vision": "image"}  # what the tower is called, for the modality it reads

#: The linear layers LoRA adapts by default: every projection of attention and MLP.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: LoRA on the routed experts of an MoE layer (transformers' fused 3-D parameters; PEFT's
#: ``target_parameters`` names). Not in the default targets: asked for by name, or ``--targets experts``.
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")

_CHOICES = {
    "quant": QUANTS,
    "checkpointing": CHECKPOINTING,
    "optimizer": OPTIMIZERS,
    "attention": ATTENTION,
    "loss": LOSSES,
    "stack": STACKS,
    "compute_dtype": COMPUTE_DTYPES,
    "lora_dtype": LORA_DTYPES,
    "parallel": PARALLEL,
    "head_quant": HEAD_QUANTS,
}

_POSITIVE_INTS = ("lora_rank", "seq_len", "micro_batch", "grad_accum", "gpus", "loss_chunk_mb", "mlp_tiles")


@dataclass(frozen=True)
class Plan:
    """Everything that decides a run's memory and speed, and nothing about the hardware."""

    model: str
    quant: str = "nf4"
    double_quant: bool = True
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: 2 * rank, the common default
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dtype: str = "fp32"
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    checkpointing: str = "full"
    optimizer: str = "paged_adamw8bit"
    attention: str = "sdpa"
    loss: str = "chunked"
    stack: str = "vramplan"
    compute_dtype: str = "bf16"
    modalities: tuple[str, ...] = ("text",)
    gpus: int = 1
    parallel: str = "none"  # "ddp": the whole model on every GPU; "fsdp": FSDP2, frozen weights sharded
    cpu_offload: bool = False  # FSDP2 only: the shards (and LoRA state) live in CPU memory
    images_per_example: int = 0  # each adds the vision tower's soft tokens to the sequence
    audio_seconds_per_example: float = 0.0  # each second adds 25 audio soft tokens (one per 40 ms)
    train_parts: tuple[str, ...] = ("language",)  # where LoRA goes: language and/or the vision / audio towers
    train_projectors: bool = False  # train the multimodal embedders (projectors into the text width) in full
    head_quant: str = "bf16"  # "int8": the frozen token embedding / LM head as int8 rows, one scale each (vramplan stack)
    loss_chunk_mb: int = 128  # the chunked loss's logits buffer (one chunk of tokens x vocab); measurements before it existed ran 256
    cuda_graphs: bool = True  # replay each micro-batch's forward and backward as one CUDA graph where it can (captures_steps)
    flat_optimizer: bool = False  # 8-bit AdamW steps all adapters as one flat tensor (steps_flat): fewer host ops, ~0.3 GB more
    mlp_tiles: int = 1  # >1: each gated MLP runs over the tokens in this many tiles, one tile's intermediates alive at a time

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise VramplanError(f"plan field '{name}' is {value!r}; choose one of {', '.join(allowed)}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VramplanError(f"plan field '{name}' must be a positive whole number, got {value!r}")
        if self.seq_len > 1 << 22:
            raise VramplanError(f"plan field 'seq_len' is {self.seq_len}: over 4M tokens is not a real run; lower --seq")
        if self.lora_rank > 4096:
            raise VramplanError(f"plan field 'lora_rank' is {self.lora_rank}; LoRA ranks above 4096 are not supported")
        # one GPU may still run FSDP2: its CPU offload keeps a model larger than the GPU in host memory
        if (self.gpus > 1 and self.parallel == "none") or (self.gpus == 1 and self.parallel == "ddp"):
            fix = "set parallel to ddp or fsdp" if self.gpus > 1 else "set gpus above 1, or parallel to none or fsdp"
            raise VramplanError(f"plan has gpus={self.gpus} and parallel={self.parallel!r}: {fix} (--gpus N with --parallel)")
        if not isinstance(self.flat_optimizer, bool):
            raise VramplanError(f"plan field 'flat_optimizer' must be true or false, got {self.flat_optimizer!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise VramplanError(f"plan field 'cuda_graphs' must be true or false, got {self.cuda_graphs!r}")
        if not isinstance(self.cpu_offload, bool):
            raise VramplanError(f"plan field 'cpu_offload' must be true or false, got {self.cpu_offload!r}")
        if self.cpu_offload and self.parallel != "fsdp":
            raise VramplanError("plan field 'cpu_offload' is true but parallel is not fsdp: CPU offload of parameters is FSDP2's; set parallel to fsdp")
        if self.head_quant == "int8" and self.parallel == "fsdp":
            raise VramplanError("plan field 'head_quant' is int8 with parallel fsdp: FSDP2 shards the bf16 head instead; "
                                "set head_quant to bf16 or parallel to ddp")
        if not self.lora_targets:
            raise VramplanError("plan field 'lora_targets' is empty; name at least one module, e.g. q_proj")
        if self.mlp_tiles > 1 and (self.stack != "vramplan" or self.parallel != "none"):
            raise VramplanError(f"plan field 'mlp_tiles' is {self.mlp_tiles}: tiled MLPs run on vramplan's trainer on one "
                                "process only (their inner backwards would reach DDP's and FSDP's reducers once per tile); "
                                "set mlp_tiles to 1 (--mlp-tiles 1)")
        experts = [t for t in self.lora_targets if t in EXPERT_TARGETS]
        if experts and self.quant != "nf4":
            raise VramplanError(f"plan targets the routed experts ({', '.join(experts)}) with quant {self.quant}: vramplan "
                                "adapts them on its NF4 experts only; set quant to nf4 or drop the experts targets")
        if experts and self.stack != "vramplan":
            raise VramplanError(f"plan targets the routed experts ({', '.join(experts)}) on the {self.stack} stack; "
                                "only vramplan's trainer adapts them: set stack to vramplan or drop the experts targets")
        if experts and self.parallel == "fsdp":
            raise VramplanError(f"plan targets the routed experts ({', '.join(experts)}) with parallel fsdp, which "
                                "is not supported for them yet; set parallel to ddp or drop the experts targets")
        # tuples, not lists, so a Plan is hashable and can be a dict key in the search
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "modalities", tuple(dict.fromkeys(_MODALITY_ALIASES.get(m, m) for m in self.modalities)))
        object.__setattr__(self, "train_parts", tuple(self.train_parts))
        self._check_multimodal()

    def _check_multimodal(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise VramplanError(f"plan field 'modalities' has {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
        images, seconds = self.images_per_example, self.audio_seconds_per_example
        if not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise VramplanError(f"plan field 'images_per_example' must be a whole number >= 0, got {images!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
            raise VramplanError(f"plan field 'audio_seconds_per_example' must be 0 to 3600 seconds, got {seconds!r}")
        if images and "image" not in self.modalities:
            raise VramplanError("the plan has images per example but no 'image' modality; add --modalities text,image")
        if seconds and "audio" not in self.modalities:
            raise VramplanError("the plan has audio seconds per example but no 'audio' modality; add --modalities text,audio")
        parts = [p for p in self.train_parts if p not in TRAIN_PARTS]
        if parts or not self.train_parts:
            raise VramplanError(f"plan field 'train_parts' must name some of {', '.join(TRAIN_PARTS)}, got {list(self.train_parts)}")
        for part, modality in (("vision", "image"), ("audio", "audio")):
            if part in self.train_parts and modality not in self.modalities:
                raise VramplanError(f"--train {part} needs the {modality} tower: add {modality} to --modalities")
        if self.head_quant == "int8" and self.multimodal:
            raise VramplanError("plan field 'head_quant' is int8 on a multimodal plan: the multimodal model reads its "
                                "token table directly; set head_quant to bf16 or train text only")
        if self.train_projectors and self.modalities == ("text",):
            raise VramplanError("train_projectors needs an image or audio modality; the projectors are unused on text")

    @property
    def multimodal(self) -> bool:
        """Images or audio reach the model: the towers are loaded and run (text-only plans never build them)."""
        return any(m != "text" for m in self.modalities)

    @property
    def adapts_experts(self) -> bool:
        """LoRA on the routed experts' fused matrices: vramplan's NF4 experts only, not under FSDP2."""
        return any(t in EXPERT_TARGETS for t in self.lora_targets)

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.gpus

    @property
    def captures_steps(self) -> bool:
        """Whether vramplan's trainer replays this plan's micro-batch steps as CUDA graphs: asked for,
        one GPU, text only, and checkpoints kept on the GPU (an offload copies to the host mid-step,
        which a graph cannot hold). The graphs take the host out of the step (a 1B model ran 2.4x
        faster on an H100) for about 0.1 GB of memory (vramplan.memory.overhead). The model may
        still decline them (MoE: ``vramplan.stacks.vramplan.graphs_apply``, which the planner asks)."""
        return (self.cuda_graphs and self.stack == "vramplan" and self.gpus == 1 and self.parallel == "none"
                and not self.multimodal and self.checkpointing != "offload")

    @property
    def steps_flat(self) -> bool:
        """Whether the optimizer steps the adapters as one flat tensor: asked for, bitsandbytes' 8-bit
        AdamW on vramplan's trainer, parameters not sharded (FSDP2's are DTensor shards). The model
        may still decline it (Gemma 4: ``vramplan.train.optim.flat_update_pays``)."""
        return (self.flat_optimizer and self.stack == "vramplan" and self.optimizer != "adamw"
                and self.parallel != "fsdp")

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        data["modalities"] = list(self.modalities)
        data["train_parts"] = list(self.train_parts)
        if not self.multimodal:  # text plans write the same file as before images and audio existed
            for name in _MULTIMODAL_FIELDS:
                if data[name] == _DEFAULTS[name]:
                    del data[name]
        for name, default in (("head_quant", "bf16"), ("loss_chunk_mb", 128), ("cuda_graphs", True),
                              ("flat_optimizer", False), ("mlp_tiles", 1)):  # files as before these fields
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise VramplanError(f"{source}: expected a JSON object with the plan's fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VramplanError(f"{source}: unknown plan field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "model" not in data:
            raise VramplanError(f"{source}: the plan has no 'model' field")
        try:
            return cls(**data)
        except TypeError as err:
            raise VramplanError(f"{source}: {err}") from None


_MULTIMODAL_FIELDS = ("images_per_example", "audio_seconds_per_example", "train_parts", "train_projectors")
_DEFAULTS = {"images_per_example": 0, "audio_seconds_per_example": 0.0, "train_parts": ["language"], "train_projectors": False}


def read_plan(path: str | os.PathLike) -> Plan:
    """Load a plan file; plan files may wrap the plan as ``{"plan": {...}, ...}`` (fit --out does)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VramplanError(f"plan file {path} does not exist; write one with `vramplan fit MODEL --gpu GPU --out {path}`") from None
    except json.JSONDecodeError as err:
        raise VramplanError(f"plan file {path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    return Plan.from_dict(data, source=str(path))
