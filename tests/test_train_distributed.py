"""Training on several ranks (torchrun, gloo on the CPU): N ranks with micro-batch m train exactly as one
rank with micro-batch N·m, under DDP and FSDP2; checkpoints resume on another rank count; a failure is one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_fixtures import build_model, chat_records, gemma4_config, llama_config, write_jsonl
from vramplan.plan import Plan
from vramplan.train import adapter, checkpoint, data
from vramplan.train.recipe import TrainConfig, next_micro_batches, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_jsonl(root / "train.jsonl", chat_records(24))
    build_model(llama_config(), root / "llama")
    build_model(gemma4_config(), root / "gemma4")
    return root


def plan_file(work: Path, name: str, **fields) -> Path:
    plan = {"model": "tiny", "lora_rank": 8, "seq_len": 64, "micro_batch": 1, "grad_accum": 2, "optimizer": "adamw",
            **fields}
    path = work / f"{name}.json"
    path.write_text(json.dumps(plan))
    return path


def vramplan(*args: str, torchrun: int | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m vramplan ...`` (or under ``torchrun --nproc-per-node N``) with this checkout importable."""
    return subprocess.run(command(args, torchrun), env=environment(), capture_output=True, text=True, timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    """``python -m vramplan ...`` started, not waited for, in a process group of its own (as a terminal's job),
    SIGINT not ignored even when pytest runs as a background job (which the run would inherit, and keep)."""
    return subprocess.Popen(command(args), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def command(args, torchrun: int | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] \
        if torchrun else [sys.executable]
    return [*launcher, "-m", "vramplan", *args]


def environment() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / ".dev"), os.environ.get("PYTHONPATH", "")]),
                TRITON_INTERPRET="1", OMP_NUM_THREADS="1")


def one_rank(work: Path, name: str, out: str, **changes) -> dict:
    """The reference: one process, micro-batch 2 (what 2 ranks of micro-batch 1 are together)."""
    plan = Plan(model="tiny", lora_rank=8, seq_len=64, micro_batch=2, grad_accum=2, optimizer="adamw")
    fields = dict(plan=plan, model_dir=str(work / name), data=str(work / "train.jsonl"), output=str(work / out),
                  lr=1e-2, warmup_steps=0, progress=False)
    return train(TrainConfig(**{**fields, **changes}))


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(a: Path, b: Path) -> None:
    """The same weights up to reduction order. Adam moves an element by about the learning rate (1e-2) whatever
    its gradient's size, so an element whose gradient sits at fp32 rounding level can move differently when ranks
    sum in another order: a run read 4.0e-4 on 1 of 768. Nearly every element must agree to 3e-4 and none may
    stray by more than a fifth of one step (2e-3); a wrongly normalised or missing gradient moves most elements."""
    wa, wb = adapter.read_adapter_weights(a), adapter.read_adapter_weights(b)
    assert wa.keys() == wb.keys()
    assert any(float(w.abs().max()) > 0 for k, w in wa.items() if "lora_B" in k)  # B moved off its zero init
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-3, rtol=0)
        close = torch.isclose(wa[key], wb[key], atol=3e-4, rtol=1e-3)
        assert close.float().mean() >= 0.99, f"{key}: {int((~close).sum())} of {close.numel()} differ beyond 3e-4"


def test_ranks_take_disjoint_slices_of_the_one_rank_batch():
    rows = [[data.Example([i] * (1 + i % 5), [i] * (1 + i % 5))] for i in range(11)]
    dataset = data.Dataset(rows=rows, seq_len=8, pad_token_id=0, n_examples=11)
    plan = Plan(model="tiny", micro_batch=2, grad_accum=2)
    single, _ = next_micro_batches(dataset, checkpoint.TrainState(), plan.replace(micro_batch=4), seed=3)
    for step in range(2):
        states = [checkpoint.TrainState(cursor=8 * step) for _ in range(2)]
        shares = [next_micro_batches(dataset, states[r], plan, seed=3, rank=r, world=2)[0] for r in range(2)]
        assert states[0] == states[1]  # every rank advances the same global position
        if step == 0:
            for accum in range(2):
                together = torch.cat([shares[r][accum]["input_ids"][:, :1] for r in range(2)])
                assert together.flatten().tolist() == single[accum]["input_ids"][:, 0].tolist()
    # the epoch's tail: 3 rows for 4 places split 2 + 1; 1 row for 4 places leaves rank 1 a stand-in with no targets
    for cursor, sizes, rank1_trains in ((8, (2, 1), True), (10, (1, 1), False)):
        tail = [next_micro_batches(dataset, checkpoint.TrainState(cursor=cursor), plan.replace(grad_accum=1),
                                   seed=3, rank=r, world=2)[0][0] for r in range(2)]
        assert (tail[0]["input_ids"].shape[0], tail[1]["input_ids"].shape[0]) == sizes
        assert (tail[0]["labels"] != -100).any() and bool((tail[1]["labels"] != -100).any()) == rank1_trains


