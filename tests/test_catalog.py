"""The catalog loader: GPU names, budgets and boxes, the data's own sanity, and one-line errors
for broken profiles (built in a temporary profiles folder)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from vramplan import catalog
from vramplan.catalog import (
    GpuSpec,
    clear_caches,
    list_gpus,
    list_models,
    resolve_gpu,
    resolve_model,
)
from vramplan.cli import main
from vramplan.errors import VramplanError

GiB = 2**30
REQUIRED_GPUS = [
    "rtx-2060", "rtx-2070", "rtx-2080-ti", "rtx-3060", "rtx-3070", "rtx-3080", "rtx-3090",
    "rtx-4060", "rtx-4060-ti-16gb", "rtx-4070", "rtx-4080", "rtx-4090",
    "rtx-5060-ti-16gb", "rtx-5070", "rtx-5080", "rtx-5090", "rtx-4060-laptop", "rtx-4090-laptop",
    "t4", "l4", "a10", "a100-40gb", "a100-80gb", "h100", "h100-pcie", "h200", "l40s", "rtx-6000-ada",
    "mi300x", "m3-max-128gb", "m4-max-64gb",
]  # fmt: skip


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """A copy of the profiles folder that a test may break, made the active one through VRAMPLAN_PROFILES."""
    shutil.copytree(catalog.PROFILES_DIR, tmp_path / "profiles")
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(tmp_path / "profiles"))
    clear_caches()
    yield tmp_path / "profiles"
    clear_caches()


def edit_gpus(folder, change):
    path = folder / "gpus.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    clear_caches()


def one_line_error(call) -> str:
    with pytest.raises(VramplanError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the GPU data


def test_catalog_holds_the_required_gpus():
    names = {spec.name for spec in list_gpus()}
    assert set(REQUIRED_GPUS) <= names
    assert len(names) >= 28


def test_memory_is_exact_and_speeds_are_consistent():
    by_name = {spec.name: spec for spec in list_gpus()}
    assert by_name["rtx-4060"].memory_bytes == 8 * GiB
    assert by_name["rtx-4090"].memory_bytes == 24 * GiB
    assert by_name["h100"].memory_bytes == 80 * GiB
    for spec in list_gpus():
        assert spec.count == 1 and spec.bandwidth_gbs > 0 and spec.fp16_tflops > 0, spec.name
        if spec.supports_bf16:
            assert spec.bf16_tflops > 0, spec.name
        assert spec.unified_memory == (spec.kind == "unified"), spec.name
    for turing in ("rtx-2060", "rtx-2070", "rtx-2080-ti", "t4"):
        assert not by_name[turing].supports_bf16 and by_name[turing].bf16_tflops == 0
    # dense rates, no sparsity: the H100 SXM's dense BF16 is 989 TFLOP/s, not 1979
    assert 900 < by_name["h100"].bf16_tflops < 1000
    assert by_name["rtx-4090"].bf16_tflops > by_name["rtx-4060"].bf16_tflops
    assert by_name["m3-max-128gb"].kind == "unified" and by_name["rtx-4060-laptop"].kind == "laptop"


def test_catalog_about_is_dated():
    about = json.loads((catalog.PROFILES_DIR / "gpus.json").read_text())["_about"]
    assert about["date"] == "2026-11" and about["sources"]


# ---------------------------------------------------------------- names, budgets, boxes


def test_names_and_aliases_are_case_insensitive():
    assert resolve_gpu("RTX-4090") == resolve_gpu("4090") == resolve_gpu(" rtx-4090 ")
    assert resolve_gpu("h100-sxm").name == "h100"


@pytest.mark.parametrize("typo, suggestion", [("rtx-4069", "rtx-4060"), ("h1OO", "h100"), ("rtx4090", "rtx-4090")])
def test_unknown_gpu_suggests_close_names(typo, suggestion):
    message = one_line_error(lambda: resolve_gpu(typo))
    assert f"unknown GPU '{typo}'" in message and suggestion in message and "--gpu 12GB" in message


def test_unknown_model_suggests_close_names():
    message = one_line_error(lambda: resolve_model("qwen3-8"))
    assert "qwen3-8b" in message and "vramplan models" in message


@pytest.mark.parametrize(
    "text, expected",
    [("12GB", 12 * 10**9), ("24GiB", 24 * GiB), ("12 gb", 12 * 10**9), ("7.5G", 7_500_000_000)],
)
def test_budgets(text, expected):
    spec = resolve_gpu(text)
    assert spec.memory_bytes == expected and spec.kind == "budget" and spec.bf16_tflops == 0


@pytest.mark.parametrize("text", ["0GB", "-3GB", "0.0GiB", "200000GB"])
def test_impossible_budgets_are_rejected(text):
    message = one_line_error(lambda: resolve_gpu(text))
    assert message.startswith(f"--gpu {text}:") and "more than 0" in message


def test_boxes():
    box = resolve_gpu("8xh100")
    single = resolve_gpu("h100")
    assert box.count == 8 and box.name == "8xh100" and box.memory_bytes == single.memory_bytes
    assert resolve_gpu("2 x rtx-4090").count == 2
    assert "1 to 64" in one_line_error(lambda: resolve_gpu("65xh100"))
    assert "unknown GPU" in one_line_error(lambda: resolve_gpu("8xfoo"))


# ---------------------------------------------------------------- broken profiles


@pytest.mark.parametrize(
    "change, field, wanted",
    [
        (lambda d: d["gpus"][0].update(memory_bytes="8GB"), "memory_bytes", "positive integer"),
        (lambda d: d["gpus"][0].update(memory_bytes=True), "memory_bytes", "positive integer"),
        (lambda d: d["gpus"][0].update(bandwidth_gbs=-1), "bandwidth_gbs", "number >= 0"),
        (lambda d: d["gpus"][0].update(supports_bf16="yes"), "supports_bf16", "true or false"),
        (lambda d: d["gpus"][0].update(kind="desktop"), "kind", "one of consumer"),
        (lambda d: d["gpus"][0].update(price_usd=0), "price_usd", "positive number or null"),
        (lambda d: d["gpus"][0].update(aliases="2060"), "aliases", "list of non-empty strings"),
        (lambda d: d["gpus"][0].update(bandwith_gbs=300), "bandwith_gbs", "did you mean bandwidth_gbs"),
        (lambda d: d["gpus"][0].update(bf16_tflops=10.0), "bf16_tflops", "supports_bf16"),
        (lambda d: d["gpus"][0].update(unified_memory=True), "unified_memory", "unified"),
        (lambda d: d["gpus"][0].pop("label"), "label", "missing"),
    ],
)
def test_malformed_gpu_entry_names_file_index_and_field(profiles, change, field, wanted):
    edit_gpus(profiles, change)  # gpus[0] is the RTX 2060: no bf16, not unified
    message = one_line_error(list_gpus)
    assert str(profiles / "gpus.json") in message and "gpus[0]" in message
    assert f"'{field}'" in message and wanted in message


def test_duplicate_alias_is_rejected(profiles):
    edit_gpus(profiles, lambda d: d["gpus"][1]["aliases"].append("2060"))
    message = one_line_error(lambda: resolve_gpu("rtx-4090"))
    assert "gpus[1]" in message and "'2060' is already used by rtx-2060" in message


def test_invalid_json_names_the_line(profiles):
    (profiles / "gpus.json").write_text('{"gpus": [\n  {"name": "x",}\n]}')
    clear_caches()
    message = one_line_error(list_gpus)
    assert "gpus.json is not valid JSON (line 2)" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["_vramplan"].update(published_params="1B"), "'published_params' must be a positive integer or null"),
        (lambda d: d["_vramplan"].update(published_params=-5), "'published_params' must be a positive integer or null"),
        (lambda d: d["_vramplan"].update(published_counts="everything"), "'published_counts' must be one of all"),
        (lambda d: d["_vramplan"].update(hf=1), "unknown field 'hf'"),
        (lambda d: d.pop("model_type"), "'model_type' is missing"),
        (lambda d: d.update(text_config=[1]), "'text_config' must be an object"),
    ],
)
def test_malformed_model_profile_names_file_and_field(profiles, change, expected):
    path = profiles / "models" / "llama-3.2-1b.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    message = one_line_error(lambda: resolve_model("llama-3.2-1b"))
    assert str(path) in message and expected in message


# ---------------------------------------------------------------- where profiles come from


def test_profiles_folder_from_the_environment(profiles):
    (profiles / "models" / "tiny.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    clear_caches()
    assert "tiny" in list_models() and resolve_model("tiny").config["hidden_size"] == 64
    edit_gpus(profiles, lambda d: d.update(gpus=[{"name": "only", "label": "Only GPU", "memory_bytes": GiB}]))
    assert [spec.name for spec in list_gpus()] == ["only"]


def test_profiles_folder_as_an_argument(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [{"name": "g", "label": "G", "memory_bytes": 5}]}))
    assert list_models(tmp_path) == ["tiny"]
    assert resolve_gpu("g", profiles=tmp_path) == GpuSpec(name="g", label="G", memory_bytes=5)
    assert "gemma-4-e2b" in list_models()  # the packaged folder is untouched


def test_a_config_json_path_is_a_profile(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 32}))
    assert resolve_model(str(folder)).name == "my-model"
    assert resolve_model(str(folder / "config.json")).config["hidden_size"] == 32


# ---------------------------------------------------------------- vramplan gpus / models


def test_cli_gpus_table_and_json():
    runner = CliRunner()
    shown = runner.invoke(main, ["gpus"])
    assert shown.exit_code == 0, shown.output
    assert "bf16 TFLOP/s" in shown.output and "NVIDIA GeForce RTX 4060 Laptop GPU" in shown.output
    listed = json.loads(runner.invoke(main, ["gpus", "--json"]).output)
    assert [g["name"] for g in listed] == [spec.name for spec in list_gpus()]
    h100 = next(g for g in listed if g["name"] == "h100")
    assert h100["memory_bytes"] == 80 * GiB and h100["rent_usd_per_hour"] > 0


def test_cli_models_table_and_json():
    runner = CliRunner()
    shown = runner.invoke(main, ["models"])
    assert shown.exit_code == 0, shown.output
    assert "gemma-4-31b" in shown.output and "published params" in shown.output
    listed = {m["name"]: m for m in json.loads(runner.invoke(main, ["models", "--json"]).output)}
    assert listed["llama-3.2-1b"]["hidden_size"] == 2048 and listed["llama-3.2-1b"]["published_params"] == 1_235_814_400
    assert listed["gemma-4-e2b"]["num_hidden_layers"] == 35  # read from text_config


def test_cli_broken_catalog_is_one_line_and_exit_2(profiles):
    edit_gpus(profiles, lambda d: d["gpus"][0].update(memory_bytes="8GB"))
    result = CliRunner().invoke(main, ["gpus"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and "memory_bytes" in result.output
