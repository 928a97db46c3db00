"""The measurement line shared by benchmarks/trainer.py, the hf reference harness and the tables
built from their output (``seq``, ``batch``, ``rank``, ``gc``, optional ``quant``, ``optim``,
``checkpointing``, ``lora_dtype``, ``head_quant``, ``loss_chunk_mb``), read back as the Plan it measured.
Lines without ``loss_chunk_mb`` ran the 256 MB logits chunks of the kernel before it was halved;
``cuda_graphs`` is the number of graphs a line's run captured (absent or 0: its steps ran eagerly,
as every line did before graphs were on by default); ``enabled`` naming ``flat_optimizer`` (or a
grid's ``flat_optimizer``) means the adapters were stepped as one flat tensor."""

from __future__ import annotations

from pathlib import Path

from vramplan.plan import Plan

#: Session 9's held-out campaign of vramplan's trainer as it ships (CUDA graphs with causal captures, default
#: settings): 16 configurations over 8 models in fresh processes, measured after the speed model's and the
#: planner's constants were set. benchmarks/throughput.py and benchmarks/accuracy.py report it apart.
CAMPAIGN = tuple(Path(__file__).resolve().parent / "results" / "session9" / f"trainer-campaign{i}.jsonl" for i in (1, 2))
#: Session 10's runs of the trainer as it then shipped (train_step: the optimizer's step queued before the loss
#: is read), measured after the speed model priced that overlap; held out like CAMPAIGN, reported apart.
OVERLAPPED = (Path(__file__).resolve().parent / "results" / "session10" / "trainer-overlapped.jsonl",)
#: Session 11: the configurations of the accuracy matrix's vramplan half that sessions 1-3 measured on their
#: eager trainer and no later campaign repeated (13: ranks 8-128, bf16, 8-bit AdamW unpaged, batch 2, no and
#: offloaded checkpointing), re-measured on the trainer as it then shipped (graphs, overlapped step), in fresh
#: processes, after the speed model's attention occupancy was committed; held out like CAMPAIGN.
REMEASURED = tuple(Path(__file__).resolve().parent / "results" / "session11" / f"matrix-{name}.jsonl"
                   for name in ("llama", "qwen4b-e2b"))

#: The chunked loss's budget before it became a plan field (kernels/linear_cross_entropy.py, until head_quant)
HISTORICAL_LOSS_CHUNK_MB = 256

#: The harnesses' optimizer names -> the plan's
OPTIMIZERS = {"paged_adamw_8bit": "paged_adamw8bit", "adamw_8bit": "adamw8bit", "adamw": "adamw"}


def plan_of(record: dict, stack: str = "vramplan") -> Plan:
    """The plan a measurement line (or a benchmark grid entry with its ``model``) describes."""
    return Plan(model=record["model"].removesuffix(".json"), quant=record.get("quant") or "nf4",
                lora_rank=record["rank"], seq_len=record["seq"], micro_batch=record["batch"],
                checkpointing=record.get("checkpointing") or ("full" if record["gc"] else "none"),
                optimizer=OPTIMIZERS[record.get("optim") or "paged_adamw_8bit"], stack=stack,
                loss="full" if stack == "hf" else "chunked", lora_dtype=record.get("lora_dtype") or "fp32",
                head_quant=record.get("head_quant") or "bf16", cuda_graphs=bool(record.get("cuda_graphs")),
                flat_optimizer="flat_optimizer" in (record.get("enabled") or "") or bool(record.get("flat_optimizer")),
                mlp_tiles=record.get("mlp_tiles") or 1,
                **({"loss_chunk_mb": record.get("loss_chunk_mb") or HISTORICAL_LOSS_CHUNK_MB} if stack == "vramplan" else {}))


def switches_ran(record: dict) -> dict[str, bool]:
    """The switches a measured line ran under that change what the planner and the speed model price
    (``switches.forced(**switches_ran(line))`` prices it as it ran). The fused 8-bit AdamW: the line
    says so since session 7, and before that only ``VRAMPLAN_ENABLE=fused_optimizer`` turned it on.
    The vocabulary-major int8 head: every line before session 8 walked it token-major. The whole step
    queued (``queued_optimizer``): only lines that say so, none before session 11."""
    return {"fused_optimizer": bool(record.get("fused_optimizer")) or "fused_optimizer" in (record.get("enabled") or ""),
            "int8_vocab_major": bool(record.get("int8_vocab_major")),
            "overlap_optimizer": bool(record.get("overlap_optimizer")),
            "queued_optimizer": bool(record.get("queued_optimizer"))}
