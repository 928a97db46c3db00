"""The calibration store and correction: fits, round trips through files, matching, and the CLI saying so."""

import json

import pytest
from click.testing import CliRunner

from vramplan.calibrate import refuse_if_over, run_calibration
from vramplan.calibration import (CalibrationKey, CalibrationPoint, add_point, apply_calibration, cache_dir,
                                  calibration_for, find_calibration, fit_correction, new_calibration, point_from,
                                  read_calibration_file, shipped_dir, split_estimate, transfer_weight)
from vramplan.catalog import resolve_model
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan

KEY = CalibrationKey(gpu="h100", family="llama", stack="vramplan", driver_major=570, torch_minor="2.11")


def _estimate(**changes):
    plan = Plan(model="llama-3.2-1b", **changes)
    return estimate_plan(plan, resolve_model("llama-3.2-1b"))


def _points(a, b, c=0.0):
    """Points whose 'measurements' follow a·static + b·per_token + c exactly, from real estimates."""
    # three configurations, each at two lengths as a calibration measures them (only shapes of one
    # configuration separate the parts), gigabytes of per-token bytes apart so that the 64 MiB
    # measurement noise leaves both factors pinned down and the fit stays linear
    plans = [dict(seq_len=4096, checkpointing="none"), dict(seq_len=2048, checkpointing="none"),
             dict(seq_len=4096, quant="bf16"), dict(seq_len=2048, quant="bf16"),
             dict(seq_len=8192, lora_rank=64), dict(seq_len=4096, lora_rank=64)]
    points = []
    for changes in plans:
        est = _estimate(**changes)
        static, per_token = split_estimate(est)
        points.append(point_from(est, int(a * static + b * per_token + c)))
    return points


def test_one_point_is_a_ratio():
    point = _points(1.1, 1.1)[0]
    fit = fit_correction([point])
    assert fit["kind"] == "ratio"
    assert fit["a"] == fit["b"] == pytest.approx(point.measured_bytes / point.predicted_bytes)


def test_linear_fit_recovers_the_two_factors_without_an_intercept_below_five_points():
    fit = fit_correction(_points(1.08, 0.9)[:3])
    assert fit["kind"] == "linear" and fit["c"] == 0.0
    assert fit["a"] == pytest.approx(1.08, rel=1e-3) and fit["b"] == pytest.approx(0.9, rel=1e-3)


def test_intercept_fitted_from_five_points():
    fit = fit_correction(_points(1.02, 0.95, c=3e8))
    assert fit["c"] == pytest.approx(3e8, rel=1e-2)


