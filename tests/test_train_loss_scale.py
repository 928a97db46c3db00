"""fp16 steps' dynamic loss scaling: a scaled step updates what an unscaled one does, an overflowing backward
runs again at half the scale and then updates what a clean one does, and a resumed run keeps its scale."""

import json
import math

import pytest
import torch

from train_fixtures import build_model, compute_in_fp16, llama_config, models_with_data
from vramplan.errors import VramplanError
from vramplan.plan import Plan
from vramplan.train import data, recipe, switches
from vramplan.train.loss_scale import MIN_SCALE, LossScale, for_dtype
from vramplan.train.model import load_for_training, lora_parameters
from vramplan.train.recipe import TrainConfig, make_optimizer, make_scheduler, train, train_step

CPU = torch.device("cpu")


def test_the_scale_grows_after_clean_steps_and_halves_after_an_overflow():
    scale = LossScale(scale=8.0, growth_interval=3)
    for step in range(3):
        scale.update(True, step)
    assert (scale.scale, scale.clean_steps) == (16.0, 0)
    scale.update(True, 3)
    scale.update(False, 4)
    assert (scale.scale, scale.clean_steps, scale.overflows) == (8.0, 0, 1)
    assert LossScale.from_state_dict(json.loads(json.dumps(scale.state_dict()))) == scale
    # session 18's checkpoints counted skipped steps
    assert LossScale.from_state_dict({"scale": 4.0, "growth_interval": 3, "clean_steps": 1, "skipped_steps": 2}).overflows == 2


def test_gradients_that_overflow_at_every_scale_end_the_run_with_the_fix_named():
    scale = LossScale(scale=MIN_SCALE)
    with pytest.raises(VramplanError, match=r"overflow fp16 at every loss scale \(step 7\).*bf16"):
        scale.update(False, 6)


def test_only_fp16_arithmetic_is_scaled():
    assert isinstance(for_dtype(torch.float16), LossScale)
    assert for_dtype(torch.bfloat16) is None and for_dtype(torch.float32) is None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(llama_config(), tmp_path_factory.mktemp("scale") / "llama")


def batches(n: int = 2) -> list[dict]:
    rows = [[data.to_example(list(range(3 + i, 30 + 2 * i)), [True] * (27 + i))] for i in range(n)]
    return [data.collate([row], 0) for row in rows]


def stepper(llama, optimizer_name: str):
    """A tiny Llama with random adapters (B nonzero, so every adapter weight gets a gradient), its optimizer and schedule."""
    plan = Plan(model="tiny", lora_rank=4, seq_len=64, checkpointing="none", optimizer=optimizer_name)
    model, _ = load_for_training(llama, plan, CPU)
    torch.manual_seed(1)
    params = lora_parameters(model)
    with torch.no_grad():
        for param in params:
            param.normal_(std=0.1)
    optimizer, _ = make_optimizer(params, plan, 1e-3, 0.0, CPU)
    return model, params, optimizer, make_scheduler(optimizer, "constant", 0, 10)


OPTIMIZERS = ["adamw", "paged_adamw8bit", "fused"]


def run_optimizer(monkeypatch, name: str) -> str:
    if name == "fused":  # the fused 8-bit AdamW: its norm stays on the device and its step skips itself
        monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
        return "adamw8bit"
    return name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_scaled_step_updates_what_an_unscaled_one_does(llama, monkeypatch, name):
    """Multiplying the loss and dividing the gradients by a power of two is exact in fp32: the same update."""
    optimizer_name = run_optimizer(monkeypatch, name)
    results = []
    for scaler in (None, LossScale(scale=2.0 ** 12)):
        model, params, optimizer, scheduler = stepper(llama, optimizer_name)
        norms = [train_step(model, batches(), optimizer, params, 1.0, step, CPU, scheduler=scheduler, scaler=scaler)[2]
                 for step in range(3)]
        results.append((norms, [p.detach().clone() for p in params]))
    (plain_norms, plain), (scaled_norms, scaled) = results
    assert scaled_norms == pytest.approx(plain_norms, rel=1e-6)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def poison(model, passes: int | None = None) -> list[int]:
    """Make the final norm's output gradient infinite (what an activation gradient overflowing fp16 hands back) in the
    first ``passes`` forward passes of a micro-batch, or in all of them; returns the count of forwards so far."""
    count = [0]

    def overflow(module, args, output):
        count[0] += 1
        if passes is None or count[0] <= passes:
            output.register_hook(lambda grad: grad * float("inf"))

    model.model.norm.register_forward_hook(overflow)
    return count


