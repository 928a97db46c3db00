"""What a training job costs on each GPU of the catalog: the plan that fits, its speed, time and price.

A job is a model, a sequence length and a number of tokens to train on (the dataset's
tokens × epochs). For every catalog GPU, :func:`price_job` asks the planner for the best
plan that fits (``fit_plan``), predicts its tokens/s (:mod:`vramplan.throughput`) and turns
that into hours and dollars:

* rental cost = hours × the per-GPU hourly rate × GPUs, where the catalog has a rate;
* purchase = the card's price × GPUs;
* **cost to finish** = the cheaper of the two that are known (rent when renting is cheaper
  than buying for this job, buy otherwise); the options are sorted by it.

Marked among the GPUs that fit: the **cheapest** (least cost to finish), the **fastest**
(fewest hours) and the **best value** (least cost × hours: the option that gives up least
of either). A job that fits only at a shorter sequence than asked does not fit: the
planner would train a different job.

Boxes of several GPUs are priced beside single GPUs, in the sizes each kind of GPU is
sold or rented in (:data:`BOX_SIZES`): the plan is fitted per GPU (DDP, FSDP2 or FSDP2
with CPU offload, see :mod:`vramplan.fit`), the speed is the box's (communication over
its interconnect included, :mod:`vramplan.throughput`), and the price is N × the GPU's.
A box that does not fit is left out when a single GPU of its kind is listed anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vramplan.catalog import GpuSpec, ModelProfile, gpu_box, list_gpus
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, budget_bytes, estimate_plan
from vramplan.fit import fit_plan, in_gpu_arithmetic, leanest_plan, safety_margin
from vramplan.plan import Plan
from vramplan.throughput import predict_tokens_per_s

#: GPUs per box, by catalog kind, as they are sold or rented: data-center GPUs in servers
#: of up to 8 (HGX/DGX, cloud 8-GPU instances; T4/L4/A10 too: 4- and 8-GPU cloud
#: instances); workstation and consumer cards up to 4 on PCIe (desktop and
#: marketplace rigs); laptops one; Apple unified-memory machines never several.
BOX_SIZES = {"datacenter": (1, 2, 4, 8), "workstation": (1, 2, 4), "consumer": (1, 2, 4),
             "laptop": (1,), "unified": (1,), "budget": (1,)}

NEEDS_CUDA = "needs CUDA: vramplan trains with bitsandbytes and Triton kernels on NVIDIA GPUs"


@dataclass(frozen=True)
class Job:
    """What is to be trained: ``tokens`` per epoch, ``epochs`` times, at ``plan.seq_len``."""

    profile: ModelProfile
    base: Plan
    tokens: int
    epochs: float = 1.0
    tokens_source: str = "given"  # "given" | "tokenizer" | "estimated from characters"

    @property
    def total_tokens(self) -> float:
        return self.tokens * self.epochs


@dataclass
class Option:
    """One GPU (or box) for the job: whether it fits, with which plan, how fast, for how much."""

    gpu: GpuSpec
    fits: bool
    plan: Plan | None = None
    peak_bytes: int | None = None
    tokens_per_s: float | None = None
    hours: float | None = None
    rent_usd: float | None = None
    purchase_usd: float | None = None
    cost_usd: float | None = None
    cost_basis: str | None = None  # "rent" | "buy"
    lacks: str | None = None
    marks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name, "label": self.gpu.label, "count": self.gpu.count,
            "memory_bytes": self.gpu.memory_bytes, "fits": self.fits,
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
            "hours": self.hours,
            "cost": None if self.cost_usd is None else round(self.cost_usd, 4),
            "cost_basis": self.cost_basis,
            "rent_usd": None if self.rent_usd is None else round(self.rent_usd, 4),
            "rent_usd_per_hour": self.gpu.rent_usd_per_hour,
            "purchase_usd": self.purchase_usd,
            "peak_bytes": self.peak_bytes,
            "plan": self.plan.to_dict() if self.plan else None,
            "lacks": self.lacks, "marks": list(self.marks),
        }


def box_sizes(gpu: GpuSpec) -> tuple[int, ...]:
    """The box sizes ``gpu``'s kind comes in (see :data:`BOX_SIZES`)."""
    return BOX_SIZES.get(gpu.kind, (1,))


def _lacks(job: Job, gpu: GpuSpec, base: Plan) -> str:
    """What the GPU is short of: bytes under its usable budget for the leanest plan at the job's sequence length."""
    usable = budget_bytes(gpu) - safety_margin(budget_bytes(gpu))
    lean = estimate_plan(leanest_plan(base, base.seq_len), job.profile).peak_bytes
    return f"{(lean - usable) / 1e9:.1f} GB more memory (the leanest plan at seq {base.seq_len} needs {lean / 1e9:.1f} GB)"