def test_implausible_factors_fall_back_to_a_ratio():
    points = _points(1.0, 1.0)[:2]
    wild = [CalibrationPoint(p.model, p.static_bytes, p.per_token_bytes, m, p.plan)
            for p, m in zip(points, (points[0].predicted_bytes * 3, points[1].predicted_bytes // 3))]
    assert fit_correction(wild)["kind"] == "ratio"


def test_out_of_memory_points_are_kept_but_never_fitted():
    good = _points(1.1, 1.1)[0]
    oom = CalibrationPoint("llama-3.2-1b", 10**9, 10**9, 5 * 10**9, fitted=False)
    assert fit_correction([good, oom])["a"] == pytest.approx(good.measured_bytes / good.predicted_bytes)
    with pytest.raises(VramplanError, match="at least one run that fitted"):
        fit_correction([oom])


def test_apply_keeps_the_context_sums_the_components_and_says_so():
    """A plan the calibration did not measure gets the share of the fit that carries to another configuration."""
    est = _estimate(seq_len=2048)
    calibration = new_calibration(KEY, _points(1.1, 0.8)[:3])
    corrected, note = apply_calibration(est, calibration)
    assert corrected.components["cuda_context"] == est.components["cuda_context"]
    assert sum(corrected.components.values()) == corrected.peak_bytes
    static, per_token = split_estimate(est)
    w = transfer_weight(calibration.points)
    assert calibration.fit["a"] == pytest.approx(1.1) and calibration.fit["b"] == pytest.approx(0.8)
    expected = (1 + w * 0.1) * static + (1 - w * 0.2) * per_token
    assert corrected.peak_bytes - est.components["cuda_context"] == pytest.approx(expected, abs=16)
    assert corrected.phases[corrected.peak_phase] == pytest.approx(corrected.peak_bytes, rel=1e-6)
    assert "calibrated with h100/llama/vramplan" in note and note in corrected.notes and "60% carried" in note
    assert apply_calibration(est, None) == (est, None)


def test_a_measured_plan_gets_its_measurement():
    """The configuration a calibration ran is no longer unknown: its estimate is what was measured,
    even where the fit pools it with other runs (a ratio over two models here) and misses it."""
    small = _estimate(seq_len=512)
    large = estimate_plan(Plan(model="llama-3.1-8b", seq_len=2048), resolve_model("llama-3.1-8b"))
    points = [point_from(small, int(1.02 * sum(split_estimate(small)))),
              point_from(large, int(0.94 * sum(split_estimate(large))))]
    calibration = new_calibration(KEY, points)
    assert calibration.fit["kind"] == "ratio" and abs(calibration.fit["a"] - 1.02) > 0.05
    for est, point in ((small, points[0]), (large, points[1])):
        corrected, _ = apply_calibration(est, calibration)
        assert corrected.peak_bytes - est.components["cuda_context"] == point.measured_bytes
        assert calibration.correct(est) == point.measured_bytes
    other = _estimate(seq_len=1024)  # the same model at another length: not measured, the transferred fit
    w = transfer_weight(points)
    transferred = (1 + w * (calibration.fit["a"] - 1)) * sum(split_estimate(other))
    assert calibration.correct(other) == pytest.approx(transferred)


def test_the_per_token_factor_comes_only_from_shapes_of_one_configuration():
    """Runs of two models, each off its estimate by its own fixed bytes (configuration errors, not a
    static or a per-token one): no pair of shapes of one configuration, so one ratio, where a fit across
    them would invent two factors; the half-length twin of one of them separates the parts again."""
    small = _estimate(seq_len=2048, checkpointing="none")
    large = estimate_plan(Plan(model="llama-3.1-8b", seq_len=2048), resolve_model("llama-3.1-8b"))
    points = [point_from(small, sum(split_estimate(small)) + 300_000_000),
              point_from(large, sum(split_estimate(large)) - 900_000_000)]
    assert fit_correction(points)["kind"] == "ratio"
    twin = _estimate(seq_len=4096, checkpointing="none")
    (s, t), (s2, t2) = split_estimate(small), split_estimate(twin)
    assert s == s2 and t2 > t + 2e9
    points[0] = point_from(small, int(1.05 * s + 0.9 * t))
    fit = fit_correction(points + [point_from(twin, int(1.05 * s2 + 0.9 * t2))])
    assert fit["kind"] == "linear" and fit["b"] == pytest.approx(0.9, rel=1e-4)


def test_the_transfer_weight_counts_configurations_not_shapes():
    """The best estimate of the key's part from m configurations: KEY² / (KEY² + CONFIGURATION² / m)."""
    from vramplan.calibration import CONFIGURATION_SPREAD, KEY_SPREAD, configurations

    pair, other = _points(1.0, 1.0)[:2], _points(1.0, 1.0)[2:4]
    assert configurations(pair) == 1 and configurations(pair + other) == 2
    one = KEY_SPREAD**2 / (KEY_SPREAD**2 + CONFIGURATION_SPREAD**2)
    assert transfer_weight(pair) == pytest.approx(one) and transfer_weight(pair[:1]) == pytest.approx(one)
    assert 0.4 < one < 0.5 and one < transfer_weight(pair + other) < 1
    oom = CalibrationPoint("llama-3.2-1b", 10**9, 10**9, 5 * 10**9, fitted=False)
    assert transfer_weight([oom]) == 0.0


def test_files_written_before_the_transfer_still_load(tmp_path):
    """The file format is unchanged: a fit's kind, a, b and (optional) c; the points say how many
    configurations were measured. An entry without c (the oldest) reads as c = 0; the shipped ones load."""
    calibration = new_calibration(KEY, _points(1.1, 0.9)[:1])
    old = calibration.to_dict()
    old["fit"] = {k: old["fit"][k] for k in ("kind", "a", "b")}
    (tmp_path / "old.json").write_text(json.dumps([old]))
    [read] = read_calibration_file(tmp_path / "old.json")
    assert read.fit == calibration.fit and read.points == calibration.points
    est = _estimate(seq_len=2048)
    assert read.correct(est) == calibration.correct(est)
    shipped = [c for path in sorted(shipped_dir().glob("*.json")) for c in read_calibration_file(path)]
    assert len(shipped) >= 7 and all(c.fit["kind"] in ("ratio", "linear") for c in shipped)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "calibration"
    monkeypatch.delenv("VRAMPLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vramplan" / "calibration"


def test_store_round_trip_adds_points_and_refits(tmp_path):
    first, second = _points(1.1, 0.9)[:2]
    add_point(KEY, first, tmp_path)
    stored = add_point(KEY, second, tmp_path)
    [read] = read_calibration_file(tmp_path / f"{KEY.slug()}.json")
    assert read.key == KEY and len(read.points) == 2 and read.fit == pytest.approx(stored.fit)
    assert read.fit["kind"] == "linear" and read.created.startswith("20")
    assert find_calibration("h100", "llama", "vramplan", directories=[tmp_path]).points == read.points
    assert find_calibration("h100", "qwen3", "vramplan", directories=[tmp_path]) is None
    assert find_calibration("a100-80gb", "llama", "vramplan", directories=[tmp_path]) is None


def test_same_driver_and_torch_win_then_the_cache_wins_a_tie(tmp_path):
    cache, shipped = tmp_path / "cache", tmp_path / "shipped"
    point = _points(1.1, 1.1)[0]
    add_point(KEY, point, cache)
    other = CalibrationKey(gpu="h100", family="llama", stack="vramplan", driver_major=535, torch_minor="2.4")
    add_point(other, point, shipped)
    dirs = [cache, shipped]
    assert find_calibration("h100", "llama", "vramplan", 535, "2.4", dirs).key == other
    assert find_calibration("h100", "llama", "vramplan", 570, "2.11", dirs).key == KEY
    add_point(KEY, point, shipped)
    assert find_calibration("h100", "llama", "vramplan", 570, "2.11", dirs).source.startswith(str(cache))


def test_a_malformed_file_names_itself(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"key": {"gpu": "h100"}, "points": [], "fit": {}}))
    with pytest.raises(VramplanError, match="bad.json"):
        find_calibration("h100", "llama", "hf", directories=[tmp_path])


def test_shipped_calibrations_cover_the_measured_families():
    for family, model in (("llama", "llama-3.1-8b"), ("qwen3", "qwen3-4b"), ("gemma3", "gemma-3-1b"), ("gemma4", "gemma-4-e4b")):
        assert calibration_for(resolve_model(model), "hf", "h100").key.family == family
    cal = calibration_for(resolve_model("gemma-4-e2b-text"), "hf", "h100")
    assert cal.key.family == "gemma4" and cal.source.endswith("h100-hf.json")
    assert calibration_for(resolve_model("llama-3.2-1b"), "hf", "rtx-4060") is None


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_estimate_and_fit_say_they_were_calibrated():
    calibrated = run("estimate", "llama-3.2-1b", "--stack", "hf", "--gpu", "h100", "--json")
    plain = run("estimate", "llama-3.2-1b", "--stack", "hf", "--gpu", "h100", "--json", "--no-calibration")
    calibrated, plain = json.loads(calibrated.output), json.loads(plain.output)
    assert any("calibrated with h100/llama/hf" in n for n in calibrated["notes"])
    assert not any("calibrated" in n for n in plain["notes"])
    assert calibrated["peak_bytes"] != plain["peak_bytes"]
    fit = run("fit", "qwen3-0.6b", "--gpu", "h100", "--stack", "hf")
    assert fit.exit_code == 0 and "note: calibrated with h100/qwen3/hf" in fit.output
    budget = run("estimate", "llama-3.2-1b", "--gpu", "12GB")
    assert "calibrated" not in budget.output


def test_a_user_calibration_changes_the_fit(tmp_path, monkeypatch):
    """A measurement that says the plan needs twice the memory must make fit choose a leaner plan."""
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path))
    base = json.loads(run("fit", "llama-3.2-1b", "--gpu", "rtx-4060", "--json").output)
    key = CalibrationKey(gpu="rtx-4060", family="llama", stack="vramplan")
    est = _estimate(seq_len=2048)
    add_point(key, point_from(est, 2 * (est.peak_bytes - est.components["cuda_context"])))
    after = json.loads(run("fit", "llama-3.2-1b", "--gpu", "rtx-4060", "--json").output)
    assert after["peak_bytes"] <= base["budget_bytes"] and after["plan"] != base["plan"]
    assert any("calibrated with rtx-4060/llama/vramplan" in n for n in after["notes"])


