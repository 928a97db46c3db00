"""The whole recipe on tiny random models: the loss falls, resume is exact, the adapter loads in PEFT."""

import json

import pytest
import torch

from train_fixtures import (gemma3_config, gemma4_config, llama_config, mistral_config, models_with_data, qwen3_config,
                            write_jsonl)
from vramplan.errors import VramplanError
from vramplan.plan import Plan
from vramplan.train import adapter, ops, switches
from vramplan.train.recipe import TrainConfig, train

pytestmark = pytest.mark.slow

CONFIGS = {"llama": llama_config, "gemma4": gemma4_config, "qwen3": qwen3_config, "gemma3": gemma3_config,
           "mistral": mistral_config}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = models_with_data(tmp_path_factory.mktemp("recipe"), CONFIGS)
    return root


def config(work, name, out, **changes):
    plan = Plan(model=name, lora_rank=8, seq_len=64, micro_batch=2, grad_accum=1, checkpointing="full")
    fields = dict(plan=plan, model_dir=str(work / name), data=str(work / "train.jsonl"), output=str(work / out),
                  lr=1e-2, warmup_steps=2, progress=False)
    fields.update(changes)
    return TrainConfig(**fields)


def peft_logits(work, name, run, ids):
    """Logits of PEFT on the base whose target weights went through the same NF4 round trip."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32)
    targets = set(Plan(model=name).lora_targets)
    with torch.no_grad():
        for path, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and path.rpartition(".")[2] in targets:
                module.weight.copy_(ops.dequantize_nf4(ops.quantize_nf4(module.weight), torch.float32))
    model = PeftModel.from_pretrained(base, work / run / "adapter").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainer_logits(work, name, run, ids):
    from vramplan.train.model import load_for_training

    model, _ = load_for_training(work / name, Plan(model=name, lora_rank=8, seq_len=64), torch.device("cpu"))
    adapter.load_lora_state_dict(model, adapter.read_adapter_weights(work / run / "adapter"))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_falls_and_adapter_loads_in_peft(work, name):
    summary = train(config(work, name, f"{name}-run", steps=24))
    records = [json.loads(line) for line in (work / f"{name}-run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 24 and len(records) == 24
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_allocated", "peak_reserved", "process_memory"} <= set(records[0])
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert (work / f"{name}-run" / "loss.png").stat().st_size > 1000
    saved = json.loads((work / f"{name}-run" / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    ids = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18]])
    ours, theirs = trainer_logits(work, name, f"{name}-run", ids), peft_logits(work, name, f"{name}-run", ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["plan", "fused"])
def test_resume_continues_exactly(work, optimizer, monkeypatch):
    """Also with the fused 8-bit AdamW (``VRAMPLAN_ENABLE=fused_optimizer``), whose state is saved and loaded."""
    if optimizer == "fused":
        monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    straight_dir, split_dir = f"straight-{optimizer}", f"split-{optimizer}"
    straight = train(config(work, "llama", straight_dir, steps=8, save_every=100))
    stopped = train(config(work, "llama", split_dir, steps=8, stop_after=4))
    assert stopped["interrupted"] and stopped["steps"] == 4
    with open(work / split_dir / "metrics.jsonl", "a") as log:  # a step logged after the checkpoint, then a crash
        log.write(json.dumps({"step": 5, "loss": 9.9}) + "\n")
    resumed = train(config(work, "llama", split_dir, steps=8, resume=str(work / split_dir)))
    assert resumed["steps"] == 8 and not resumed["interrupted"]
    logged = [json.loads(line)["step"] for line in (work / split_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))
    if optimizer == "fused":
        saved = torch.load(work / split_dir / "checkpoint" / "optimizer.pt", weights_only=False)["state"][0]
        assert saved["state1"].dtype == torch.uint8 and saved["step"].item() == 8
    a = adapter.read_adapter_weights(work / straight_dir / "adapter")
    b = adapter.read_adapter_weights(work / split_dir / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert straight["loss"] == pytest.approx(resumed["loss"], rel=1e-5)


def test_fused_optimizer_trains(work, monkeypatch):
    """The fused 8-bit AdamW through the whole recipe: the loss falls, the norm is logged after the step."""
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    summary = train(config(work, "llama", "fused-run", steps=24))
    records = [json.loads(line) for line in (work / "fused-run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 24 and not summary["notes"]
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in records)
    saved = torch.load(work / "fused-run" / "checkpoint" / "optimizer.pt", weights_only=False)["state"][0]
    assert saved["state1"].dtype == torch.uint8 and saved["absmax1"].numel() == saved["state1"].numel() // 256


def test_queueing_leaves_an_optimizer_without_a_sync_of_its_own_as_it_is(work, monkeypatch):
    """queued_optimizer only takes over bitsandbytes' last sync (optim.queues_whole): the fused AdamW, which
    never waits, steps as it does without the switch."""
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    plain = train(config(work, "llama", "fused-plain", steps=3))
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer,queued_optimizer")
    queued = train(config(work, "llama", "fused-queued", steps=3))
    assert queued["steps"] == plain["steps"] == 3
    assert queued["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_bad_data_fails_before_the_model_loads(work, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "the cat"}', '{"prompt": "a"}'])
    with pytest.raises(VramplanError, match="bad.jsonl:2"):
        train(config(work, "llama", "bad", steps=1, data=str(bad), model_dir=str(tmp_path / "no-model-here")))


def test_nan_loss_stops_with_the_step_named(work):
    with pytest.raises(VramplanError, match=r"loss became nan at step \d+"):
        train(config(work, "llama", "nan", steps=10, lr=1e30, warmup_steps=0, schedule="constant"))


def test_the_overlapped_step_logs_what_the_waiting_one_does(work, monkeypatch):
    """Reading the loss and the norm after the optimizer's step is queued (the default) changes no number."""
    def logged(out):
        return [(r["loss"], r["grad_norm"], r["target_tokens"])
                for r in map(json.loads, (work / out / "metrics.jsonl").read_text().splitlines())]

    train(config(work, "llama", "overlapped", steps=5))
    monkeypatch.setenv(switches.ENABLE_ENV, "queued_optimizer")  # bitsandbytes' last sync left to train_step's
    train(config(work, "llama", "queued", steps=5))
    monkeypatch.delenv(switches.ENABLE_ENV)
    monkeypatch.setenv(switches.DISABLE_ENV, "overlap_optimizer")
    train(config(work, "llama", "waiting", steps=5))
    overlapped, waiting = logged("overlapped"), logged("waiting")
    assert len(overlapped) == len(waiting) == len(logged("queued")) == 5
    for other in (logged("queued"), waiting):
        for (loss, norm, tokens), (loss_o, norm_o, tokens_o) in zip(overlapped, other):
            assert loss == pytest.approx(loss_o, rel=1e-6) and norm == pytest.approx(norm_o, rel=1e-6)
            assert tokens == tokens_o
    assert all(isinstance(loss, float) and isinstance(tokens, int) for loss, _, tokens in logged("overlapped"))


