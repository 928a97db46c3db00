"""Search the plans a model can train with for the best one that fits a memory budget.

The objective, in order (the first difference decides):

1. keep the requested sequence length and effective batch (shorter sequences are tried
   only when nothing fits at the requested one, halving down to 256 tokens);
   on several GPUs, then the layout: DDP (the whole model per GPU, only LoRA gradients
   cross the link) > FSDP2 (weights sharded, all-gathered layer by layer) > FSDP2 with CPU
   offload (shards in host memory; searched with NF4 only: it exists to fit what 4-bit
   sharding cannot, and bf16 shards would cost 4× the host memory and PCIe traffic);
2. prefer higher precision of the base weights: bf16 > int8 > nf4;
3. keep the LM head in bf16: on vramplan's stack an int8 head (one scale per vocabulary row,
   half the bytes of the head) is searched only when nothing fits with a bf16 head;
4. prefer a higher LoRA rank: 64 > 32 > 16 > 8;
5. then the fastest: CUDA graphs where the trainer can capture the steps (they take the host out
   of a step: 2.4x on a 1B model, for about 0.1 GB; never an MoE model's, whose routing waits on
   the host) > none; no checkpointing > checkpointing > checkpointing with each gated MLP run in 2, then
   4 tiles of the tokens (one more MLP forward, one tile's intermediates alive) > checkpointing with CPU offload,
   larger micro-batches (fewer accumulation steps), AdamW > 8-bit AdamW > paged 8-bit AdamW,
   and an 8-bit AdamW stepping the adapters as one flat tensor > tensor by tensor (far fewer host
   operations: 1.2-1.5x under CUDA graphs on the H100, for 0.25 GB and 4 bytes an adapter parameter).

The loss is the stack's own: chunked on vramplan (fused with the LM head, it costs no
speed, so full logits are never the better choice), full on hf (the recipe has no other).

Memory is per GPU (per rank) throughout: the budget is one GPU's, and a multi-GPU
estimate is what each rank's process holds (``vramplan.stacks.distributed``).

A plan fits when its peak stays under the budget less a safety margin. Candidates are
visited in the objective's order and the first that fits wins, so a search prices a
few hundred plans at most (each estimate is ~0.1 ms of arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from vramplan.catalog import GpuSpec, ModelProfile, box_count, gpu_box, list_gpus
from vramplan.errors import VramplanError
from vramplan.estimate import Estimate, architecture, budget_bytes as gpu_budget_bytes, estimate_plan
from vramplan.plan import Plan
from vramplan.stacks.vramplan import flat_step_applies, fsdp_steps_fused, graphs_apply

QUANT_ORDER = ("bf16", "int8", "nf4")
#: What each stack can run: vramplan's trainer quantizes to NF4 or keeps bf16 (no int8 kernels);
#: the hf recipe also loads bitsandbytes' LLM.int8().
STACK_QUANTS = {"vramplan": ("bf16", "nf4"), "hf": QUANT_ORDER}
RANK_ORDER = (64, 32, 16, 8)
OPTIMIZER_ORDER = ("adamw", "adamw8bit", "paged_adamw8bit")
HEAD_QUANT_ORDER = ("bf16", "int8")
#: Multi-GPU layouts, fastest first: (parallel, cpu_offload).
LAYOUT_ORDER = (("ddp", False), ("fsdp", False), ("fsdp", True))
LAYOUT_NAMES = {("ddp", False): "DDP", ("fsdp", False): "FSDP2", ("fsdp", True): "FSDP2 with CPU offload"}
MIN_SEQ = 256

#: Kept free under the budget: estimates carry error (±10% on the measured anchors) and
#: other processes or a display may take memory mid-run.
SAFETY_FRACTION = 0.05


@dataclass(frozen=True)
class FitResult:
    """The chosen plan's estimate, the budget it was fitted to, and why it was chosen."""

    estimate: Estimate
    budget_bytes: int
    margin_bytes: int
    explanation: tuple[str, ...]
    plans_priced: int
    gpu: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def plan(self) -> Plan:
        return self.estimate.plan

    def to_dict(self) -> dict[str, Any]:
        data = self.estimate.to_dict()
        data.update(budget_bytes=self.budget_bytes, margin_bytes=self.margin_bytes,
                    explanation=list(self.explanation), plans_priced=self.plans_priced, gpu=self.gpu)
        return data