def test_refuses_a_dry_run_the_prediction_says_cannot_fit():
    est = _estimate(seq_len=2048)
    refuse_if_over(est, est.peak_bytes)
    with pytest.raises(VramplanError, match="predicted to need"):
        refuse_if_over(est, est.peak_bytes - 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the machine without a GPU")
def test_calibrate_without_a_gpu_is_one_line_naming_gpu(tmp_path):
    with pytest.raises(VramplanError) as err:
        run_calibration(Plan(model="llama-3.2-1b"), str(tmp_path))
    assert "--gpu" in str(err.value) and "\n" not in str(err.value)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"plan": Plan(model="llama-3.2-1b").to_dict()}))
    result = run("calibrate", str(plan), "--model", str(tmp_path))
    assert result.exit_code == 2 and "--gpu" in result.output and result.output.count("\n") == 1
    fit = run("fit", "llama-3.2-1b", "--gpu", "auto", "--calibrate", "--model", str(tmp_path))
    assert fit.exit_code == 2 and "--gpu" in fit.output


def test_fit_calibrate_needs_a_model_folder_and_this_gpu(tmp_path):
    assert "--model DIR" in run("fit", "llama-3.2-1b", "--gpu", "auto", "--calibrate").output
    wrong = run("fit", "llama-3.2-1b", "--gpu", "h100", "--calibrate", "--model", str(tmp_path))
    assert wrong.exit_code == 2 and "use --gpu auto" in wrong.output


