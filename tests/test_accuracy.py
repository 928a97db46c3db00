"""benchmarks/accuracy.py --from-results on the committed H100 measurements: the error it reports, and the
shipped calibrations it writes."""

import json
from pathlib import Path

import pytest

from benchmarks.accuracy import from_results
from vramplan.calibration import read_calibration_file
from vramplan.memory.overhead import cuda_library_bytes

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
    assert {r["stack"] for r in rows} == {"hf", "vramplan"} and len({r["model"] for r in rows}) >= 7
    for row in rows:
        assert {"model", "stack", "gpu", "measured_bytes", "predicted_bytes", "calibrated_bytes",
                "used_for_calibration"} <= set(row)
        assert isinstance(row["used_for_calibration"], bool) and row["measured_bytes"] > 0
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "held out" in (out / "accuracy.md").read_text()


def test_the_matrix_the_issue_asks_for(built):
    """At least 40 configurations over at least 4 architectures, each row naming what it ran."""
    stats = built[1]["summary"]
    assert stats["configurations"] >= 40 and len(stats["architectures"]) >= 4
    for row in built[1]["rows"]:
        assert {"quant", "seq", "rank", "checkpointing", "batch", "optimizer"} <= set(row)
    table = (built[0] / "accuracy.md").read_text()
    assert all(column in table for column in ("quant", "seq", "rank", "ckpt", "batch", "optimizer"))


def test_calibrated_as_vramplan_calibrate_would_and_held_out_on_the_rest(built):
    """Per (stack, model): the first configuration listed and, where the data has it, the same plan at a
    shorter sequence (the half-length shape `vramplan calibrate` also runs). Nothing else is fitted; a
    repeat of a calibration configuration is neither fitted nor held out."""
    from benchmarks.accuracy import HELD_OUT_ROLES

    rows = [r for r in built[1]["rows"] if r["role"] not in HELD_OUT_ROLES.values()]
    keys = {(r["stack"], r["model"]) for r in rows}
    calibrating = [r for r in rows if r["used_for_calibration"]]
    assert len(keys) <= len(calibrating) <= 2 * len(keys)
    same = ("quant", "batch", "rank", "checkpointing", "optimizer")
    for key in keys:
        mine = [r for r in rows if (r["stack"], r["model"]) == key]
        chosen = [r for r in mine if r["used_for_calibration"]]
        assert chosen[0] is mine[0]
        if len(chosen) == 2:
            first, short = chosen
            assert short["seq"] < first["seq"] and all(short[k] == first[k] for k in same)
    # llama-3.2-1b on the trainer: 2048 tokens listed first, its 1024-token twin measured too
    llama = [(r["seq"], r["batch"], r["rank"]) for r in rows
             if r["stack"] == "vramplan" and r["model"] == "llama-3.2-1b" and r["used_for_calibration"]]
    assert llama == [(2048, 1, 16), (1024, 1, 16)]
    assert {r["role"] for r in rows} == {"calibration", "held out", "repeat of a calibration configuration"}
    for row in rows:
        assert (row["role"] == "calibration") == row["used_for_calibration"]
    held = [r for r in rows if r["role"] == "held out"]
    assert len(held) >= 30 and built[1]["summary"]["calibrated_held_out"]["n"] == len(held)


def test_the_shipped_trainers_campaign_is_held_out_and_reported_apart(built):
    """Session 9's 16 runs of the trainer as it ships (CUDA graphs, default settings): none calibrates, each is
    priced by the eager-measured calibrations: uncalibrated 2.4% mean / 5.6% max, calibrated 3.2% / 8.0% since the
    planner counts the adapters' bf16 copies a captured step holds (2.5% / 7.1% and 2.7% / 6.7% before; 3.8% /
    10.7% and 3.6% / 13.2% before the planner knew that bitsandbytes pages only large adapters' states)."""
    from benchmarks.accuracy import CAMPAIGN_ROLE

    campaign = [r for r in built[1]["rows"] if r["role"] == CAMPAIGN_ROLE]
    assert len(campaign) == 16 and not any(r["used_for_calibration"] for r in campaign)
    assert len({r["model"] for r in campaign}) == 8
    stats = built[1]["summary"]
    assert stats["campaign_uncalibrated"]["n"] == 16 and stats["campaign_uncalibrated"]["max"] < 0.08
    assert stats["campaign_uncalibrated"]["mean"] < 0.03 and stats["campaign_calibrated"]["max"] < 0.085
    assert stats["calibrated_held_out"]["n"] == len([r for r in built[1]["rows"] if r["role"] == "held out"])