def safety_margin(budget: int) -> int:
    return int(budget * SAFETY_FRACTION)


def _checkpointing_order(stack: str) -> tuple[str, ...]:
    return ("none", "full") if stack == "hf" else ("none", "full", "offload")


#: Tiled MLPs (``Plan.mlp_tiles``), searched under checkpointing: each halving of a gated MLP's
#: intermediates costs one more MLP forward and more launches (H100, Llama-3.2-1B at 2,048 tokens under
#: CUDA graphs: 38,197 tok/s untiled, 31,614 in 2 tiles, 25,988 in 4; 63 and 126 MB less reserved).
MLP_TILE_ORDER = (1, 2, 4)


def tiles_apply(plan: Plan) -> bool:
    """Whether the search may tile ``plan``'s MLPs: vramplan's trainer on one process, under checkpointing
    (without it every layer's intermediates stay saved, and one layer's tiles would not lower the peak)."""
    return plan.stack == "vramplan" and plan.parallel == "none" and plan.checkpointing != "none"


def _modes(base: Plan) -> Iterator[tuple[str, int]]:
    """(checkpointing, MLP tiles), fastest first: tiles before offloading the checkpoints."""
    for checkpointing in _checkpointing_order(base.stack):
        for tiles in MLP_TILE_ORDER if tiles_apply(base.replace(checkpointing=checkpointing)) else (1,):
            yield checkpointing, tiles


def _micro_batches(effective: int) -> list[int]:
    """Micro-batch sizes that divide the effective batch, largest first."""
    return [m for m in range(effective, 0, -1) if effective % m == 0]


def layouts(base: Plan) -> tuple[tuple[str, bool], ...]:
    """The (parallel, cpu_offload) layouts the search tries for ``base.gpus``, fastest first."""
    if base.gpus == 1:
        return (("none", False),)
    return tuple(layout for layout in LAYOUT_ORDER if not (base.adapts_experts and layout[0] == "fsdp"))


def optimizers_for(plan: Plan) -> tuple[str, ...]:
    """The optimizers the trainer runs as planned for ``plan``: under FSDP2 the LoRA parameters are
    DTensor shards, which bitsandbytes' 8-bit optimizers do not take: torch AdamW (its states sharded
    too), and 8-bit AdamW where the fused kernel steps the shards (``fsdp_steps_fused``; never paged)."""
    if plan.parallel != "fsdp":
        return OPTIMIZER_ORDER
    return ("adamw", "adamw8bit") if fsdp_steps_fused(plan.replace(optimizer="adamw8bit")) else ("adamw",)


def head_quants_for(base: Plan) -> tuple[str, ...]:
    """The LM head storages to search: int8 only on vramplan's trainer, one GPU or DDP, text; pinned int8 stays int8."""
    if base.head_quant == "int8":
        return ("int8",)
    if base.stack != "vramplan" or base.multimodal or base.gpus > 1:
        return ("bf16",)
    return HEAD_QUANT_ORDER


def _flat_choices(arch, plan: Plan) -> tuple[bool, ...]:
    """The optimizer layouts to try for ``plan``: flat first where the trainer can step flat."""
    return (True, False) if flat_step_applies(arch, plan.replace(flat_optimizer=True)) else (plan.flat_optimizer,)


def _candidates(base: Plan, seq: int, effective: int, arch) -> Iterator[Plan]:
    loss = "full" if base.stack == "hf" else "chunked"
    quants = ("nf4",) if base.cpu_offload or base.adapts_experts else STACK_QUANTS[base.stack]
    for quant in quants:
        for rank in RANK_ORDER:
            for graphs in (True, False) if base.cuda_graphs else (False,):
                for checkpointing, tiles in _modes(base):
                    for micro in _micro_batches(effective):
                        for optimizer in optimizers_for(base):
                            plan = base.replace(quant=quant, lora_rank=rank, checkpointing=checkpointing, seq_len=seq,
                                                micro_batch=micro, grad_accum=effective // micro, optimizer=optimizer,
                                                loss=loss, mlp_tiles=tiles)
                            capturable = graphs_apply(arch, plan.replace(cuda_graphs=True))
                            if graphs and not capturable:
                                continue
                            if capturable:  # else the plan keeps the request: no graph holds it (or the model routes experts)
                                plan = plan.replace(cuda_graphs=graphs)
                            for flat in _flat_choices(arch, plan):
                                yield plan.replace(flat_optimizer=flat)