@pytest.mark.gpu
def test_calibrate_a_tiny_model_on_the_gpu(tmp_path, monkeypatch):
    from tests.train_fixtures import build_model, llama_config

    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    folder = build_model(llama_config(), tmp_path / "tiny")
    for stack in ("vramplan", "hf"):
        plan = Plan(model="tiny", seq_len=128, micro_batch=2, stack=stack, loss="full" if stack == "hf" else "chunked")
        result = run_calibration(plan, str(folder), steps=2, also_in=tmp_path / "commit")
        assert result.run.fitted and result.run.steps == 2 and result.run.batch_shape == (2, 128)
        assert result.run.measured_process_bytes > 0 and result.run.allocated_by_phase["backward"] > 0
        # the plan's shape and the same plan at half the sequence, both stored
        assert result.shorter_run is not None and result.shorter_run.batch_shape == (2, 64)
        assert result.shorter_run.fitted and result.shorter_run.baseline_used == result.run.baseline_used
        assert result.calibration is not None and len(result.calibration.points) == 2
        assert [p.plan["seq_len"] for p in result.calibration.points] == [128, 64]
        assert result.calibration.source.startswith(str(tmp_path / "cache"))
        assert (tmp_path / "commit" / f"{result.key.slug()}.json").exists()


def test_random_batch_is_the_worst_case_shape_each_stack_expects():
    from vramplan.calibrate import random_batch

    ours = random_batch(Plan(model="x", seq_len=32, micro_batch=3), vocab_size=50)
    assert ours["input_ids"].shape == (3, 32) and (ours["labels"][:, :-1] == ours["input_ids"][:, 1:]).all()
    assert (ours["labels"][:, -1] == -100).all() and ours["position_ids"][2, 31] == 31
    hf = random_batch(Plan(model="x", seq_len=32, micro_batch=3, stack="hf", loss="full"), vocab_size=50)
    assert (hf["labels"] == hf["input_ids"]).all() and "position_ids" not in hf


def test_out_of_memory_is_recognised_in_its_library_forms():
    import torch

    from vramplan.calibrate import _is_out_of_memory

    assert _is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert _is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))