def test_vramplan_calibrate_runs_correct_the_held_out_campaigns_inside_the_targets(built):
    """`vramplan calibrate` as a user runs it (session 10: five models of three families at 3,072 tokens and
    its half, a shape no campaign row has) corrects session 9's 16 held-out runs to 2.0% mean / 5.4% max and
    session 10's 6 overlapped-step runs to 2.7% / 4.9%: inside the issue's calibrated 3% / 6% on the trainer
    as it now runs; and those calibrations are what ships for vramplan's stack."""
    from benchmarks.accuracy import OVERLAPPED_ROLE, calibrations_from_runs

    stats = built[1]["summary"]
    for prefix, n in (("campaign", 16), ("overlapped", 6)):
        fresh = stats[f"{prefix}_calibrated_by_calibrate_runs"]
        assert fresh["n"] == n and fresh["mean"] <= 0.03 and fresh["max"] <= 0.06, prefix
    overlapped = [r for r in built[1]["rows"] if r["role"] == OVERLAPPED_ROLE]
    assert len(overlapped) == 6 and not any(r["used_for_calibration"] for r in overlapped)
    fresh = calibrations_from_runs()
    assert {family for stack, family in fresh} == {"llama", "qwen3", "gemma4"}
    assert sum(len(c.points) for c in fresh.values()) == 10  # two shapes of each of the five models
    shipped = read_calibration_file(ROOT / "profiles/calibration/h100-vramplan.json")
    assert sorted(c.key.family for c in shipped) == sorted(family for _, family in fresh)


