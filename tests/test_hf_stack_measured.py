"""The `--stack hf` estimates against what the standard recipe really used on an H100.

Two sources: the table in FIELD_NOTES (the project's reference measurements) and
benchmarks/results/hf_stack_h100.jsonl (23 more configurations over 7 architectures, measured
by this project with the same harness). Both report process memory above the CUDA context
(pynvml used minus used before loading), so the estimate compared is peak_bytes minus the
cuda_context component.
"""

import json
from pathlib import Path

import pytest

from benchmarks.records import plan_of
from vramplan.catalog import resolve_model
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan

ROOT = Path(__file__).resolve().parent.parent

# FIELD_NOTES, "Measured on the reference GPU": (model, seq, batch, rank, gc, quant, optimizer, process GB)
FIELD_NOTES = [
    ("llama-3.2-1b", 1024, 1, 16, True, "nf4", "paged_adamw8bit", 4.60),
    ("llama-3.2-1b", 2048, 1, 16, True, "nf4", "paged_adamw8bit", 7.81),
    ("llama-3.2-1b", 2048, 1, 16, False, "nf4", "paged_adamw8bit", 21.91),
    ("llama-3.2-1b", 4096, 1, 16, True, "nf4", "paged_adamw8bit", 18.69),
    ("llama-3.2-1b", 2048, 1, 16, True, "bf16", "adamw", 7.28),
    ("gemma-4-e2b-text", 2048, 1, 16, True, "nf4", "paged_adamw8bit", 25.5),
]


def _measured_rows():
    rows = []
    for line in (ROOT / "benchmarks/results/hf_stack_h100.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("error"):
            continue
        plan = plan_of(rec, "hf")
        rows.append((plan.model, plan.seq_len, plan.micro_batch, plan.lora_rank, rec["gc"], plan.quant, plan.optimizer,
                     rec["nvml_used_delta"] / 1e9))
    return rows


def _relative_error(model, seq, batch, rank, gc, quant, optimizer, measured_gb):
    plan = Plan(model=model, quant=quant, lora_rank=rank, seq_len=seq, micro_batch=batch,
                checkpointing="full" if gc else "none", optimizer=optimizer, stack="hf", loss="full")
    est = estimate_plan(plan, resolve_model(model))
    predicted_gb = (est.peak_bytes - est.components["cuda_context"]) / 1e9
    return (predicted_gb - measured_gb) / measured_gb


def _id(row):
    model, seq, batch, rank, gc, quant, optimizer, _ = row
    return f"{model}-s{seq}-b{batch}-r{rank}-{'gc' if gc else 'nogc'}-{quant}-{optimizer}"


@pytest.mark.parametrize("row", FIELD_NOTES, ids=_id)
def test_field_notes_peaks_within_10_percent(row):
    assert abs(_relative_error(*row)) <= 0.10


@pytest.mark.parametrize("row", _measured_rows(), ids=_id)
def test_measured_sweep_within_15_percent(row):
    assert abs(_relative_error(*row)) <= 0.15


def test_measured_sweep_mean_error_under_8_percent():
    errors = [abs(_relative_error(*row)) for row in _measured_rows() + FIELD_NOTES]
    assert sum(errors) / len(errors) <= 0.08