def test_report_compares_each_phase_and_the_process(tmp_path):
    from vramplan.calibrate import CalibrationResult, MeasuredRun, predicted_allocated_by_phase
    from vramplan.cli.cmd_calibrate import report_lines

    est = _estimate(seq_len=2048)
    phases = predicted_allocated_by_phase(est)
    assert phases["load"] == est.phases["load"] - est.components["cuda_context"] - est.components["cuda_libraries"]
    above = est.peak_bytes - est.components["cuda_context"]
    run_ = MeasuredRun(plan=est.plan, fitted=True, steps=3, measured_process_bytes=int(above / 1.1),
                       after_load_allocated=phases["load"], batch_shape=(1, 2048),
                       allocated_by_phase={"forward": phases["forward"], "backward": phases["backward"], "optimizer": 1})
    stored = add_point(KEY, point_from(est, run_.measured_process_bytes), tmp_path)
    text = "\n".join(report_lines(CalibrationResult(est, run_, KEY, stored, 80 * 10**9)))
    assert "+10.0%" in text and "calibrated prediction" in text and "+0.0%" in text and "stored in" in text
    oom = MeasuredRun(plan=est.plan, fitted=False, steps=0, measured_process_bytes=10**9, error="out of memory: x")
    assert "did NOT fit at 8.00 GB free" in "\n".join(report_lines(CalibrationResult(est, oom, KEY, None, 8 * 10**9)))


def test_the_second_shape_is_the_plan_at_half_the_sequence():
    from vramplan.calibrate import MIN_SHORTER_SEQ, shorter_shape

    plan = Plan(model="llama-3.2-1b", seq_len=4096, micro_batch=2, lora_rank=64, checkpointing="offload")
    short = shorter_shape(plan)
    assert short == plan.replace(seq_len=2048)
    assert shorter_shape(plan.replace(seq_len=2 * MIN_SHORTER_SEQ)).seq_len == MIN_SHORTER_SEQ
    assert shorter_shape(plan.replace(seq_len=2 * MIN_SHORTER_SEQ - 1)) is None  # too short to measure anything


def test_two_shapes_separate_static_from_per_token_bytes():
    """The two points a calibration stores share their static bytes and differ in per-token ones, so the
    fit recovers both factors where one point could only give one ratio."""
    from vramplan.calibrate import shorter_shape

    plan = Plan(model="llama-3.1-8b", seq_len=8192)  # 5.6 GB static, 3.8 GB per-token (1.9 GB at half)
    ests = [estimate_plan(p, resolve_model("llama-3.1-8b")) for p in (plan, shorter_shape(plan))]
    parts = [split_estimate(e) for e in ests]
    assert parts[0][0] == parts[1][0] and parts[0][1] > 1.5 * parts[1][1]
    points = [point_from(e, int(1.05 * s + 0.85 * t)) for e, (s, t) in zip(ests, parts)]
    fit = fit_correction(points)
    assert fit["kind"] == "linear" and fit["a"] == pytest.approx(1.05, rel=1e-3) and fit["b"] == pytest.approx(0.85, rel=1e-3)
    assert fit_correction(points[:1])["kind"] == "ratio"


def test_shapes_too_close_for_the_measurement_noise_give_one_ratio():
    """Llama-3.2-1B at 2,048 and 1,024 tokens differ by ~0.1 GB of per-token bytes: a 64 MiB reading
    error would swing b by more than ±10% (on the H100 the measured pair gave a = 0.64, b = 1.97), so the
    two points are pooled into one ratio instead."""
    from vramplan.calibrate import shorter_shape

    plan = Plan(model="llama-3.2-1b", seq_len=2048)
    ests = [estimate_plan(p, resolve_model("llama-3.2-1b")) for p in (plan, shorter_shape(plan))]
    points = [point_from(e, m) for e, m in zip(ests, (2_090_860_544, 1_950_351_360))]  # the H100's readings
    fit = fit_correction(points)
    assert fit["kind"] == "ratio"
    assert fit["a"] == pytest.approx(sum(p.measured_bytes for p in points) / sum(p.predicted_bytes for p in points))