def test_the_matrix_re_measured_on_the_shipped_trainer(built):
    """Session 11 re-measured the 13 vramplan configurations of the matrix that sessions 1-3 measured on their eager
    trainer and no campaign had repeated (ranks 8-128, bf16, unpaged 8-bit AdamW, batch 2, no and offloaded
    checkpointing). Held out from every calibration: 3.4% mean uncalibrated, 2.9% mean corrected by `vramplan
    calibrate`'s runs. Llama-3.2-1B with its checkpoints offloaded missed the 6% bound (+8.7%) until session 22 read
    its driver readings: it had taken over a chunk a process before it left (records.previous_process_bytes), so its
    memory above its own baseline reads 128 MiB low, not the 64 MiB its baseline's excess said; +5.1% with the chunk
    (+12.6% above its own baseline). The planner gets its allocated peak within 1% (1.70 GB); its eager run held
    0.04 GB beyond it where the planner's floor gives 0.17. Before the planner counted a
    captured step's bf16 adapter copies, the two high-rank rows read -10.5% (Llama-3.2-1B, rank 128) and -11.1%
    (Qwen3-4B, rank 64); -4.7% and -6.4% after; +1.7% and -0.4% since it prices the slack a captured run's first
    eager pass leaves behind (session 12's rank sweep)."""
    from benchmarks.accuracy import REMEASURED_ROLE

    rows = [r for r in built[1]["rows"] if r["role"] == REMEASURED_ROLE]
    assert len(rows) == 13 and not any(r["used_for_calibration"] for r in rows)
    stats = built[1]["summary"]
    assert stats["remeasured_uncalibrated"]["mean"] < 0.03
    assert stats["remeasured_calibrated_by_calibrate_runs"]["mean"] < 0.025
    assert max(abs(r["error_calibrated_by_calibrate_runs"]) for r in rows) < 0.06
    high_rank = [r for r in rows if r["rank"] >= 64]
    assert len(high_rank) == 2 and all(abs(r["error_uncalibrated"]) < 0.025 for r in high_rank)
    # with session 11's four short rows (the step queued whole) and three eager runs, and session 12's fifteen held-out
    # runs, session 13's campaign of seven and A/B of six, and session 14's A/B of four and campaign of five: every
    # held-out run of the trainer as it shipped since session 9, 79 rows, 2.0% mean corrected by
    # `vramplan calibrate`'s runs; the rows outside 6% are all eager and over-priced (offloaded checkpoints, and
    # Qwen3-0.6B): the eager allocator's slack varies 0.01-0.39 GB between runs (memory.overhead)
    short = stats["short_rows_calibrated_by_calibrate_runs"]
    assert short["n"] == 4 and short["max"] < 0.06
    campaign13 = stats["session13_calibrated_by_calibrate_runs"]  # session 13's campaign: 2.1% mean, 4.0% max
    assert campaign13["n"] == 7 and campaign13["mean"] < 0.03 and campaign13["max"] < 0.06
    assert stats["session13_uncalibrated"]["max"] < 0.06
    wide = stats["session13_ab_uncalibrated"]  # the A/B of chunked wide heads: within 3.3%, corrected 0.8%
    assert wide["n"] == 6 and wide["max"] < 0.04 and stats["session13_ab_calibrated_by_calibrate_runs"]["max"] < 0.03
    fused = stats["session14_ab_uncalibrated"]  # the A/B of the fused attention rows: -3.0%, corrected 1.1%
    assert fused["n"] == 4 and fused["max"] < 0.04 and stats["session14_ab_calibrated_by_calibrate_runs"]["max"] < 0.02
    # Gemma 4 at 6,144 and 8,192 tokens were priced 4.7-7.5% low until the captured prologue's cached blocks
    # (memory.activations.captured_prologue_bytes) counted in the slack; now 2.1-4.2%, corrected within 1.7%
    campaign14 = stats["session14_uncalibrated"]  # Gemma 4 with them at 1,024-8,192 tokens: 2.7% mean, 3.7% max
    assert campaign14["n"] == 5 and campaign14["mean"] < 0.03 and campaign14["max"] < 0.045
    assert stats["session14_calibrated_by_calibrate_runs"]["max"] < 0.025  # E2B at 8,192 tokens: 2.4%
    band = stats["session15_ab_uncalibrated"]  # E2B at 8,192 tokens, band or mask: -3.1% to -4.2%, corrected 0.9% mean
    assert band["n"] == 4 and band["max"] < 0.05 and stats["session15_ab_calibrated_by_calibrate_runs"]["max"] < 0.03
    threshold = stats["session15_uncalibrated"]  # E2B 4,096-6,144, E4B 8,192 at the band's threshold: 3.0% mean, 3.7% max
    assert threshold["n"] == 5 and threshold["max"] < 0.045 and stats["session15_calibrated_by_calibrate_runs"]["max"] < 0.025
    aligned = stats["session16_aligned_uncalibrated"]  # E2B 6,144-8,192, E4B 8,192, chunks aligned or not: 3.2% max
    assert aligned["n"] == 6 and aligned["max"] < 0.04 and stats["session16_aligned_calibrated_by_calibrate_runs"]["max"] < 0.02
    # session 17's runs where older lines missed most (E2B at ranks 32 and 128 under graphs and eager, Qwen3-4B without
    # checkpointing, Llama-3.2-1B at 8,192 tokens): 2.9% mean, 4.4% max; corrected 2.7% mean, 5.5% max
    campaign17 = stats["session17_uncalibrated"]
    assert campaign17["n"] == 5 and campaign17["max"] < 0.05 and stats["session17_calibrated_by_calibrate_runs"]["max"] < 0.06
    # session 19's fp16 and bf16 runs (Llama-3.2-1B, Gemma-4-E2B at 2,048 tokens) and E2B at the band's threshold:
    # 1.5% mean, 2.9% max; corrected 0.9% mean, 2.2% max. Above each run's own baseline it read 2.8% / 7.6%: two
    # runs of one plan 128 MiB apart, the later child's baseline holding the reserve the one before it left
    campaign19 = stats["session19_uncalibrated"]
    assert campaign19["n"] == 8 and campaign19["max"] < 0.035 and stats["session19_calibrated_by_calibrate_runs"]["max"] < 0.03
    # session 20's campaign (16 configurations over 8 models, registered before it ran): 2.6% mean, 9.5% max; the
    # max is Qwen3-1.7B at rank 128 without checkpointing under graphs, whose pool reserved 1.96 GB it never
    # allocated (-9.5%; the trainer's compact captures, since, reserve 0.15 GB there)
    campaign20 = stats["session20_uncalibrated"]
    assert campaign20["n"] == 16 and campaign20["mean"] < 0.03 and campaign20["max"] < 0.10
    shipped = stats["shipped_trainer_held_out_calibrated_by_calibrate_runs"]
    # after it, Qwen3-1.7B's outlier again under graphs (the same bytes: 1.96 GB reserved, never allocated) and eager,
    # where its pool held 0.35 GB beyond its allocations
    followup = stats["session20_followup_uncalibrated"]
    assert followup["n"] == 3 and followup["max"] < 0.10
    # session 21's eager campaign (registered before it ran: six host-bound plans over four models): 2.7% mean, 6.8% max
    eager21 = stats["session21_eager_uncalibrated"]
    assert eager21["n"] == 6 and eager21["mean"] < 0.03 and eager21["max"] < 0.07
    # and its captured runs without checkpointing as the trainer shipped before compact captures: the slack again,
    # Qwen3-1.7B at ranks 64 and 128 and Llama-3.2-1B at 128 (-8% to -12.5%)
    slack21 = stats["session21_slack_uncalibrated"]
    assert slack21["n"] == 4 and slack21["max"] < 0.12
    # session 21's campaign of compact captures (registered before it ran; five models, ranks 64-256) and Llama-3.2-1B
    # eager after both host probes: 3.0% mean, 5.0% max; corrected 2.9% / 5.8%. Until session 23 four of them counted
    # as having taken over a chunk (records.took_over_chunk), where the probe had loaded cuBLAS before the first
    # reading (3.8% / 6.9%, corrected 3.9% / 7.5%)
    compact = stats["session21_compact_held_out_uncalibrated"]
    assert compact["n"] == 6 and compact["mean"] < 0.035 and compact["max"] < 0.055
    assert stats["session21_compact_held_out_calibrated_by_calibrate_runs"]["max"] < 0.06
    # session 22's eager campaign (registered before it ran, run in session 23): 2.9% mean, 7.1% max, its eager slack
    # priced by all the small pool's gradients too high at Qwen3-4B's rank 64 (0.43 GB for 0.07) and Qwen3-0.6B's 128
    # (0.32 for 0.14); 1.0% mean, 3.3% max since session 24 prices the gradients by when they come (after seeing it)
    eager23 = stats["session23_eager_uncalibrated"]
    assert eager23["n"] == 6 and eager23["mean"] < 0.015 and eager23["max"] < 0.04
    # session 24's eager campaign, registered before it ran with that pricing (Llama-3.2-3B, Qwen3-1.7B, Llama-3.2-1B at
    # ranks 32-128, some steps peaking where the backward starts, some where it ends): 1.0% mean, 1.6% max; 4.5% /
    # 8.6% as session 23's planner priced it
    eager24 = stats["session24_eager_timing_uncalibrated"]
    assert eager24["n"] == 6 and eager24["mean"] < 0.015 and eager24["max"] < 0.02
    assert stats["session24_eager_timing_calibrated_by_calibrate_runs"]["max"] < 0.03
    # session 25's eager runs on two hosts (eight and twelve steps; Gemma-4-E2B and E4B among them, which allocated
    # 0.15 GB beyond their price in session 24's lines): 1.3% mean, 3.8% max; corrected 1.1% / 2.5%
    eager25 = stats["session25_eager_uncalibrated"]
    assert eager25["n"] == 10 and eager25["mean"] < 0.015 and eager25["max"] < 0.04
    assert stats["session25_eager_calibrated_by_calibrate_runs"]["max"] < 0.03
    # session 26's H100 call, both campaigns registered before it ran: session 25's four eager plans (1.2% mean, 1.9%
    # max) and on today's trainer the two captured Qwen3-1.7B plans without checkpointing whose runs before compact
    # captures read -9.7% and -9.8% corrected: -3.0% and -3.9% uncalibrated, 4.1% max corrected
    probe26 = stats["session26_host_probe_uncalibrated"]
    assert probe26["n"] == 4 and probe26["max"] < 0.02
    again = stats["session26_shipped_captures_uncalibrated"]
    assert again["n"] == 2 and again["max"] < 0.04
    assert stats["session26_shipped_captures_calibrated_by_calibrate_runs"]["max"] < 0.045
    assert shipped["n"] == 170 and shipped["mean"] < 0.019
    held = [r for r in built[1]["rows"] if r["role"].startswith("held out (session")]
    outside = [r for r in held if abs(r["error_calibrated_by_calibrate_runs"]) > 0.06]
    over = [r for r in outside if r["error_calibrated_by_calibrate_runs"] > 0]
    # none over since session 24 priced an eager step's gradients by when they come (after seeing them): three eager
    # runs were, Qwen3-1.7B at rank 128 without checkpointing (+6.5%), session 23's Qwen3-4B at rank 64 (+7.1%) and
    # Qwen3-0.6B at rank 128 (+8.0%). Session 11's and 21's eager Qwen3-0.6B read +7.0% and +7.5% until session 22
    # priced the eager slack by the small pool's gradients; Llama-3.2-1B after both host probes read -7.5% until
    # session 23 read its probe's cuBLAS (-0.8%)
    assert len(outside) == 4 and not over
    # four captured runs of Qwen3-1.7B without checkpointing at rank 64 or 128 before compact captures (sessions
    # 20-21), whose pools held 0.9-1.96 GB they never allocated (Llama-3.2-1B at rank 128 so, -5.6%, is inside 6%).
    # Llama-3.2-3B at rank 256 with compact captures read -6.0% until session 22 found that it had mapped every chunk
    # of its own (-4.5%)
    assert all(r["measured_peak_reserved"] - r["measured_peak_allocated"] > 0.8e9 for r in outside)
    assert sorted((r["model"], r["rank"], r["checkpointing"]) for r in outside) == sorted(
        [("qwen3-1.7b", 128, "none")] * 3 + [("qwen3-1.7b", 64, "none")])