def leanest_plan(base: Plan, seq: int) -> Plan:
    """The least memory this search can ask for at ``seq``: NF4, rank 8, batch 1, offloaded checkpoints, MLPs in the
    most tiles, paged 8-bit AdamW."""
    lean = base.replace(quant="nf4", lora_rank=8, seq_len=seq, micro_batch=1,
                        grad_accum=base.micro_batch * base.grad_accum,
                        checkpointing="full" if base.stack == "hf" else "offload",
                        optimizer=optimizers_for(base)[-1], loss="full" if base.stack == "hf" else "chunked")
    return lean.replace(mlp_tiles=MLP_TILE_ORDER[-1] if tiles_apply(lean) else 1)


def smallest_gpu_for(peak: int) -> GpuSpec | None:
    """The catalog GPU with the least memory whose budget (less the safety margin) holds ``peak``."""
    fitting = [g for g in list_gpus() if gpu_budget_bytes(g) - safety_margin(gpu_budget_bytes(g)) >= peak]
    return min(fitting, key=lambda g: g.memory_bytes) if fitting else None


def with_gpus(base: Plan, gpu: GpuSpec | None) -> Plan:
    """``base`` spread over the GPUs of ``gpu`` (a box such as ``2xrtx-4090``) when it names several."""
    count = box_count(gpu, base.gpus if base.gpus > 1 else None)
    return base.replace(gpus=count, parallel="ddp") if count > 1 and base.gpus == 1 else base


def in_gpu_arithmetic(base: Plan, gpu: GpuSpec | None) -> Plan:
    """``base`` computing in fp16 where ``gpu`` has no bf16 arithmetic (T4, V100, RTX 20xx): the same bytes, and the
    only half precision those GPUs run at speed."""
    if gpu is not None and not gpu.supports_bf16 and base.compute_dtype == "bf16":
        return base.replace(compute_dtype="fp16")
    return base