@pytest.mark.parametrize("settled", [True, False], ids=["settled", "seeking"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_overflowing_pass_runs_again_at_half_the_scale_and_updates_what_a_clean_one_does(llama, monkeypatch, name,
                                                                                            settled):
    """Once a step has updated (``settled``) an overflow runs the whole step again; before, the scale is sought on the
    step's first micro-batch alone (one forward an overflow, then one that holds), and then the whole step runs."""
    optimizer_name = run_optimizer(monkeypatch, name)
    model, params, optimizer, scheduler = stepper(llama, optimizer_name)
    forwards = poison(model, passes=1)  # the first micro-batch's first forward overflows
    scaler = LossScale(scale=2.0 ** 12, settled=settled)
    loss, targets, norm = train_step(model, batches(), optimizer, params, 1.0, 0, CPU, scheduler=scheduler, scaler=scaler)
    assert (scaler.scale, scaler.overflows, scaler.clean_steps, scaler.settled) == (2.0 ** 11, 1, 1, True)
    assert forwards[0] == (2 + 2 if settled else 1 + 1 + 2)
    assert scheduler.last_epoch == 1  # one update, one schedule step
    clean_model, clean_params, clean_optimizer, clean_scheduler = stepper(llama, optimizer_name)
    clean_loss, clean_targets, clean_norm = train_step(clean_model, batches(), clean_optimizer, clean_params, 1.0, 0,
                                                       CPU, scheduler=clean_scheduler, scaler=None)
    assert (loss, targets) == (pytest.approx(clean_loss, rel=1e-6), clean_targets)
    assert norm == pytest.approx(clean_norm, rel=1e-6)  # nothing of the overflowed passes is carried over
    for ours, clean in zip(params, clean_params):
        torch.testing.assert_close(ours, clean, rtol=1e-6, atol=1e-7)


def test_gradients_that_overflow_at_every_scale_end_the_step_with_the_fix_named(llama):
    model, params, optimizer, scheduler = stepper(llama, "adamw")
    poison(model)
    before = [p.detach().clone() for p in params]
    with pytest.raises(VramplanError, match=r"overflow fp16 at every loss scale \(step 3\)"):
        train_step(model, batches(), optimizer, params, 1.0, 2, CPU, scheduler=scheduler, scaler=LossScale(scale=4 * MIN_SCALE))
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_a_resumed_fp16_run_keeps_its_scale(tmp_path, monkeypatch):
    """The CPU computes in fp32, so the scale is forced here as a GPU without bf16 would start it."""
    work = models_with_data(tmp_path, {"llama": llama_config})
    monkeypatch.setattr(recipe, "for_dtype", lambda dtype: LossScale(scale=2.0 ** 10, growth_interval=3))
    plan = Plan(model="llama", lora_rank=8, seq_len=64, micro_batch=2, checkpointing="full")

    def config(out, **changes):
        return TrainConfig(plan=plan, model_dir=str(work / "llama"), data=str(work / "train.jsonl"), output=str(out),
                           lr=1e-2, warmup_steps=0, progress=False, steps=8, **changes)

    straight = train(config(tmp_path / "straight"))
    train(config(tmp_path / "split", stop_after=4))
    saved = json.loads((tmp_path / "split" / "checkpoint" / "trainer_state.json").read_text())["loss_scale"]
    assert (saved["scale"], saved["clean_steps"]) == (2.0 ** 11, 1)  # grown after 3 clean steps, one more since
    resumed = train(config(tmp_path / "split", resume=str(tmp_path / "split")))
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in records] == [2.0 ** 10] * 2 + [2.0 ** 11] * 3 + [2.0 ** 12] * 3
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)


def test_sharded_gradients_unscale_in_place(tmp_path):
    """FSDP2's gradients are DTensors: the unscaling divides their shards (one gloo rank, in a process of its own)."""
    import subprocess
    import sys

    script = tmp_path / "sharded.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1)\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from torch.distributed.tensor import DTensor\n"
        "from vramplan.train.loss_scale import LossScale\n"
        "torch.manual_seed(0)\n"
        "layer = torch.nn.Linear(8, 4)\n"
        "fully_shard(layer)\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "assert isinstance(layer.weight.grad, DTensor)\n"
        "before = [p.grad.full_tensor().clone() for p in layer.parameters()]\n"
        "LossScale(scale=4.0).unscale_(list(layer.parameters()))\n"
        "assert all(torch.equal(p.grad.full_tensor(), b / 4) for p, b in zip(layer.parameters(), before))\n"
        "dist.destroy_process_group()\n"
        "print('unscaled')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "unscaled" in done.stdout, done.stderr[-2000:]


def test_fp16_arithmetic_past_its_range_runs_each_step_again_until_it_fits(tmp_path, monkeypatch):
    """Real fp16 arithmetic (the trainer's CPU path in fp16, as a T4 computes) with the scale started where the
    backward overflows fp16 (2^24 x a token's gradient): the first step seeks its scale on its first micro-batch at
    halved scales until its gradients are finite, then every step updates, and the run trains exactly as one started
    at a scale that never overflowed."""
    work = models_with_data(tmp_path, {"llama": llama_config})
    compute_in_fp16(monkeypatch)
    plan = Plan(model="llama", lora_rank=8, seq_len=64, grad_accum=2, checkpointing="none", compute_dtype="fp16")
    runs = {}
    for start in (2.0 ** 24, 2.0 ** 8):
        monkeypatch.setattr(recipe, "for_dtype", lambda dtype, start=start: LossScale(scale=start))
        out = tmp_path / f"start-{start:g}"
        train(TrainConfig(plan=plan, model_dir=str(work / "llama"), data=str(work / "train.jsonl"), output=str(out),
                          lr=1e-2, warmup_steps=0, progress=False, steps=6))
        runs[start] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    high, low = runs[2.0 ** 24], runs[2.0 ** 8]
    assert high[0]["loss_scale_overflows"] >= 4 and high[0]["loss_scale"] <= 2.0 ** 20  # fell on the first step
    assert all(r["loss_scale_overflows"] == 0 for r in low)
    assert all(math.isfinite(r["grad_norm"]) for r in high)
    assert [r["grad_norm"] for r in high] == pytest.approx([r["grad_norm"] for r in low], rel=2e-3)
    assert [r["loss"] for r in high] == pytest.approx([r["loss"] for r in low], rel=2e-3)
    assert high[-1]["loss"] < high[0]["loss"]