def test_the_stacks_as_they_ship_against_the_issue_targets(built):
    """The hf stack's matrix and every held-out run of vramplan's trainer since session 9 on a path it still takes
    (75 runs; the matrix's vramplan rows measured sessions 1-3's eager trainer): uncalibrated 2.1% mean / 7.5% max,
    inside 8% / 15%; calibrated 1.7% mean / 4.8% max, inside 3% / 6%. With the 118 captured runs made before compact
    captures (a path retired in session 26): 9.8% max calibrated, its only runs outside 6% the four above."""
    stats = built[1]["summary"]
    unc, cal = stats["as_shipped_uncalibrated"], stats["as_shipped_calibrated_held_out"]
    assert unc["n"] == 75 and unc["mean"] <= 0.08 and unc["max"] <= 0.15
    assert cal["n"] == 67 and cal["mean"] <= 0.03 and cal["max"] <= 0.06
    # the retired path's rows: these and nine fitted ones (session 12's allowances, session 21's A/B)
    retired = [r for r in built[1]["rows"] if r["retired_path"]]
    assert all(r["stack"] == "vramplan" and r["role"].startswith(("held out (", "fitted (")) for r in retired)
    held = [r for r in retired if r["role"].startswith("held out (")]
    assert len(held) == stats["retired_path_captures_before_compact_uncalibrated"]["n"] == 118
    every = stats["held_out_since_session9_calibrated_held_out"]
    assert every["n"] == 185 and every["max"] > 0.06
    outside = [r for r in built[1]["rows"] if abs(r.get("error_calibrated_by_calibrate_runs", 0)) > 0.06]
    assert outside and all(r["retired_path"] for r in outside)