def fit_plan(profile: ModelProfile, gpu: GpuSpec | None = None, *, budget: int | None = None,
             base: Plan | None = None, adjust: Callable[[Estimate], Estimate] | None = None,
             head_quants: tuple[str, ...] | None = None) -> FitResult:
    """The best plan for ``profile`` under ``budget`` bytes (or ``gpu``'s budget), by the module's objective.

    ``base`` carries the request: sequence length, micro-batch × accumulation (their
    product is the effective batch to keep), stack, targets. Raises VramplanError naming
    the shortfall and the smallest catalog GPU that would fit when nothing does. ``adjust``
    corrects every estimate priced (a calibration: ``vramplan.calibration.apply_calibration``).
    ``head_quants`` pins the LM head storages searched (default: ``head_quants_for(base)``).
    """
    adjust = adjust or (lambda est: est)
    if budget is None:
        if gpu is None:
            raise VramplanError("fit needs a GPU or a budget: pass --gpu NAME, --gpu 12GB or --gpu auto")
        budget = gpu_budget_bytes(gpu)
    base = in_gpu_arithmetic(with_gpus(base or Plan(model=profile.name), gpu), gpu)
    if gpu is not None and gpu.count != base.gpus:
        gpu = gpu_box(gpu, base.gpus)
    margin = safety_margin(budget)
    limit = budget - margin
    effective = base.micro_batch * base.grad_accum
    priced = 0
    seqs = [base.seq_len]
    while seqs[-1] // 2 >= MIN_SEQ:
        seqs.append(seqs[-1] // 2)
    heads = head_quants or head_quants_for(base)
    arch = architecture(profile)
    # at each length, an int8 head only once nothing fits with a bf16 one
    searches = [[(seq, parallel, offload, head) for seq in seqs for head in heads for parallel, offload in layouts(base)]]
    if base.gpus == 1 and base.stack == "vramplan" and not base.adapts_experts:
        # the last resort on one GPU, after every shorter sequence: the frozen weights in host memory (PCIe-bound)
        searches.append([(seq, "fsdp", True, heads[0]) for seq in seqs])
    for search in searches:
        for seq, parallel, offload, head in search:
            if head == "int8" and parallel == "fsdp":
                continue
            layout = base.replace(parallel=parallel, cpu_offload=offload, head_quant=head)
            # the layout's leanest plan bounds its candidates at this length from below: skip a layout that cannot fit
            priced += 1
            if adjust(estimate_plan(leanest_plan(layout, seq), profile, gpu, budget=budget)).peak_bytes > limit:
                continue
            for plan in _candidates(layout, seq, effective, arch):
                priced += 1
                est = adjust(estimate_plan(plan, profile, gpu, budget=budget))
                if est.peak_bytes <= limit:
                    why = _explain(profile, base, est, budget, margin, adjust) + _arithmetic_note(est.plan, gpu)
                    return FitResult(est, budget, margin, why, priced, gpu.name if gpu else None, est.notes)
    where = gpu.name if gpu else f"{budget / 1e9:.2f} GB"
    if base.gpus > 1:
        raise VramplanError(_no_layout_fits(profile, base, where, limit, adjust))
    lean = adjust(estimate_plan(leanest_plan(base.replace(head_quant=heads[-1]), base.seq_len), profile, budget=budget))
    short = lean.peak_bytes - limit
    bigger = smallest_gpu_for(lean.peak_bytes)
    suggestion = f"the smallest catalog GPU that fits it is {bigger.name} ({bigger.memory_bytes / 1e9:.1f} GB)" if bigger \
        else "no single catalog GPU holds it"
    raise VramplanError(
        f"nothing fits {where}: the leanest plan for {profile.name} at {base.seq_len} tokens needs "
        f"{lean.peak_bytes / 1e9:.2f} GB, {short / 1e9:.2f} GB ({short} bytes) more than the "
        f"{limit / 1e9:.2f} GB usable; {suggestion}")


def leanest_per_layout(profile: ModelProfile, base: Plan, adjust: Callable[[Estimate], Estimate]) -> dict[str, int]:
    """Per-rank peak of the leanest plan in each multi-GPU layout, by the layout's name."""
    return {LAYOUT_NAMES[(p, o)]: adjust(estimate_plan(
        leanest_plan(base.replace(parallel=p, cpu_offload=o), base.seq_len), profile)).peak_bytes
        for p, o in LAYOUT_ORDER}


def _no_layout_fits(profile: ModelProfile, base: Plan, where: str, limit: int,
                    adjust: Callable[[Estimate], Estimate]) -> str:
    lean = leanest_per_layout(profile, base, adjust)
    needs = ", ".join(f"{name} {_gb(peak)}" for name, peak in lean.items())
    least = min(lean.values())
    bigger = smallest_gpu_for(least)
    suggestion = (f"{base.gpus}x{bigger.name} ({bigger.memory_bytes / 1e9:.1f} GB each) would hold it" if bigger
                  else "no catalog GPU holds it; add GPUs")
    return (f"nothing fits {where}: the leanest plan for {profile.name} at {base.seq_len} tokens needs per GPU {needs}, "
            f"at best {_gb(least - limit)} ({least - limit} bytes) more than the {_gb(limit)} usable per GPU; {suggestion}")


def _arithmetic_note(plan: Plan, gpu: GpuSpec | None) -> tuple[str, ...]:
    if gpu is None or gpu.supports_bf16 or plan.compute_dtype != "fp16":
        return ()
    return (f"Computes in fp16: the {gpu.label} has no bf16 arithmetic (compute capability below 8.0); "
            "16-bit weights load as fp16, and the trainer scales the loss so small gradients survive fp16's range.",)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _explain(profile: ModelProfile, base: Plan, est: Estimate, budget: int, margin: int,
             adjust: Callable[[Estimate], Estimate]) -> tuple[str, ...]:
    """Sentences saying what was kept, what was given up and what the next-better choice would have needed."""
    plan = est.plan
    arch = architecture(profile)
    lines = []
    limit = budget - margin

    def peak(**changes: Any) -> int:
        return adjust(estimate_plan(plan.replace(**changes), profile)).peak_bytes

    if plan.gpus > 1 or plan.parallel != "none":
        lines.append(_explain_layout(profile, plan, est, limit, adjust))
    per_gpu = f" on each of {plan.gpus} GPUs" if plan.gpus > 1 else ""
    if plan.seq_len == base.seq_len:
        lines.append(f"Kept the sequence length of {plan.seq_len} tokens and the effective batch of "
                     f"{plan.effective_batch} ({plan.micro_batch} × {plan.grad_accum} accumulation steps{per_gpu}).")
    else:
        lines.append(f"Gave up sequence length: {base.seq_len} tokens does not fit even with the leanest settings "
                     f"({_gb(adjust(estimate_plan(leanest_plan(base, base.seq_len), profile)).peak_bytes)}); "
                     f"trains {plan.seq_len}-token sequences instead.")
    quants = STACK_QUANTS[plan.stack]
    better_quants = quants[:quants.index(plan.quant)]
    if plan.cpu_offload:
        lines.append("Base weights in nf4: CPU offload is searched with 4-bit weights only (bf16 shards would need "
                     "4× the host memory and PCIe traffic).")
    elif plan.adapts_experts:
        lines.append("Base weights in nf4: LoRA on the routed experts runs on vramplan's NF4 experts only.")
    elif better_quants:
        lean = {q: adjust(estimate_plan(leanest_plan(plan, plan.seq_len).replace(quant=q), profile)).peak_bytes
                for q in better_quants}
        gave = ", ".join(f"{q} needs at least {_gb(v)}" for q, v in lean.items())
        lines.append(f"Base weights in {plan.quant}: {gave}, over the {_gb(limit)} usable.")
    else:
        lines.append("Base weights in bf16: full precision fits.")
    if plan.head_quant == "int8":
        if base.head_quant == "int8":
            lines.append("LM head in int8 (one scale per vocabulary row), as asked.")
        else:
            bf16_head = adjust(estimate_plan(leanest_plan(plan, plan.seq_len).replace(head_quant="bf16"), profile))
            lines.append(f"LM head in int8 (one scale per vocabulary row, half its bf16 bytes): with a bf16 head the "
                         f"leanest plan needs {_gb(bf16_head.peak_bytes)}, over the {_gb(limit)} usable.")
    if plan.lora_rank != RANK_ORDER[0]:
        higher = RANK_ORDER[RANK_ORDER.index(plan.lora_rank) - 1]
        lines.append(f"LoRA rank {plan.lora_rank}: rank {higher} would need {_gb(peak(lora_rank=higher))} at these settings.")
    else:
        lines.append(f"LoRA rank {plan.lora_rank}, the highest searched.")
    speed = []
    if plan.checkpointing == "offload":  # the faster modes it passed over, each with what it needs
        speed.append(f"checkpointing 'offload' (on the GPU: {_gb(peak(checkpointing='full'))}; "
                     f"none: {_gb(peak(checkpointing='none', mlp_tiles=1))})")
    elif plan.checkpointing != "none":
        speed.append(f"checkpointing '{plan.checkpointing}' (without it: {_gb(peak(checkpointing='none', mlp_tiles=1))})")
    else:
        speed.append("no checkpointing (no recompute)")
    if plan.mlp_tiles > 1:
        fewer = MLP_TILE_ORDER[MLP_TILE_ORDER.index(plan.mlp_tiles) - 1] if plan.mlp_tiles in MLP_TILE_ORDER else 1
        speed.append(f"MLPs in {plan.mlp_tiles} tiles of the tokens (in {fewer}: {_gb(peak(mlp_tiles=fewer))})")
    per_rank_batch = plan.micro_batch * plan.grad_accum
    if plan.micro_batch < per_rank_batch:
        speed.append(f"micro-batch {plan.micro_batch} (micro-batch {per_rank_batch} would need "
                     f"{_gb(peak(micro_batch=per_rank_batch, grad_accum=1))})")
    speed.append(f"optimizer {plan.optimizer}")
    if graphs_apply(arch, plan):
        speed.append(f"CUDA graphs (without them: {_gb(peak(cuda_graphs=False))})")
    elif base.cuda_graphs and graphs_apply(arch, plan.replace(cuda_graphs=True)):
        speed.append(f"no CUDA graphs (with them: {_gb(peak(cuda_graphs=True))})")
    elif base.cuda_graphs and arch.routes_experts and plan.replace(cuda_graphs=True, checkpointing="full").captures_steps:
        speed.append("no CUDA graphs (routing to the MoE experts reads the router's choice on the host, "
                     "a sync a graph cannot hold)")
    elif base.cuda_graphs and plan.checkpointing == "offload" and plan.replace(checkpointing="full").captures_steps:
        speed.append("no CUDA graphs (offloaded checkpoints copy to the host mid-step, which a graph cannot hold)")
    if "flat_optimizer" in est.components:
        speed.append(f"the adapters stepped as one flat tensor (per tensor: {_gb(peak(flat_optimizer=False))})")
    elif flat_step_applies(arch, plan.replace(flat_optimizer=True)):
        speed.append(f"the adapters stepped tensor by tensor (one flat tensor: {_gb(peak(flat_optimizer=True))})")
    lines.append("Fastest settings that fit: " + ", ".join(speed) + ".")
    lines.append(f"Peak {_gb(est.peak_bytes)}{' per GPU' if plan.gpus > 1 else ''} in the {est.peak_phase} phase, "
                 f"against a budget of {_gb(budget)} "
                 f"less a {_gb(margin)} safety margin: {_gb(limit - est.peak_bytes)} to spare.")
    return tuple(lines)


def model_weight_bytes(profile: ModelProfile, plan: Plan) -> int:
    """The frozen weights of ``plan``'s model on one GPU, in the plan's quantization."""
    from vramplan.stacks.distributed import WEIGHT_COMPONENTS

    single = estimate_plan(plan.replace(gpus=1, parallel="none", cpu_offload=False), profile)
    return sum(v for k, v in single.components.items() if k in WEIGHT_COMPONENTS)


def _explain_layout(profile: ModelProfile, plan: Plan, est: Estimate, limit: int,
                    adjust: Callable[[Estimate], Estimate]) -> str:
    """Why DDP, FSDP2 or FSDP2 with CPU offload: the layouts before it did not fit (with their numbers)."""
    n = plan.gpus
    model = f"the {_QUANT_WORDS[plan.quant]} model ({_gb(model_weight_bytes(profile, plan))})"
    if n == 1:
        alone = adjust(estimate_plan(leanest_plan(plan.replace(parallel="none", cpu_offload=False), plan.seq_len),
                                     profile)).peak_bytes
        return (f"FSDP2 with CPU offload on one GPU: {model} does not fit beside the rest even at the leanest "
                f"({_gb(alone)} over the {_gb(limit)} usable), at any shorter sequence either; its weights stay in "
                f"host memory and each layer is copied to the GPU as it runs, so expect a fraction of the speed.")
    if plan.parallel == "ddp":
        return (f"DDP over {n} GPUs: {model} fits on each GPU; no sharding traffic, only the LoRA gradients "
                f"are all-reduced.")
    lean = leanest_per_layout(profile, plan, adjust)
    if not plan.cpu_offload:
        return (f"FSDP2 over {n} GPUs: {model} does not fit one GPU beside the rest (DDP needs at least "
                f"{_gb(lean['DDP'])} per GPU, over the {_gb(limit)} usable); sharded {n} ways it is "
                f"{_gb(est.components.get('sharded_weights', 0))} per GPU.")
    return (f"FSDP2 with CPU offload over {n} GPUs: {model} does not fit even sharded {n} ways (at least "
            f"DDP {_gb(lean['DDP'])}, FSDP2 {_gb(lean['FSDP2'])} per GPU, over the {_gb(limit)} usable); the shards "
            f"stay in host memory and each GPU holds only the layers in flight.")


_QUANT_WORDS = {"nf4": "4-bit", "int8": "8-bit", "bf16": "bf16"}