def price_option(job: Job, gpu: GpuSpec) -> Option:
    """Fit the job on one GPU (or box) and price it."""
    if gpu.unified_memory:
        return Option(gpu, fits=False, lacks=NEEDS_CUDA)
    base = in_gpu_arithmetic(job.base, gpu)
    try:
        result = fit_plan(job.profile, gpu, base=base)
    except VramplanError:
        return Option(gpu, fits=False, lacks=_lacks(job, gpu, base))
    if result.plan.seq_len != base.seq_len:
        return Option(gpu, fits=False, lacks=f"{_lacks(job, gpu, base)}; fits only at seq {result.plan.seq_len}")
    speed = predict_tokens_per_s(architecture(job.profile), result.plan, gpu)
    hours = job.total_tokens / speed / 3600
    rent = hours * gpu.rent_usd_per_hour * gpu.count if gpu.rent_usd_per_hour else None
    purchase = gpu.price_usd * gpu.count if gpu.price_usd else None
    known = [(cost, basis) for cost, basis in ((rent, "rent"), (purchase, "buy")) if cost is not None]
    cost, basis = min(known) if known else (None, None)
    return Option(gpu, fits=True, plan=result.plan, peak_bytes=result.estimate.peak_bytes, tokens_per_s=speed,
                  hours=hours, rent_usd=rent, purchase_usd=purchase, cost_usd=cost, cost_basis=basis)


def _sort_key(option: Option) -> tuple:
    # fitting and priced first by cost, then fitting without a price by hours, then the rest by memory
    if option.fits and option.cost_usd is not None:
        return (0, option.cost_usd, option.hours)
    if option.fits:
        return (1, option.hours, 0)
    return (2, -option.gpu.memory_bytes, 0)


def mark(options: list[Option]) -> None:
    """Mark the cheapest, the fastest and the best value (least cost × hours) among the GPUs that fit."""
    priced = [o for o in options if o.fits and o.cost_usd is not None]
    fitting = [o for o in options if o.fits]
    if priced:
        min(priced, key=lambda o: (o.cost_usd, o.hours)).marks.append("cheapest")
        min(priced, key=lambda o: (o.cost_usd * o.hours, o.cost_usd)).marks.append("best value")
    if fitting:
        min(fitting, key=lambda o: (o.hours, o.cost_usd if o.cost_usd is not None else math.inf)).marks.append("fastest")


def price_job(job: Job, gpus: list[GpuSpec] | None = None) -> list[Option]:
    """Every catalog GPU in each box size it comes in for ``job``, sorted by cost to finish, marked.
    Boxes that do not fit are dropped: their single GPU is listed with what it lacks."""
    options = [option for gpu in (gpus or list_gpus()) for count in box_sizes(gpu)
               for option in [price_option(job, gpu_box(gpu, count))] if option.fits or count == 1]
    options.sort(key=_sort_key)
    mark(options)
    return options


# ------------------------------------------------------------------ the job's size

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}

#: Characters per token when no tokenizer is at hand: ~4 for English text with the
#: BPE vocabularies of Llama, Gemma and Qwen (code and other languages run lower).
CHARS_PER_TOKEN = 4.0


def parse_tokens(text: str) -> int:
    """``50M``, ``1.5B``, ``200k`` or ``123456`` as a positive token count."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match:
        raise VramplanError(f"--tokens {text}: write a positive count such as 50M, 1.5B, 200k or 123456")
    count = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if count < 1:
        raise VramplanError(f"--tokens {text}: the job must have at least one token")
    return int(count)


def _record_text(record: dict) -> str:
    if "messages" in record:
        return "".join(m["content"] for m in record["messages"])
    if "prompt" in record:
        return record["prompt"] + record["completion"]
    return record["text"]


def dataset_tokens(path: str, tokenizer_dir: str | None = None) -> tuple[int, str]:
    """Tokens in a JSONL dataset: counted with the model's tokenizer when ``tokenizer_dir`` is a
    model folder, else estimated from characters (``CHARS_PER_TOKEN``). Returns (tokens, how)."""
    from vramplan.train.data import read_jsonl, tokenize

    records = read_jsonl(path)
    if tokenizer_dir:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as err:
            raise VramplanError(f"--model {tokenizer_dir}: no tokenizer could be loaded there ({str(err).splitlines()[0]})") from None
        return sum(len(tokenize(r, tokenizer)[0]) for r in records), "tokenizer"
    chars = sum(len(_record_text(r)) for r in records)
    return max(1, round(chars / CHARS_PER_TOKEN)), "estimated from characters"
