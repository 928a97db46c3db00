"""head_quant in the plan, the planner, fit and the CLI: an int8 head costs V·H + 4·V bytes where the bf16
one costs 2·V·H, its loss temporaries are counted, fit takes it only when a bf16 head does not fit."""

import json

import pytest
import torch
from click.testing import CliRunner

from vramplan.catalog import resolve_model
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.estimate import architecture, estimate_plan
from vramplan.fit import fit_plan, leanest_plan, safety_margin
from vramplan.memory import logits
from vramplan.plan import Plan
from vramplan.train import switches
from vramplan_kernels import int8_rows

LLAMA = resolve_model("llama-3.2-1b")  # tied 128,256 x 2,048
GEMMA = resolve_model("gemma-4-31b")  # tied 262,144 x 5,376, softcapped


def test_old_plans_read_as_bf16_and_files_stay_the_same():
    old = Plan(model="llama-3.2-1b")
    assert old.head_quant == "bf16" and "head_quant" not in old.to_dict()
    assert Plan.from_dict(old.to_dict()) == old
    int8 = old.replace(head_quant="int8")
    assert int8.to_dict()["head_quant"] == "int8" and Plan.from_dict(int8.to_dict()) == int8
    with pytest.raises(VramplanError, match="head_quant"):
        Plan(model="m", head_quant="nf4")


def test_planner_slice_budget_is_the_kernels():
    assert logits.DEQUANT_SLICE_BUDGET_BYTES == int8_rows.DEQUANT_SLICE_BYTES
    for vocab, hidden in ((128256, 2048), (262144, 5376), (300, 64), (151936, 1024)):
        assert logits.dequant_slice_rows(vocab, hidden) == min(vocab, int8_rows.slice_rows(hidden, torch.bfloat16))


@pytest.mark.parametrize("profile", [LLAMA, GEMMA], ids=lambda p: p.name)
def test_int8_head_halves_the_embedding_component(profile):
    arch = architecture(profile)
    bf16 = estimate_plan(Plan(model=profile.name), profile)
    int8 = estimate_plan(Plan(model=profile.name, head_quant="int8"), profile)
    v, h = arch.vocab_size, arch.hidden_size
    assert bf16.components["embeddings"] == 2 * v * h
    assert int8.components["embeddings"] == v * h + 4 * v
    assert bf16.peak_bytes - int8.peak_bytes > 0.9 * v * h - 64 * 2**20  # less the loss temporaries


def test_int8_head_loss_temporaries_are_counted():
    """The vocabulary-major pass: one block of 2,048 tokens x 8,192 rows of logits (no more than a
    token-major chunk's), one dequantized slice, and the block's fp32 sum beside its bf16 product."""
    tokens, v, h = 2048, 128256, 2048
    assert logits.int8_head_block(tokens, v, h) == (2048, 8192)
    int8 = logits.chunked_logits_bytes(tokens, v, h, int8_head=True)
    assert int8 == 2048 * 8192 * 2 + 8192 * h * 2 + 2048 * h * (4 + 2) + tokens * h * 2 + tokens * 4
    assert int8 - logits.chunked_logits_bytes(tokens, v, h) < 50 * 2**20  # bounded: never the 0.5 GB bf16 head


@pytest.mark.parametrize("tokens, vocab, hidden, budget", [(2048, 128256, 2048, 64 << 20), (2048, 262144, 5376, None),
                                                           (16384, 262144, 1536, None), (11, 300, 64, None)])
def test_planner_int8_block_is_the_kernels(tokens, vocab, hidden, budget):
    from vramplan_kernels.linear_cross_entropy import default_chunk_size, vocab_major_shape

    chunk = default_chunk_size(tokens, vocab, torch.bfloat16, budget)
    assert logits.int8_head_block(tokens, vocab, hidden, 2, budget) == vocab_major_shape(tokens, vocab, hidden,
                                                                                         torch.bfloat16, chunk)


def test_hf_stack_ignores_it_and_says_so():
    hf = Plan(model=LLAMA.name, stack="hf", loss="full")
    ours = estimate_plan(hf.replace(head_quant="int8"), LLAMA)
    assert ours.peak_bytes == estimate_plan(hf, LLAMA).peak_bytes
    assert any("head_quant=int8 ignored" in note for note in ours.notes)


