"""benchmarks/accuracy.py --from-results on the committed H100 measurements: the error it reports, and the
shipped calibrations it writes."""

import json
from pathlib import Path

import pytest

from benchmarks.accuracy import from_results
from vramplan.calibration import read_calibration_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    result = from_results(out_dir=out, calibration_dir=out / "calibration", plot=True)
    return out, result


def test_rows_have_the_contract(built):
    out, result = built
    rows = json.loads((out / "accuracy.json").read_text())
    assert rows == json.loads(json.dumps(result["rows"]))
    assert {r["stack"] for r in rows} == {"hf", "vramplan"} and len({r["model"] for r in rows}) == 7
    for row in rows:
        assert {"model", "stack", "gpu", "measured_bytes", "predicted_bytes", "calibrated_bytes",
                "used_for_calibration"} <= set(row)
        assert isinstance(row["used_for_calibration"], bool) and row["measured_bytes"] > 0
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "held out" in (out / "accuracy.md").read_text()


def test_calibrated_on_a_few_per_architecture_and_held_out_on_the_rest(built):
    rows = built[1]["rows"]
    calibrating = [r for r in rows if r["used_for_calibration"]]
    assert len(calibrating) == len({(r["stack"], r["model"]) for r in rows})  # one per model and stack
    held = [r for r in rows if not r["used_for_calibration"]]
    assert len(held) >= 15


def test_errors_against_the_issue_targets(built):
    """Measured on the committed data (35 rows: 23 hf-stack, 12 trainer runs, 7 architectures):
    uncalibrated 3.5% mean / 8.4% max, inside the issue's 8% / 15%. Calibrated (one point per model
    and stack, held-out rows only): 3.7% mean / 17.6% max, NOT yet inside 3% / 6%: a one-point ratio
    inflates Qwen3-0.6B at 4096 tokens, a run that measured less than the same model at 2048
    (issue 5 stays open on this)."""
    stats = built[1]["summary"]
    assert stats["uncalibrated_all"]["n"] >= 35
    assert stats["uncalibrated_all"]["mean"] <= 0.08 and stats["uncalibrated_all"]["max"] <= 0.15
    assert stats["calibrated_held_out"]["mean"] <= 0.04


def test_the_shipped_calibrations_are_what_the_committed_data_gives(built):
    out = built[0]
    for stack in ("hf", "vramplan"):
        shipped = read_calibration_file(ROOT / f"profiles/calibration/h100-{stack}.json")
        rebuilt = read_calibration_file(out / "calibration" / f"h100-{stack}.json")
        assert [c.key for c in shipped] == [c.key for c in rebuilt]
        for a, b in zip(shipped, rebuilt):
            assert a.points == b.points and a.fit == pytest.approx(b.fit)