def test_a_nan_read_after_the_step_keeps_the_last_checkpoint(work):
    """Overlapped, the step that made the loss non-finite has already run in memory when it is read:
    the error must still come before any save, so the checkpoint on disk is the last finite one."""
    run = work / "nan-saved"
    with pytest.raises(VramplanError, match=r"(loss|gradient) became nan at step (\d+)") as caught:
        train(config(work, "llama", "nan-saved", steps=10, lr=1e30, warmup_steps=0, schedule="constant", save_every=1))
    failed_at = int(caught.value.args[0].split("at step ")[1].split(";")[0])
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == failed_at - 1
    saved = adapter.read_adapter_weights(run / "checkpoint")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_missing_model_folder_is_a_user_error(work, tmp_path):
    with pytest.raises(VramplanError, match="no config.json"):
        train(config(work, "llama", "nomodel", steps=1, model_dir=str(tmp_path / "absent")))


def test_cli_trains_with_plan_overrides(work):
    from click.testing import CliRunner

    from vramplan.cli import main

    (work / "plan.json").write_text(json.dumps({"plan": {"model": "tiny", "seq_len": 2048, "lora_rank": 16}}))
    out = work / "cli-run"
    result = CliRunner().invoke(main, ["train", str(work / "plan.json"), "--model", str(work / "llama"), "--data",
                                       str(work / "train.jsonl"), "--output", str(out), "--steps", "3", "--rank", "4",
                                       "--seq", "32", "--batch", "1", "--accum", "2", "--optim", "adamw",
                                       "--lr", "1e-2", "--merge"])
    assert result.exit_code == 0, result.output
    assert "done: 3 steps" in result.output
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["plan"]["seq_len"] == 32
    # --merge: base + scale·B·A in bf16, equal to PEFT's merge of the same adapter on the original weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 12, 30, 25, 9, 40]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "llama"), out / "adapter")
    peft = peft.merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(work / "llama").eval()
    with torch.no_grad():
        ours, theirs, unmerged = merged(input_ids=ids).logits, peft(input_ids=ids).logits, base(input_ids=ids).logits
    effect, error = (theirs - unmerged).abs().max(), (ours - theirs).abs().max()
    assert error < 0.1 * effect, (float(error), float(effect))  # bf16 rounding only, against a real change
    bad = CliRunner().invoke(main, ["train", str(work / "plan.json"), "--model", str(work / "llama"), "--data",
                                    str(work / "missing.jsonl"), "--output", str(out)])
    assert bad.exit_code == 2 and "missing.jsonl does not exist" in bad.output


def test_cli_train_json_prints_the_run_summary_alone_on_stdout(work):
    from click.testing import CliRunner

    from vramplan.cli import main

    (work / "plan-json.json").write_text(json.dumps({"plan": {"model": "tiny", "seq_len": 32, "lora_rank": 4,
                                                               "optimizer": "adamw"}}))
    out = work / "json-run"
    result = CliRunner().invoke(main, ["train", str(work / "plan-json.json"), "--model", str(work / "llama"), "--data",
                                       str(work / "train.jsonl"), "--output", str(out), "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["interrupted"] is False and summary["output"] == str(out)
    assert isinstance(summary["notes"], list)


def test_planned_peak_comes_from_the_planner_for_the_folder_architecture(tmp_path):
    from vramplan.catalog import resolve_model
    from vramplan.estimate import estimate_plan
    from vramplan.plan import Plan
    from vramplan.train.recipe import planned_peak_bytes

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
        '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}')
    plan = Plan(model="whatever", seq_len=512, stack="hf")
    expected = estimate_plan(plan.replace(stack="vramplan"), resolve_model(str(folder))).peak_bytes
    assert planned_peak_bytes(plan, str(folder)) == expected
    assert planned_peak_bytes(plan.replace(seq_len=4096), str(folder)) > expected
    assert planned_peak_bytes(plan, str(tmp_path / "missing")) is None