def test_errors_against_the_issue_targets(built):
    """Measured on the committed data (52 rows, 48 configurations, 4 architectures): uncalibrated
    3.1% mean / 11.2% max, inside the issue's 8% / 15%. Calibrated (two shapes per model and stack
    where the data has them, held-out rows only, the share of each fit that carries to another
    configuration): 2.3% mean, inside 3%, but 8.4% max, NOT inside 6% (the fit applied in full gave
    2.5% / 8.8%); on the 25 held-out runs of 3 GB and more 1.9% / 4.7%, inside both. The worst rows
    are ~2 GB eager trainer runs (test_the_worst_small_runs_read_the_low_outside_pool_step)."""
    stats = built[1]["summary"]
    assert stats["uncalibrated_all"]["n"] >= 50
    assert stats["uncalibrated_all"]["mean"] <= 0.08 and stats["uncalibrated_all"]["max"] <= 0.15
    assert stats["calibrated_held_out"]["mean"] <= 0.03 and stats["calibrated_held_out"]["max"] <= 0.09
    large = stats["calibrated_held_out_from_3gb"]
    assert large["n"] >= 20 and large["mean"] <= 0.025 and large["max"] <= 0.06


def test_calibration_helps_whichever_configuration_it_measured(built):
    """One split says little (a model's first-listed run may carry its family's error or its own): over
    150 random choices of the calibrating configuration the calibrated mean error stays below the
    uncalibrated one (2.5% against 2.8%) and below the fit applied in full (2.9%), and its worst max below
    the whole fit's (11.7% against 14.5%). Its max stays above the uncalibrated one's: a fit from one
    configuration still extrapolates."""
    robust = built[1]["summary"]["random_splits"]
    assert robust["splits"] >= 100
    assert robust["calibrated"]["mean"] < robust["uncalibrated"]["mean"] - 0.001
    assert robust["calibrated"]["mean"] < robust["calibrated_whole_fit"]["mean"] - 0.002
    assert robust["calibrated"]["worst_max"] < robust["calibrated_whole_fit"]["worst_max"]


