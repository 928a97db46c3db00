"""The default `--stack vramplan` estimate against what vramplan's trainer used on an H100
(benchmarks/results/trainer_h100.jsonl: process memory above the CUDA context)."""

import json
from pathlib import Path

import pytest

from vramplan.catalog import resolve_model
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan

ROWS = [json.loads(line) for line in (Path(__file__).resolve().parent.parent / "benchmarks/results/trainer_h100.jsonl")
        .read_text().splitlines()]
ROWS = [r for r in ROWS if "nvml_used_delta" in r]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['model']}-s{r['seq']}")
def test_trainer_measurements_within_8_percent(row):
    plan = Plan(model=row["model"], seq_len=row["seq"], micro_batch=row["batch"], lora_rank=row["rank"])
    est = estimate_plan(plan, resolve_model(row["model"]))
    predicted = est.peak_bytes - est.components["cuda_context"]
    assert abs(predicted - row["nvml_used_delta"]) <= 0.08 * row["nvml_used_delta"]