def _between(profile, seq):
    """A budget that holds the leanest int8-head plan but not the leanest bf16-head one (close under the latter,
    so a shorter sequence holds a bf16 head)."""
    lean = leanest_plan(Plan(model=profile.name), seq)
    bf16, int8 = (estimate_plan(lean.replace(head_quant=q), profile).peak_bytes for q in ("bf16", "int8"))
    budget = int((int8 + 3 * bf16) / 4 / (1 - 0.05))
    assert int8 < budget - safety_margin(budget) < bf16
    return budget


def test_fit_takes_an_int8_head_only_when_a_bf16_one_does_not_fit():
    budget = _between(GEMMA, 2048)
    result = fit_plan(GEMMA, budget=budget, base=Plan(model=GEMMA.name, seq_len=2048))
    assert result.plan.head_quant == "int8" and result.plan.seq_len == 2048
    assert any(line.startswith("LM head in int8") and "bf16 head" in line for line in result.explanation)
    roomy = fit_plan(GEMMA, budget=2 * budget, base=Plan(model=GEMMA.name, seq_len=2048))
    assert roomy.plan.head_quant == "bf16"
    pinned = fit_plan(GEMMA, budget=budget, base=Plan(model=GEMMA.name, seq_len=2048), head_quants=("bf16",))
    assert pinned.plan.head_quant == "bf16" and pinned.plan.seq_len < 2048  # gave up length instead
    hf = fit_plan(GEMMA, budget=2 * budget, base=Plan(model=GEMMA.name, seq_len=2048, stack="hf"))
    assert hf.plan.head_quant == "bf16"


def test_cli_head_quant_on_estimate_and_fit(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["estimate", "llama-3.2-1b", "--head-quant", "int8", "--no-calibration", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["plan"]["head_quant"] == "int8" and data["components"]["embeddings"] == 128256 * 2048 + 4 * 128256
    out = tmp_path / "plan.json"
    result = runner.invoke(main, ["fit", "llama-3.2-1b", "--gpu", "80GB", "--head-quant", "int8", "--out", str(out),
                                  "--no-calibration"])
    assert result.exit_code == 0, result.output
    assert "LM head in int8" in result.output and json.loads(out.read_text())["plan"]["head_quant"] == "int8"


def test_benchmark_grid_entries_name_the_head():
    from pathlib import Path

    from benchmarks.records import plan_of

    grid = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/configs/grid-int8-head.json").read_text())
    plans = [plan_of(dict(entry, model="llama-3.2-1b")) for entry in grid]
    assert [(p.head_quant, p.loss_chunk_mb) for p in plans] == [("int8", 128), ("bf16", 128), ("bf16", 256), ("int8", 128)]
    assert plans[0] == Plan(model="llama-3.2-1b", seq_len=2048, lora_rank=16, head_quant="int8", cuda_graphs=False)


def test_loss_chunk_budget_is_a_plan_setting_with_the_kernels_default():
    from vramplan_kernels import linear_cross_entropy as kernel

    assert Plan(model="m").loss_chunk_mb * 2**20 == logits.CHUNK_BUDGET_BYTES == kernel.LOGITS_CHUNK_BYTES
    assert "loss_chunk_mb" not in Plan(model="m").to_dict()
    small, large = (estimate_plan(Plan(model=LLAMA.name, loss_chunk_mb=mb), LLAMA) for mb in (128, 256))
    # Llama-3.2-1B, 2,048 tokens: the budget sets a bf16 head's chunk of logits (512 tokens, then 1,024)
    assert large.phases["forward"] - small.phases["forward"] == (1024 - 512) * 128256 * 2
    # an int8 head's vocabulary-major block is one dequantized slice wide at most: above that the budget
    # changes nothing; below it the block narrows (token-major, it set the chunk there too)
    int8 = {mb: estimate_plan(Plan(model=LLAMA.name, head_quant="int8", loss_chunk_mb=mb), LLAMA) for mb in (8, 128, 256)}
    assert int8[256].phases["forward"] == int8[128].phases["forward"] > int8[8].phases["forward"]
    with switches.forced(int8_vocab_major=False):
        token_major = {mb: estimate_plan(Plan(model=LLAMA.name, head_quant="int8", loss_chunk_mb=mb), LLAMA) for mb in (128, 256)}
    assert token_major[256].phases["forward"] - token_major[128].phases["forward"] == (1024 - 512) * (128256 * 2 + 2048 * 6)
