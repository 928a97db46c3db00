"""`vramplan buy`: options ranked by cost to finish, marked, explained; bad inputs are one-line errors."""

import json

import pytest
from click.testing import CliRunner

from vramplan.buy import Job, dataset_tokens, mark, parse_tokens, price_job
from vramplan.catalog import list_gpus, resolve_model
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.plan import Plan


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def options():
    profile = resolve_model("llama-3.1-8b")
    return price_job(Job(profile, Plan(model=profile.name, seq_len=4096), 50_000_000))


def test_ranked_by_cost_to_finish(options):
    priced = [o for o in options if o.fits and o.cost_usd is not None]
    assert len(priced) > 10
    costs = [o.cost_usd for o in priced]
    assert costs == sorted(costs)
    first_unpriced = next(i for i, o in enumerate(options) if not (o.fits and o.cost_usd is not None))
    assert all(not (o.fits and o.cost_usd is not None) for o in options[first_unpriced:])


def test_cost_is_the_cheaper_of_renting_and_buying(options):
    for o in options:
        if not o.fits:
            continue
        assert o.hours == pytest.approx(50_000_000 / o.tokens_per_s / 3600)
        if o.gpu.rent_usd_per_hour:
            assert o.rent_usd == pytest.approx(o.hours * o.gpu.rent_usd_per_hour * o.gpu.count)  # a box: N × the rate
        known = [c for c in (o.rent_usd, o.purchase_usd) if c is not None]
        assert o.cost_usd == (min(known) if known else None)


def test_cheapest_fastest_and_best_value_are_marked_once(options):
    fitting = [o for o in options if o.fits]
    priced = [o for o in fitting if o.cost_usd is not None]
    marked = {m: [o for o in options if m in o.marks] for m in ("cheapest", "fastest", "best value")}
    assert all(len(v) == 1 for v in marked.values())
    assert marked["cheapest"][0].cost_usd == min(o.cost_usd for o in priced)
    assert marked["fastest"][0].hours == min(o.hours for o in fitting)
    assert marked["best value"][0].cost_usd * marked["best value"][0].hours == min(o.cost_usd * o.hours for o in priced)
    assert marked["fastest"][0].gpu.name == "8xb200"  # the largest box of the fastest GPU


def test_apple_machines_and_small_cards_do_not_fit_with_a_reason(options):
    by_name = {o.gpu.name: o for o in options}
    assert not by_name["m3-ultra-512gb"].fits and "CUDA" in by_name["m3-ultra-512gb"].lacks
    assert not any(o.marks for o in options if o.gpu.unified_memory)
    profile = resolve_model("llama-3.3-70b")
    cards = [g for g in list_gpus() if g.name in ("rtx-4060", "h200")]
    big = price_job(Job(profile, Plan(model=profile.name, seq_len=8192), 10_000_000), cards)
    by_box = {o.gpu.name: o for o in big}
    small, large = by_box["rtx-4060"], by_box["h200"]
    # 70B at 8,192 tokens on an 8 GB card: only with the frozen weights in host memory, at a crawl
    assert small.fits and small.plan.cpu_offload and small.plan.parallel == "fsdp"
    assert not large.plan.cpu_offload and small.tokens_per_s < 0.1 * large.tokens_per_s
    tiny = price_job(Job(profile, Plan(model=profile.name, seq_len=8192), 10_000_000),
                     [g for g in list_gpus() if g.name == "rtx-2060"])[0]
    assert tiny.fits or "GB more memory" in tiny.lacks


def test_a_gpu_without_bf16_trains_in_fp16():
    profile = resolve_model("llama-3.2-1b")
    t4 = [g for g in list_gpus() if g.name == "t4"]
    option = price_job(Job(profile, Plan(model=profile.name), 1_000_000), t4)[0]
    assert option.fits and option.plan.compute_dtype == "fp16" and option.tokens_per_s > 0


@pytest.mark.parametrize("text,count", [("50M", 50_000_000), ("1.5B", 1_500_000_000), ("200k", 200_000), ("123", 123)])
def test_token_counts(text, count):
    assert parse_tokens(text) == count


def test_dataset_tokens_estimated_from_characters(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "x" * 400}) + "\n" + json.dumps({"prompt": "ab", "completion": "cd" * 99}) + "\n")
    assert dataset_tokens(str(data)) == (150, "estimated from characters")