def test_shardable_linear_computes_what_the_plain_one_does():
    from vramplan.train.distributed import ShardableQLoRALinear, make_shardable
    from vramplan.train.ops import QLoRALinear

    torch.manual_seed(0)
    layer = torch.nn.Sequential(QLoRALinear.from_linear(torch.nn.Linear(96, 40, bias=False), rank=4, alpha=8))
    torch.nn.init.normal_(layer[0].lora_B.weight)
    x = torch.randn(3, 96)
    before = layer(x)
    make_shardable(layer)
    assert isinstance(layer[0], ShardableQLoRALinear)
    frozen = {name for name, p in layer.named_parameters() if not p.requires_grad}
    assert {"0.nf4_packed", "0.nf4_absmax", "0.nf4_absmax_scale", "0.nf4_absmax_code", "0.nf4_absmax_offset"} == frozen
    # the bytes as bf16 (FSDP-QLoRA's quant_storage): the same memory, a float dtype FSDP2's offload accepts
    assert layer[0].nf4_packed.dtype == torch.bfloat16 and layer[0].nf4_packed.numel() * 2 == 96 * 40 // 2
    assert layer[0].weight.packed.dtype == torch.uint8 and layer[0].weight.packed.numel() == 96 * 40 // 2
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
    layer.to(torch.float64).to(torch.float32)  # casts never touch the NF4 bytes (uint8 stays uint8)
    assert layer[0].nf4_packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer.to(torch.float32)(x), before, atol=0, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)


def test_random_init_from_config_builds_a_working_model_layer_by_layer(work):
    """The benchmarks' path: meta device, then seeded weights one layer at a time; the rotary tables are real."""
    from transformers import AutoModelForCausalLM

    from vramplan.train.loss import summed_loss
    from vramplan.train.model import load_for_training

    plan = Plan(model="tiny", lora_rank=4, seq_len=32)
    model, adapted = load_for_training(work / "llama", plan, torch.device("cpu"), random_init_from_config=True, seed=1)
    again, _ = load_for_training(work / "llama", plan, torch.device("cpu"), random_init_from_config=True, seed=1)
    assert len(adapted) == 14 and not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    reference = AutoModelForCausalLM.from_pretrained(work / "llama")
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    torch.testing.assert_close(model.model.embed_tokens.weight, again.model.embed_tokens.weight)  # seeded
    ids = torch.randint(0, 300, (1, 16))
    batch = {"input_ids": ids, "position_ids": torch.arange(16)[None], "labels": ids}
    loss, count = summed_loss(model, batch)
    assert torch.isfinite(loss) and int(count) == 16