def test_the_worst_small_runs_read_the_low_outside_pool_step(built):
    """Every held-out trainer run the calibration misses by more than 6% is an eager run of sessions 2-3 under
    2.7 GB whose memory outside torch's pool read a step below what today's trainer maps: Qwen3-0.6B, whose adapters
    bitsandbytes does not page (priced so; its pool is what is under-predicted), Llama-3.2-1B with CPU offload, which
    pages and still read the low step, 0.15 GB, and Llama-3.2-1B at rank 128, whose 0.18 GB of paged states read one
    128 MiB chunk (0.29 GB) where today's trainer maps two. (Batch 4 at 1,024 tokens, +5.2%, and batch 2 at 2,048,
    -5.5%, are inside 6%.)"""
    worst = [r for r in built[1]["rows"] if r["role"] == "held out" and r["stack"] == "vramplan"
             and abs(r["error_calibrated"]) > 0.06]
    assert worst and {r["model"] for r in worst} <= {"qwen3-0.6b", "llama-3.2-1b"}
    for r in worst:
        assert r["measured_bytes"] < 2.7e9
        outside = r["measured_bytes"] - r["measured_peak_reserved"]
        assert min(abs(outside - 0.153e9), abs(outside - 0.287e9)) < 0.01e9


def test_paged_optimizer_states_decide_the_outside_pool_step():
    """Session 9's campaign (the trainer as it ships, fresh processes): after the last step, the process memory
    outside torch's pool (CUDA context included) of the runs whose adapters bitsandbytes pages sits 128 MiB
    above the runs whose adapters it does not (Qwen3-0.6B, 1.7B), each group within 80 MB."""
    import json

    from benchmarks.records import CAMPAIGN
    from benchmarks.records import plan_of
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture
    from vramplan.memory.adapters import paged_params

    groups = {True: [], False: []}
    for line in (line for path in CAMPAIGN for line in path.read_text().splitlines()):
        record = json.loads(line)
        plan = plan_of(record, "vramplan")
        groups[paged_params(architecture(resolve_model(plan.model)), plan) > 0].append(record["driver"]["outside"][-1])
    assert len(groups[False]) == 3 and len(groups[True]) == 13
    for readings in groups.values():
        assert max(readings) - min(readings) < 80e6
    step = sum(groups[True]) / 13 - sum(groups[False]) / 3
    assert abs(step - 128 * 2**20) < 16 * 2**20


def test_calibration_runs_get_their_own_measurement(built):
    """A plan a calibration measured is estimated as measured: the fit alone, pooling hf Llama-3.2-1B's run
    with Llama-3.1-8B's into one ratio, had put the 1B's calibration run 6.4% under its measurement."""
    for r in built[1]["rows"]:
        if r["used_for_calibration"]:
            assert r["calibrated_bytes"] == r["measured_bytes"], (r["stack"], r["model"], r["seq"])


def test_the_shipped_calibrations_are_what_the_committed_data_gives(built):
    out = built[0]
    for stack in ("hf", "vramplan"):
        shipped = read_calibration_file(ROOT / f"profiles/calibration/h100-{stack}.json")
        rebuilt = read_calibration_file(out / "calibration" / f"h100-{stack}.json")
        assert [c.key for c in shipped] == [c.key for c in rebuilt]
        for a, b in zip(shipped, rebuilt):
            assert a.points == b.points and a.fit == pytest.approx(b.fit)


