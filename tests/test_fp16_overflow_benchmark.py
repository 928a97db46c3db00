"""benchmarks/fp16_overflow.py, the diagnosis of where an fp16 step's scaled gradients overflow, on the CPU in real fp16
arithmetic (the trainer's CPU path with its compute dtype set to fp16, as a T4 computes)."""

import torch

from benchmarks import fp16_overflow
from benchmarks.harness import random_batch
from train_fixtures import VOCAB, build_model, compute_in_fp16, gemma4_config
from vramplan.plan import Plan


def test_the_highest_finite_scale_and_the_modules_where_the_overflow_starts(tmp_path, monkeypatch):
    compute_in_fp16(monkeypatch)
    folder = build_model(gemma4_config(), tmp_path / "gemma4")
    batch = random_batch(VOCAB, 1, 32, "cpu", low=4)
    plan = Plan(model="t", lora_rank=8, seq_len=32, checkpointing="none", compute_dtype="fp16", cuda_graphs=False)
    row = fp16_overflow.threshold(str(folder), plan, batch, torch.device("cpu"), False, scales=[2.0 ** 30, 2.0 ** 8])
    assert row["finite_at"] == 2.0 ** 8  # a token's gradient x 2^30 is past fp16's 65,504; x 2^8 is not
    assert not row["by_scale"]["2^30"]["finite"] and row["by_scale"]["2^8"]["max_grad"] > 0
    culprits = row["first_non_finite_modules"]  # the loss's own gradient, or a module's finite in and non-finite out
    assert culprits and all(c["module"] == "loss" or c["grad_output_max"] < float("inf") for c in culprits)
    assert row["non_finite_adapter_grads"]["count"] > 0
