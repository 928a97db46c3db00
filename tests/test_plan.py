import json

import pytest

from vramplan.atomic import write_json_atomic
from vramplan.errors import VramplanError
from vramplan.plan import Plan, read_plan


def test_plan_round_trips_through_a_file(tmp_path):
    plan = Plan(model="gemma-4-e2b", lora_rank=32, seq_len=4096, micro_batch=2, grad_accum=8)
    path = tmp_path / "plan.json"
    write_json_atomic(path, {"plan": plan.to_dict(), "peak_bytes": 123})
    assert read_plan(path) == plan
    assert plan.alpha == 64
    assert plan.effective_batch == 16


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"quant": "fp8"}, "quant"),
        ({"seq_len": -5}, "seq_len"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"lora_targets": ()}, "lora_targets"),
    ],
)
def test_bad_fields_are_named(changes, words):
    with pytest.raises(VramplanError, match=words):
        Plan(model="x", **changes)


def test_unknown_fields_and_bad_json_are_one_line_errors(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"model": "x", "sequence": 5}))
    with pytest.raises(VramplanError, match="unknown plan field"):
        read_plan(path)
    path.write_text("{not json")
    with pytest.raises(VramplanError, match="not valid JSON"):
        read_plan(path)
    with pytest.raises(VramplanError, match="does not exist"):
        read_plan(tmp_path / "missing.json")
