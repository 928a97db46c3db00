"""`vramplan estimate` and `vramplan fit` through click's CliRunner, bad inputs included."""

import json

import pytest
from click.testing import CliRunner

from vramplan.cli import main
from vramplan.plan import read_plan


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_estimate_json_has_the_contract():
    result = run("estimate", "llama-3.2-1b", "--stack", "hf", "--seq", "2048", "--gpu", "rtx-4060", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert isinstance(data["peak_bytes"], int) and data["fits"] is False
    assert data["components"]["cuda_context"] > 0
    assert sum(data["components"].values()) == data["peak_bytes"]
    assert data["plan"]["stack"] == "hf" and data["plan"]["loss"] == "full"


def test_estimate_table_for_people():
    result = run("estimate", "gemma-4-e2b-text", "--gpu", "rtx-4060")
    assert result.exit_code == 0, result.output
    assert "share" in result.output and "fits rtx-4060" in result.output and "backward phase" in result.output


def test_estimate_plot(tmp_path):
    out = tmp_path / "bar.png"
    result = run("estimate", "llama-3.2-1b", "--gpu", "rtx-4060", "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_fit_writes_a_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    result = run("fit", "gemma-4-e2b-text", "--gpu", "rtx-4060", "--seq", "2048", "--json", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fits"] is True and data["explanation"]
    written = json.loads(out.read_text())
    assert set(written) == {"plan", "peak_bytes", "components", "gpu"}
    assert read_plan(out).seq_len == 2048


def test_a_t4_plan_computes_in_fp16(tmp_path):
    """The T4 has no bf16 arithmetic: the estimate and the plan file that fit writes for it compute in fp16."""
    estimate = run("estimate", "llama-3.2-1b", "--gpu", "t4")
    assert estimate.exit_code == 0 and "computes in fp16" in estimate.output.splitlines()[0]
    out = tmp_path / "plan.json"
    assert run("fit", "llama-3.2-1b", "--gpu", "t4", "--out", str(out)).exit_code == 0
    assert read_plan(out).compute_dtype == "fp16"
    assert "computes in fp16" not in run("estimate", "llama-3.2-1b", "--gpu", "rtx-4060").output


def test_model_folder_and_config_path(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
                                                    "num_hidden_layers": 4, "num_attention_heads": 8, "vocab_size": 32000}))
    for target in (str(folder), str(folder / "config.json")):
        result = run("estimate", target, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["fits"] is None


@pytest.mark.parametrize("args,expected", [
    (("estimate", "lama-3.2-1b"), "did you mean llama-3.2-1b"),
    (("estimate", "llama-3.2-1b", "--seq", "-5"), "seq_len"),
    (("estimate", "llama-3.2-1b", "--rank", "0"), "lora_rank"),
    (("estimate", "llama-3.2-1b", "--seq", "99999999"), "seq_len"),
    (("estimate", "llama-3.2-1b", "--gpu", "rtx-9999"), "unknown GPU"),
    (("fit", "llama-3.2-1b", "--gpu", "0.5GB"), "nothing fits"),
    (("fit", "llama-3.2-1b", "--gpu", "rtx-4060", "--batch", "0"), "micro_batch"),
])
def test_bad_inputs_are_one_line_errors(args, expected):
    result = run(*args)
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0


def test_malformed_config(tmp_path):
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    result = run("estimate", str(broken))
    assert result.exit_code != 0 and "not valid JSON" in result.output
    broken.write_text(json.dumps({"model_type": "llama", "hidden_size": 512}))
    result = run("estimate", str(broken))
    assert result.exit_code != 0 and "num_hidden_layers" in result.output and "Traceback" not in result.output


def test_gpu_auto_without_a_gpu_is_a_clean_error():
    pytest.importorskip("vramplan.gpu", exc_type=ImportError)
    result = run("fit", "llama-3.2-1b", "--gpu", "auto")
    if result.exit_code == 0:
        pytest.skip("a GPU is present")
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