def test_random_init_from_config_sets_what_gemma4_computes_at_init(work):
    """Gemma 4's embedding scale and per-layer scalars are buffers set at init: a model built on the
    meta device gets them from the architecture's own initialiser, not ``to_empty``'s garbage."""
    from transformers import AutoModelForCausalLM

    from vramplan.train.loss import summed_loss
    from vramplan.train.model import load_for_training

    plan = Plan(model="tiny", lora_rank=4, seq_len=32)
    model, _ = load_for_training(work / "gemma4", plan, torch.device("cpu"), random_init_from_config=True, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after to_empty (31B: 2.8 GB)
    reference = AutoModelForCausalLM.from_pretrained(work / "gemma4")
    want = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if name in want and "inv_freq" not in name:
            torch.testing.assert_close(buffer.float(), want[name].float(), msg=name)
    ids = torch.randint(0, 300, (1, 16))
    loss, count = summed_loss(model, {"input_ids": ids, "position_ids": torch.arange(16)[None], "labels": ids})
    assert torch.isfinite(loss) and 0 < float(loss.detach()) / int(count) < 20


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_rank_and_resume_on_one(work):
    """`vramplan train` with a 2-GPU plan starts torchrun itself; its checkpoint resumes in one process."""
    run = vramplan("train", str(plan_file(work, "ddp", gpus=2, parallel="ddp")), "--model", str(work / "llama"),
                   "--data", str(work / "train.jsonl"), "--output", str(work / "ddp"), "--steps", "3", "--lr", "1e-2",
                   "--warmup", "0", "--schedule", "constant")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 3 steps" in run.stdout and run.stderr.count("train:") >= 1 and "Traceback" not in run.stderr
    one_rank(work, "llama", "one", steps=5, schedule="constant")
    assert losses(work / "ddp") == pytest.approx(losses(work / "one")[:3], rel=1e-5)
    resumed = one_rank(work, "llama", "ddp", steps=5, schedule="constant", resume=str(work / "ddp"))
    assert resumed["steps"] == 5
    assert losses(work / "ddp") == pytest.approx(losses(work / "one"), rel=1e-4)
    assert_same_adapter(work / "ddp" / "adapter", work / "one" / "adapter")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "llama"), work / "ddp" / "adapter")
    assert sum("lora_B" in name for name, _ in peft.named_parameters()) == 14


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_rank_on_gemma4_and_resume_sharded(work):
    """FSDP2 shards the NF4 bytes of every layer; started by torchrun directly, grad accumulation 2; its
    whole-tensor checkpoint is sharded again when the run resumes."""
    args = ["train", str(plan_file(work, "fsdp", gpus=2, parallel="fsdp")), "--model", str(work / "gemma4"), "--data",
            str(work / "train.jsonl"), "--output", str(work / "fsdp"), "--lr", "1e-2", "--warmup", "0",
            "--schedule", "constant"]
    run = vramplan(*args, "--steps", "3", torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: 3 steps") == 1  # rank 0 reports, rank 1 stays quiet
    saved = torch.load(work / "fsdp" / "checkpoint" / "optimizer.pt", weights_only=False)
    first = saved["state"][0]["exp_avg"]
    assert type(first) is torch.Tensor and first.shape == (8, 64)  # whole, not a rank's shard
    run = vramplan(*args, "--steps", "4", "--resume", str(work / "fsdp"), torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    one_rank(work, "gemma4", "gemma-one", steps=4, schedule="constant")
    assert losses(work / "fsdp") == pytest.approx(losses(work / "gemma-one"), rel=1e-5)
    assert_same_adapter(work / "fsdp" / "adapter", work / "gemma-one" / "adapter")


@pytest.mark.slow
def test_fsdp_8bit_states_equal_one_process_fused_and_resume_on_one_rank(work, monkeypatch):
    """FSDP2 with 8-bit AdamW (VRAMPLAN_ENABLE=fused_optimizer) steps the fused kernel on each rank's
    shards and trains as one process with FusedAdamW8bit on the global batch; its whole-state
    checkpoint resumes on one rank (torchrun, one process). With 4 KV heads every LoRA tensor of
    the tiny Llama splits into 256-value halves, so 2 ranks block the states as one process does
    (one absmax per 256 values): the reference differs only by reduction order, as for AdamW. (Shards
    that re-block are converted through fp32: test_train_fused_optim.)"""
    monkeypatch.setenv("VRAMPLAN_ENABLE", "fused_optimizer")  # the ranks inherit it
    model = work / "llama-mha"
    if not model.exists():
        build_model(dict(llama_config(), num_key_value_heads=4), model)
    common = ["--model", str(model), "--data", str(work / "train.jsonl"), "--output", str(work / "fsdp8"), "--lr", "1e-2",
              "--warmup", "0", "--schedule", "constant"]
    run = vramplan("train", str(plan_file(work, "fsdp8", gpus=2, parallel="fsdp", optimizer="adamw8bit")), *common,
                   "--steps", "3", torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: optimizer" not in run.stderr  # no torch AdamW stand-in
    saved = torch.load(work / "fsdp8" / "checkpoint" / "optimizer.pt", weights_only=False)
    first = saved["state"][0]
    assert first["state1"].dtype == torch.uint8 and first["state1"].numel() == 8 * 64  # whole
    assert first["shards"].tolist() == [256, 256] and first["absmax1"].numel() == 2 and float(first["step"]) == 3
    one = plan_file(work, "fsdp8-one", gpus=1, parallel="fsdp", optimizer="adamw8bit", micro_batch=2)
    run = vramplan("train", str(one), *common, "--steps", "5", "--resume", str(work / "fsdp8"), torchrun=1)
    assert run.returncode == 0, run.stderr[-3000:]
    plan = Plan(model="tiny", lora_rank=8, seq_len=64, micro_batch=2, grad_accum=2, optimizer="adamw8bit")
    one_rank(work, "llama-mha", "fused-one", steps=5, schedule="constant", plan=plan)
    assert losses(work / "fsdp8") == pytest.approx(losses(work / "fused-one"), rel=1e-5)
    assert_same_adapter(work / "fsdp8" / "adapter", work / "fused-one" / "adapter")


@pytest.mark.slow
def test_fsdp_8bit_states_reblock_when_a_run_resumes_on_fewer_ranks(work, monkeypatch):
    """With 2 KV heads k_proj's and v_proj's B (32×8) split into two 128-value shards, each blocked
    on its own; resumed on one rank they re-block into one 256-value block through fp32. The run
    continues, and stays near one process with FusedAdamW8bit (one block from the start): 8-bit
    moments of those 4 of 28 tensors differ by at most a code step of their block's absmax, far
    below what an lr of 1e-2 moves the loss from step to step."""
    monkeypatch.setenv("VRAMPLAN_ENABLE", "fused_optimizer")
    common = ["--model", str(work / "llama"), "--data", str(work / "train.jsonl"), "--output", str(work / "reblock"),
              "--lr", "1e-2", "--warmup", "0", "--schedule", "constant"]
    run = vramplan("train", str(plan_file(work, "reblock", gpus=2, parallel="fsdp", optimizer="adamw8bit")), *common,
                   "--steps", "2", torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(work / "reblock" / "checkpoint" / "optimizer.pt", weights_only=False)
    assert sorted({tuple(e["shards"].tolist()) for e in saved["state"].values()}) == [(128, 128), (256, 256), (512, 512)]
    one = plan_file(work, "reblock-one", gpus=1, parallel="fsdp", optimizer="adamw8bit", micro_batch=2)
    run = vramplan("train", str(one), *common, "--steps", "4", "--resume", str(work / "reblock"), torchrun=1)
    assert run.returncode == 0, run.stderr[-3000:]
    plan = Plan(model="tiny", lora_rank=8, seq_len=64, micro_batch=2, grad_accum=2, optimizer="adamw8bit")
    one_rank(work, "llama", "reblock-ref", steps=4, schedule="constant", plan=plan)
    ours, ref = losses(work / "reblock"), losses(work / "reblock-ref")
    assert len(ours) == 4 and ours[0] == pytest.approx(ref[0], rel=1e-6)
    assert ours == pytest.approx(ref, rel=1e-3) and abs(ours[-1] - ref[-1]) < 0.05 * (ref[0] - ref[-1])


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_one_line(work, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "the cat"}', '{"prompt": "a"}'])
    run = vramplan("train", str(plan_file(work, "fail", gpus=2, parallel="ddp")), "--model", str(work / "llama"), "--data", str(bad),
                   "--output", str(tmp_path / "out"))
    assert run.returncode == 2
    assert run.stderr.count("error: ") == 1 and "bad.jsonl:2" in run.stderr and "Traceback" not in run.stderr
    # only rank 0 writes: an output folder inside a file fails rank 0 alone; the launcher names it and ends rank 1
    (tmp_path / "taken").write_text("")
    run = vramplan("train", str(plan_file(work, "fail", gpus=2, parallel="ddp")), "--model", str(work / "llama"), "--data",
                   str(work / "train.jsonl"), "--output", str(tmp_path / "taken" / "run"), "--steps", "2")
    assert run.returncode == 1
    assert "(rank 0)" in run.stderr and run.stderr.count("Traceback") == 1 and "done" not in run.stdout


@pytest.mark.slow
def test_one_gpu_fsdp_plan_starts_torchrun_and_equals_the_plain_run(work):
    """A one-GPU FSDP2 plan (what fit proposes when only CPU offload fits) is started under torchrun with one
    process by `vramplan train` itself and computes what the plain run does. (CPU offload itself needs a GPU.)"""
    plan = plan_file(work, "fsdp-one", gpus=1, parallel="fsdp", micro_batch=2)
    run = vramplan("train", str(plan), "--model", str(work / "llama"), "--data", str(work / "train.jsonl"),
                   "--output", str(work / "fsdp-one"), "--steps", "3", "--lr", "1e-2", "--warmup", "0",
                   "--schedule", "constant")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 3 steps" in run.stdout and "note: optimizer" not in run.stderr  # the plan's adamw runs as planned
    one_rank(work, "llama", "plain-for-fsdp-one", steps=3, schedule="constant")
    assert losses(work / "fsdp-one") == pytest.approx(losses(work / "plain-for-fsdp-one"), rel=1e-5)
    assert_same_adapter(work / "fsdp-one" / "adapter", work / "plain-for-fsdp-one" / "adapter")


# --------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM on several ranks: every rank stops at the same step boundary, saves, exits 130 / 143
# --------------------------------------------------------------------------------------------

STOP_STEPS = 24  # ~0.1 s a step: the signal lands long before the end


@pytest.fixture(scope="module")
def uninterrupted(work) -> Path:
    one_rank(work, "llama", "uninterrupted", steps=STOP_STEPS, schedule="constant")
    return work / "uninterrupted"


def start_run(work: Path, out: Path, **plan) -> subprocess.Popen:
    """A run started by `vramplan train` (a 2-rank DDP plan by default: its launcher starts torchrun), once it has logged a step."""
    plan = plan or {"gpus": 2, "parallel": "ddp"}
    run = start("train", str(plan_file(work, f"stop-{out.name}", **plan)), "--model", str(work / "llama"), "--data",
                str(work / "train.jsonl"), "--output", str(out), "--steps", str(STOP_STEPS), "--lr", "1e-2",
                "--warmup", "0", "--schedule", "constant")
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.02)
    return run


def assert_stopped_with_a_checkpoint(run: subprocess.Popen, out: Path, code: int, name: str) -> int:
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == code, stderr[-3000:]
    step = json.loads((out / "checkpoint" / checkpoint.STATE_FILE).read_text())["step"]
    assert 0 < step < STOP_STEPS and len(losses(out)) == step
    assert stdout.strip() == f"stopped after {step} steps ({name}); checkpoint in {out}/checkpoint (continue with --resume {out})"
    assert "Traceback" not in stderr and "error" not in stderr and not (out / "adapter").exists()
    return step


def rank_pid(out: Path, rank: int) -> int:
    """The pid of one rank of the run writing to ``out`` (its command line names the folder; torchrun set RANK)."""
    for entry in Path("/proc").iterdir():
        try:
            command_line, variables = ((entry / name).read_bytes().split(b"\0") for name in ("cmdline", "environ"))
        except (OSError, ValueError):
            continue
        if str(out).encode() in command_line and f"RANK={rank}".encode() in variables:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} writing to {out}")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_both_ranks_and_resumes_on_one(work, uninterrupted):
    """As a terminal's Ctrl-C: SIGINT to the launcher's process group; torchrun passes it on to the ranks."""
    out = work / "stop-group"
    run = start_run(work, out)
    os.killpg(run.pid, signal.SIGINT)
    assert_stopped_with_a_checkpoint(run, out, 130, "SIGINT")
    resumed = one_rank(work, "llama", out.name, steps=STOP_STEPS, schedule="constant", resume=str(out))
    assert resumed["steps"] == STOP_STEPS
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-4)
    assert_same_adapter(out / "adapter", uninterrupted / "adapter")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid in /proc")
def test_sigint_to_one_rank_stops_both_and_resumes_on_two(work, uninterrupted):
    """As ``kill -INT <pid>`` of rank 1 alone: the step-boundary all-reduce tells rank 0, and both save and stop."""
    out = work / "stop-one-rank"
    run = start_run(work, out)
    os.kill(rank_pid(out, 1), signal.SIGINT)
    assert_stopped_with_a_checkpoint(run, out, 130, "SIGINT")
    resumed = vramplan("train", str(plan_file(work, "ddp-stop", gpus=2, parallel="ddp")), "--model", str(work / "llama"),
                       "--data", str(work / "train.jsonl"), "--output", str(out), "--steps", str(STOP_STEPS), "--lr", "1e-2",
                       "--warmup", "0", "--schedule", "constant", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-4)
    assert_same_adapter(out / "adapter", uninterrupted / "adapter")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_it_the_same_way(work, uninterrupted):
    """One process, no torchrun: the same flag and step boundary, no collective; SIGTERM (a scheduler's) exits 143."""
    out = work / "stop-one-process"
    run = start_run(work, out, micro_batch=2)  # the one-rank reference's plan
    run.send_signal(signal.SIGTERM)
    assert_stopped_with_a_checkpoint(run, out, 143, "SIGTERM")
    one_rank(work, "llama", out.name, steps=STOP_STEPS, schedule="constant", resume=str(out))
    assert_same_adapter(out / "adapter", uninterrupted / "adapter")