def test_a_calibration_stores_its_points_together(tmp_path):
    from vramplan.calibration import add_points

    a, b = _points(1.1, 0.9)[1], _points(1.1, 0.9)[0]
    stored = add_points(KEY, [a, b], tmp_path)
    assert len(stored.points) == 2 and stored.fit["kind"] == "linear"
    again = add_points(KEY, [a], tmp_path)
    assert len(again.points) == 3 and read_calibration_file(tmp_path / f"{KEY.slug()}.json")[0].points == again.points


def test_the_shorter_batch_is_the_worst_batch_cut_to_its_length():
    import torch

    from vramplan.calibrate import random_batch, shorter_batch

    batch = random_batch(Plan(model="x", seq_len=32, micro_batch=3), vocab_size=50)
    short = shorter_batch(batch, 16)
    assert all(t.shape == (3, 16) for t in short.values())
    assert torch.equal(short["input_ids"], batch["input_ids"][:, :16]) and short["position_ids"][0, 15] == 15


def test_a_calibration_measures_one_or_two_shapes():
    with pytest.raises(VramplanError, match="1 or 2 shapes"):
        run_calibration(Plan(model="llama-3.2-1b"), ".", shapes=3)


def test_report_shows_the_half_length_shape(tmp_path):
    from vramplan.calibrate import CalibrationResult, MeasuredRun, shorter_shape
    from vramplan.cli.cmd_calibrate import report_lines

    est = _estimate(seq_len=2048)
    short_est = estimate_plan(shorter_shape(est.plan), resolve_model("llama-3.2-1b"))
    above = est.peak_bytes - est.components["cuda_context"]
    run_ = MeasuredRun(plan=est.plan, fitted=True, steps=3, measured_process_bytes=above, batch_shape=(1, 2048))
    short = MeasuredRun(plan=short_est.plan, fitted=True, steps=3, batch_shape=(1, 1024),
                        measured_process_bytes=int((short_est.peak_bytes - short_est.components["cuda_context"]) / 0.8))
    text = "\n".join(report_lines(CalibrationResult(est, run_, KEY, None, 80 * 10**9, short_est, short)))
    assert "half the sequence (1024 tokens)" in text and "-20.0%" in text
    oom = MeasuredRun(plan=short_est.plan, fitted=False, steps=0, measured_process_bytes=0, error="out of memory: x")
    text = "\n".join(report_lines(CalibrationResult(est, run_, KEY, None, 80 * 10**9, short_est, oom)))
    assert "out of memory" in text


def test_calibrate_cli_offers_one_shape():
    result = run("calibrate", "--help")
    assert "--one-shape" in result.output and "half" in result.output


def test_a_model_folder_calibrates_the_family_its_named_profile_reads(tmp_path):
    """A Gemma 4 folder's config resolves to model_type gemma4_text; its calibration must land where
    `fit gemma-4-e2b` looks (family gemma4), or a user's `calibrate --model ./gemma-4-E2B-it` is never used."""
    from vramplan.catalog import resolve_model
    from vramplan.calibration import model_family

    for name in ("gemma-4-e2b", "gemma-4-e2b-text", "llama-3.2-1b", "gemma-3-1b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(resolve_model(name).config))
        assert model_family(resolve_model(str(folder))) == model_family(resolve_model(name))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps(dict(resolve_model("llama-3.2-1b").config, model_type="brandnew")))
    assert model_family(resolve_model(str(unknown))) == "brandnew"


def test_a_dry_run_records_the_allocator_it_measured_under():
    """A calibration's run says which allocator settings it measured under, so its points are priced as they ran
    (benchmarks.accuracy.calibrations_from_runs; session 10's dry runs had no expandable segments, and said nothing)."""
    from benchmarks.records import switches_ran
    from vramplan.calibrate import MeasuredRun
    from vramplan.plan import Plan

    record = MeasuredRun(plan=Plan(model="llama-3.2-1b"), fitted=True, steps=3, measured_process_bytes=1,
                         alloc_conf="expandable_segments:True").to_record()
    assert record["alloc_conf"] == "expandable_segments:True" and switches_ran(record)["expandable_segments"]
    bare = MeasuredRun(plan=Plan(model="llama-3.2-1b"), fitted=True, steps=3, measured_process_bytes=1).to_record()
    assert not switches_ran(bare)["expandable_segments"]
