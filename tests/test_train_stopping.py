"""Ctrl-C and SIGTERM while training: a flag, a stop with a checkpoint at the step boundary, a second Ctrl-C that
quits without one, and checkpoint renames no signal can split. (Several ranks: test_train_distributed.py.)"""

import json
import signal

import pytest
import torch

from train_fixtures import build_model, chat_records, llama_config, write_jsonl
from vramplan.atomic import replace_dir_atomic
from vramplan.plan import Plan
from vramplan.train import checkpoint, recipe, stopping
from vramplan.train.recipe import TrainConfig, train


@pytest.fixture(autouse=True)
def python_default_handlers():
    """Python's own SIGINT handler whatever started pytest (a background job inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    write_jsonl(root / "train.jsonl", chat_records(24))
    build_model(llama_config(), root / "llama")
    return root


def config(work, out, **changes) -> TrainConfig:
    plan = Plan(model="tiny", lora_rank=8, seq_len=64, micro_batch=2, grad_accum=1, optimizer="adamw")
    return TrainConfig(**{**dict(plan=plan, model_dir=str(work / "llama"), data=str(work / "train.jsonl"),
                                 output=str(work / out), lr=1e-2, warmup_steps=0, progress=False), **changes})


def signals_during_step(monkeypatch, step: int, *signums: int) -> None:
    """Deliver ``signums`` to this process in the middle of step ``step`` (inside its forward and backward)."""
    real, calls = recipe.accumulate_gradients, []

    def accumulate(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            for signum in signums:
                signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "accumulate_gradients", accumulate)


def test_signals_set_a_flag_and_a_later_second_ctrl_c_raises(monkeypatch):
    with stopping.StopRequests(announce=False) as requests:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a relayed copy of the same Ctrl-C
        signal.raise_signal(signal.SIGTERM)  # torchrun's, once a peer rank has exited
        assert requests.signal == signal.SIGINT and requests.agreed(1, torch.device("cpu")) == signal.SIGINT
        monkeypatch.setattr(stopping, "RELAY_WINDOW_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.default_int_handler, signal.SIG_DFL)
    assert stopping.exit_code(signal.SIGINT) == 130 and stopping.exit_code(signal.SIGTERM) == 143


def test_an_ignored_signal_stays_ignored():
    """``nohup``, or a shell's background job (SIGINT ignored): Ctrl-C was never meant to reach it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stopping.StopRequests(announce=False) as requests:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
    assert requests.signal == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_mid_step_stops_after_that_step_with_a_checkpoint(work, monkeypatch):
    signals_during_step(monkeypatch, 2, signal.SIGTERM)
    summary = train(config(work, "stopped", steps=6))
    assert summary["interrupted"] and summary["steps"] == 2  # the step under way finished, none after it
    assert (summary["signal"], summary["exit_code"]) == ("SIGTERM", 143)
    saved = json.loads((work / "stopped" / "checkpoint" / checkpoint.STATE_FILE).read_text())
    assert saved["step"] == 2 and not (work / "stopped" / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # one process: the handlers are back when train returns


def test_a_second_ctrl_c_quits_at_once_and_keeps_the_last_checkpoint(work, monkeypatch):
    monkeypatch.setattr(stopping, "RELAY_WINDOW_S", 0.0)
    signals_during_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    out = work / "aborted"
    with pytest.raises(stopping.Aborted, match=r"at step 2 \(Ctrl-C twice\); the last checkpoint is kept") as err:
        train(config(work, "aborted", steps=6, save_every=1))
    assert err.value.exit_code == 130 and f"--resume {out}" in str(err.value)
    assert json.loads((out / "checkpoint" / checkpoint.STATE_FILE).read_text())["step"] == 2  # step 3 dropped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_between_the_checkpoint_renames_waits_until_both_are_done(tmp_path, monkeypatch):
    """The old folder is renamed away, then the new one into place: a Ctrl-C in between would leave neither."""
    import vramplan.atomic as atomic

    final, staging = tmp_path / "checkpoint", tmp_path / ".checkpoint.new"
    for folder, text in ((final, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "state").write_text(text)
    real = atomic.os.replace

    def replace(src, dst):
        real(src, dst)
        if src == final:  # the old one is gone from its place: Ctrl-C now
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        replace_dir_atomic(staging, final)
    assert (final / "state").read_text() == "new"