def test_json_shape():
    result = run("buy", "gemma-4-e4b", "--seq", "4096", "--tokens", "50M", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total_tokens"] == 50_000_000 and data["prices_date"]
    singles = [o for o in data["options"] if o["count"] == 1]
    assert len(singles) == len(list_gpus()) and all(o["fits"] for o in data["options"] if o["count"] > 1)
    for option in data["options"]:
        assert {"gpu", "fits", "tokens_per_s", "hours", "cost", "marks", "lacks"} <= set(option)
        assert (option["tokens_per_s"] is not None) == option["fits"]


def test_table_for_people_says_how_old_the_prices_are(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello " * 1000}) + "\n")
    result = run("buy", "llama-3.1-8b", "--data", str(data), "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "cheapest" in result.output and "fastest" in result.output and "best value" in result.output
    assert "days old" in result.output and "ESTIMATED from characters" in result.output
    assert "needs CUDA" in result.output


@pytest.mark.parametrize("args,message", [
    (["llama-3.1-8b", "--tokens", "-5"], "--tokens -5"),
    (["llama-3.1-8b", "--tokens", "12Q"], "--tokens 12Q"),
    (["no-such-model", "--tokens", "5M"], "unknown model"),
    (["llama-3.1-8b"], "--tokens 50M, or --data"),
    (["llama-3.1-8b", "--tokens", "5M", "--epochs", "0"], "--epochs"),
    (["llama-3.1-8b", "--data", "/nonexistent.jsonl"], "does not exist"),
])
def test_bad_inputs_are_one_line_errors(args, message):
    result = run("buy", *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "cost.png"
    result = run("buy", "llama-3.2-1b", "--tokens", "10M", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run("buy", "llama-3.2-1b", "--tokens", "10M", "--plot", str(tmp_path / "cost.jpg"))
    assert bad.exit_code != 0 and ".png" in bad.output


def test_mark_with_nothing_fitting_marks_nothing():
    from vramplan.buy import Option

    options = [Option(list_gpus()[0], fits=False, lacks="x")]
    mark(options)
    assert options[0].marks == []


def test_dataset_tokens_counted_with_the_models_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "tok")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello world hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    assert dataset_tokens(str(data), str(tmp_path / "tok")) == (3 + 1 + 1 + 1, "tokenizer")  # each text ends with </s>
    result = run("buy", "llama-3.2-1b", "--data", str(data), "--model", str(tmp_path / "tok"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tokens_source"] == "tokenizer"
    missing = run("buy", "llama-3.2-1b", "--data", str(data), "--model", str(tmp_path / "nothing"))
    assert missing.exit_code != 0 and "no tokenizer" in missing.output


def test_single_gpus_are_priced_with_captured_steps_and_boxes_without(options):
    """One GPU replays its steps as CUDA graphs (the trainer's default) where they fit, so a GPU faster than the host
    can feed eagerly is priced at its own speed; a box's ranks run eagerly (no graphs on several GPUs)."""
    from vramplan.estimate import architecture
    from vramplan.throughput import captured_phases, predict_tokens_per_s, step_seconds

    arch = architecture(resolve_model("llama-3.1-8b"))
    singles = [o for o in options if o.fits and o.gpu.count == 1]
    boxes = [o for o in options if o.fits and o.gpu.count > 1]
    assert singles and boxes
    # a single GPU captures unless its plan offloads (checkpoints or, under FSDP2, the frozen weights)
    offloaded = [o for o in singles if o.plan.checkpointing == "offload" or o.plan.cpu_offload]
    assert len(offloaded) < len(singles) / 2
    # where graphs would not fit beside the chosen rank (8 GB cards at rank 32), the plan gives them up, priced eager
    assert all(captured_phases(arch, o.plan) or not o.plan.cuda_graphs for o in singles if o not in offloaded)
    assert sum(bool(captured_phases(arch, o.plan)) for o in singles) > len(singles) / 2
    assert not any(captured_phases(arch, o.plan) for o in boxes + offloaded + [o for o in singles if not o.plan.cuda_graphs])
    h100 = next(o for o in singles if o.gpu.name == "h100")
    assert h100.tokens_per_s == pytest.approx(predict_tokens_per_s(arch, h100.plan, h100.gpu), rel=1e-6)
    # captured, the host's part is one replay's (not ~15,000 ops'); at this job's 4,096 tokens the 8B's captured
    # attention, which computes the whole masked square (vramplan.throughput.FLASH_ATTENTION_EFFICIENCY), costs
    # more than the host it saves, so eager is predicted faster; at 2,048 tokens graphs win (measured 1.4x there)
    captured, eager = (step_seconds(arch, h100.plan.replace(cuda_graphs=c), h100.gpu) for c in (True, False))
    assert captured["host"] < eager["host"] / 10
    short = h100.plan.replace(seq_len=2048)
    assert predict_tokens_per_s(arch, short, h100.gpu) > predict_tokens_per_s(arch, short.replace(cuda_graphs=False), h100.gpu)


def test_speed_error_is_quoted_apart_for_captured_and_eager_steps():
    """The shipped calibration splits the held-out error by how the steps ran; an older file without the split is
    quoted whole."""
    from vramplan.cli.cmd_buy import held_out_error_note
    from vramplan.throughput import calibration

    shipped = calibration()
    assert shipped["held_out_captured"]["count"] + shipped["held_out_eager"]["count"] == shipped["held_out"]["count"]
    assert shipped["held_out_captured"]["mean_abs_error"] < shipped["held_out_eager"]["mean_abs_error"]
    note = held_out_error_note(shipped)
    assert f"over {shipped['held_out_captured']['count']} whose steps replay as CUDA graphs" in note
    assert f"over {shipped['held_out_eager']['count']} eager" in note
    older = {"held_out": shipped["held_out"]}
    assert held_out_error_note(older) == f"held-out error {100 * shipped['held_out']['mean_abs_error']:.0f}% mean " \
                                         f"over {shipped['held_out']['count']} measured configurations"
    result = run("buy", "llama-3.2-1b", "--tokens", "10M")
    assert result.exit_code == 0 and "whose steps replay as CUDA graphs" in result.output