def test_plans_fit_chose_for_8_12_and_16_gb_ran_inside_their_caps():
    """Session 11 on the H100, the trainer and planner as they ship (CUDA graphs, the step queued whole): for each
    of three models and each cap, fit's plan ran with torch limited to the cap less the context
    (``set_per_process_memory_fraction``); none ran out of memory and every process stayed under its cap."""
    rows = json.loads((ROOT / "benchmarks/results/cap_check_h100.json").read_text())
    assert {r["model"] for r in rows} == {"llama-3.2-1b", "gemma-4-e2b-text", "qwen3-4b"}
    assert sorted({r["cap_gb"] for r in rows}) == [8, 12, 16] and len(rows) == 9
    for row in rows:
        assert row["fitted"] and row["stayed_inside"], row
        assert row["measured_process_bytes"] <= row["cap_gb"] * 1e9
        assert row["predicted_bytes"] <= row["cap_gb"] * 1e9
        assert abs(row["predicted_bytes"] / row["measured_process_bytes"] - 1) < 0.09  # the plans' own error


def test_a_paging_run_counts_the_chunk_it_took_over_from_the_process_before_it(built):
    """records.previous_process_bytes: session 19 ran one Llama-3.2-1B plan in fp16 as a parent's first child and in
    bf16 after a paging child, the same torch peak: above their own baselines they read 128 MiB apart, and the bf16
    runs' outside growth was one chunk short; with that chunk added back they agree within 24 MiB. A run that pages
    nothing (Llama-3.2-1B at rank 8) gets nothing added, and neither do runs that started above a leftover chunk
    but mapped all of their own (session 21's Llama-3.1-8B at rank 128 and Llama-3.2-3B at rank 256)."""
    rows = built[1]["rows"]
    pair = [r for r in rows if r["role"] == "held out (session 19, fp16 and band threshold)"
            and r["model"] == "llama-3.2-1b"]
    raw = sorted({r["measured_above_own_baseline_bytes"] for r in pair})
    fixed = sorted({r["measured_bytes"] for r in pair})
    assert len(raw) == 2 and raw[1] - raw[0] >= 120 * 2**20
    assert fixed[-1] - fixed[0] <= 24 * 2**20
    unpaged = [r for r in rows if r["model"] == "llama-3.2-1b" and r["rank"] == 8 and r["role"].startswith("held out (")]
    assert unpaged and all(r["previous_process_bytes"] == 0 for r in unpaged)
    own_chunks = [r for r in rows if r["role"] == "held out (session 21, compact captures held out)"
                  and (r["model"], r["rank"]) in {("llama-3.1-8b", 128), ("llama-3.2-3b", 256)}]
    assert len(own_chunks) == 2 and all(r["previous_process_bytes"] == 0 for r in own_chunks)
    assert {r["previous_process_bytes"] for r in rows} == {0, 128 * 2**20}


def test_a_run_whose_host_probe_loaded_cublas_first_took_no_chunk_over(built):
    """records.host_probe_loaded_bytes: the autograd probe's matmuls ran before the first driver reading from session
    21's call 4 to session 23's call 2, loading 132 MiB of cuBLAS there: those lines start 1,954 MiB outside the pool
    where a clean device reads 1,822, and grow that much less over their first step. Session 23's eager Qwen3-1.7B,
    which pages nothing, grew 16 MiB; its campaign's paging runs grew their own chunks and 16 MiB more, and none of
    them took a chunk over (read against the unprobed constants, all five had)."""
    from benchmarks.records import SESSION23_EAGER, host_probe_loaded_bytes

    lines = [json.loads(line) for line in SESSION23_EAGER[0].read_text().splitlines()]
    lines = [line for line in lines if "driver" in line]
    assert len(lines) == 6 and all(host_probe_loaded_bytes(line) == 132 * 2**20 for line in lines)
    unpaged = next(line for line in lines if line["model"] == "qwen3-1.7b")
    growth = unpaged["driver"]["outside"][1] - unpaged["driver"]["outside"][0]
    assert growth == 16 * 2**20  # 148 MiB, less the probe's 132
    paging = [line for line in lines if line is not unpaged]  # states of 21-243 MiB: one chunk or two, + 16 MiB
    assert all(line["driver"]["outside"][1] - line["driver"]["outside"][0] in (144 * 2**20, 272 * 2**20)
               for line in paging)
    rows = [r for r in built[1]["rows"] if r["role"] == "held out (session 23, eager campaign)"]
    assert len(rows) == 6 and all(r["previous_process_bytes"] == 0 for r in rows)
    assert host_probe_loaded_bytes({"host_autograd_us": 20.0, "host_probes_after_steps": True}) == 0
