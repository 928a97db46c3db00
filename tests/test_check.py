"""`vramplan check`: the worst micro-batch of a real dataset, the verdict, and exit codes for job scripts."""

import json

import pytest
from click.testing import CliRunner

from tests.train_fixtures import SENTENCES, make_tokenizer, write_jsonl
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.check import predicted_tokens_per_s, worst_micro_batch
from vramplan.cli import main
from vramplan.plan import Plan

RECORDS = [{"text": " ".join(SENTENCES[: 1 + i % len(SENTENCES)])} for i in range(12)]


def _lengths(tokenizer):
    from vramplan.train.data import tokenize

    return [len(tokenize(r, tokenizer)[0]) for r in RECORDS]


def test_packed_worst_batch_is_the_longest_rows():
    tok = make_tokenizer()
    plan = Plan(model="x", seq_len=64, micro_batch=2)
    worst = worst_micro_batch(RECORDS, tok, plan)
    widths = sorted((sum(len(e.input_ids) for e in row) for row in worst.batch_rows), reverse=True)
    assert worst.packed and worst.rows == 2 and worst.width == widths[0] <= 64
    assert worst.total_tokens == sum(_lengths(tok))
    assert "packed into rows of at most 64 tokens" in worst.describe(64)


def test_unpacked_worst_batch_is_the_longest_example_cut_at_seq():
    tok = make_tokenizer()
    longest = max(_lengths(tok))
    worst = worst_micro_batch(RECORDS, tok, Plan(model="x", seq_len=1024, micro_batch=3, stack="hf", loss="full"))
    assert not worst.packed and worst.rows == 3 and worst.width == longest and worst.n_truncated == 0
    cut = worst_micro_batch(RECORDS, tok, Plan(model="x", seq_len=20, stack="hf", loss="full"))
    assert cut.width == 20 and cut.n_truncated == sum(n > 20 for n in _lengths(tok))


def test_throughput_scales_with_the_gpu():
    profile, plan = resolve_model("llama-3.2-1b"), Plan(model="llama-3.2-1b")
    h100, rtx = predicted_tokens_per_s(profile, plan, resolve_gpu("h100")), predicted_tokens_per_s(profile, plan, resolve_gpu("rtx-4060"))
    assert h100 > rtx > 0
    assert predicted_tokens_per_s(profile, plan, resolve_gpu("12GB")) is None


@pytest.fixture
def job(tmp_path):
    """A model folder as `check` needs it (config.json of a real architecture + a tokenizer; no weights) and data."""
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(resolve_model("llama-3.1-8b").config))
    make_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"plan": Plan(model="llama-3.1-8b", quant="bf16", seq_len=2048, lora_rank=16).to_dict()}))
    return folder, data, plan


def check(job, *extra):
    folder, data, plan = job
    return CliRunner().invoke(main, ["check", str(plan), "--model", str(folder), "--data", str(data), *extra])


def test_fits_exits_0_with_headroom_and_time(job):
    result = check(job, "--gpu", "h100")
    assert result.exit_code == 0, result.output
    assert "FITS h100" in result.output and "headroom" in result.output and "tokens/s" in result.output
    assert "calibrated with h100/llama/vramplan" in result.output  # the shipped calibration was used


def test_does_not_fit_exits_1_and_names_the_nearest_plan(job):
    result = check(job, "--gpu", "12GB", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["fits"] is False and data["headroom_bytes"] < 0 and data["headroom_percent"] < 0
    assert data["nearest_plan"]["quant"] != "bf16" and data["nearest_plan"]["seq_len"] == 2048
    assert data["worst_batch"]["width"] < 2048  # short data: the priced batch is the data's, not the plan's
    assert data["estimate"]["plan"]["seq_len"] == data["worst_batch"]["width"]
    text = check(job, "--gpu", "12GB")
    assert "does NOT fit" in text.output and "nearest plan that fits: " in text.output


def test_nothing_fits_still_exits_1(job):
    result = check(job, "--gpu", "0.3GB")
    assert result.exit_code == 1 and "no plan fits" in result.output


def test_bad_input_exits_2(job, tmp_path):
    folder, data, plan = job
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "the cat"}', "not json"])
    assert check((folder, bad, plan), "--gpu", "h100").exit_code == 2
    assert check((folder, data, tmp_path / "missing.json"), "--gpu", "h100").exit_code == 2
    assert check((tmp_path / "nowhere", data, plan), "--gpu", "h100").exit_code == 2
    assert check(job, "--gpu", "no-such-gpu").exit_code == 2


@pytest.mark.gpu
def test_dry_run_runs_the_worst_batch(tmp_path):
    """In its own process, as a user runs it. Inside pytest's, after the other GPU tests, the dry run read 0 bytes above
    its baseline (session 24): what earlier tests left mapped can likely hold a tiny model's steps."""
    import subprocess
    import sys

    from tests.train_fixtures import build_model, llama_config

    folder = build_model(llama_config(), tmp_path / "tiny")
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"plan": Plan(model="tiny", seq_len=64, micro_batch=2).to_dict()}))
    result = subprocess.run([sys.executable, "-m", "vramplan", "check", str(plan), "--model", str(folder), "--data",
                             str(data), "--dry-run", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout)["dry_run"]  # stdout alone: stderr carries progress bars
    assert run["fitted"] and run["nvml_used_delta"] > 0 and run["batch_shape"][0] == 2
