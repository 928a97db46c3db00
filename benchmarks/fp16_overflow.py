"""Where an fp16 step's scaled gradients overflow, on a GPU.

Session 19's H100 run (benchmarks/results/session19) saw Gemma-4-E2B's fp16 steps overflow at every loss scale
from 2^16 down to 2^10, while Llama-3.2-1B's never did and the same tiny Gemma 4 on the CPU (the kernels'
PyTorch references) never did either. This script finds the scale each variant of the trainer's patches
overflows at, and, at the highest scale, the first module whose backward turns finite gradients non-finite.

    python -m benchmarks.fp16_overflow [--model CONFIG] [--seq N] > fp16-overflow.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import random_batch
from vramplan.plan import Plan
from vramplan.train import patching, switches
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import load_for_training, lora_parameters

SCALES = [2.0 ** k for k in (16, 14, 12, 10, 8, 6, 4, 2, 0)]


def _finite(t) -> bool:
    return t is None or not isinstance(t, torch.Tensor) or bool(torch.isfinite(t).all())


def first_overflow(model, batch, scale: float) -> list[dict]:
    """The modules whose backward got finite output gradients and gave non-finite input gradients, in backward order;
    ``loss`` first where the loss's own gradient (at the first module the backward reaches) was already non-finite."""
    found, handles, reached = [], [], [False]

    def hook(name):
        def on_backward(module, grad_input, grad_output):
            if not reached[0]:
                reached[0] = True
                if not all(_finite(g) for g in grad_output):
                    found.append({"module": "loss", "type": "the loss's gradient", "grad_output_max": float("inf")})
            if all(_finite(g) for g in grad_output) and not all(_finite(g) for g in grad_input):
                found.append({"module": name, "type": type(module).__name__,
                              "grad_output_max": max(float(g.abs().max()) for g in grad_output
                                                     if isinstance(g, torch.Tensor))})
        return on_backward

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_full_backward_hook(hook(name)))
    try:
        accumulate_gradients(model, [batch], loss_scale=scale)
    finally:
        for handle in handles:
            handle.remove()
    return found[:8]


def threshold(folder, plan, batch, device, random_init: bool, scales=tuple(SCALES)) -> dict:
    """The highest scale whose adapter gradients stay finite, the max |grad| there (unscaled), and the culprits at 2^16."""
    model, _ = load_for_training(folder, plan, device, random_init_from_config=random_init)
    params = lora_parameters(model)
    result = {"finite_at": None, "by_scale": {}}
    for scale in scales:
        for p in params:
            p.grad = None
        loss, _ = accumulate_gradients(model, [batch], loss_scale=scale)
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        result["by_scale"][f"2^{int(torch.log2(torch.tensor(scale)))}"] = (
            {"finite": finite, "loss": round(float(loss), 4),
             "max_grad": max(float(g.abs().max()) for g in grads) / scale if finite else None})
        if finite and result["finite_at"] is None:
            result["finite_at"] = scale
    for p in params:
        p.grad = None
    if plan.checkpointing == "none":
        result["first_non_finite_modules"] = first_overflow(model, batch, scales[0])
        names = {id(p): n for n, p in model.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        result["non_finite_adapter_grads"] = {"count": len(bad), "of": len(params), "first": bad[:6]}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def without_patches(names: set[str]):
    kept = list(patching.KERNEL_PATCHES)
    patching.KERNEL_PATCHES[:] = [(n, f) for n, f in kept if n not in names]
    try:
        yield
    finally:
        patching.KERNEL_PATCHES[:] = kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a profile config (random weights); default the tests' tiny Gemma 4")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--variants", default=None, help="comma-separated indices of the variants to run (default all)")
    parser.add_argument("--scales", default=None, help="comma-separated powers of two to try, highest first "
                        "(default 16,14,...,0)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (fp32 there, so nothing overflows)")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp())
    if args.model:
        from benchmarks.trainer import write_config_only
        folder = str(work / "m")
        write_config_only(args.model, folder)
        random_init, vocab = True, 262144
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from train_fixtures import VOCAB, build_model, gemma4_config
        folder, random_init, vocab = str(build_model(gemma4_config(), work / "m")), False, VOCAB
    batch = random_batch(vocab, 1, args.seq, device, low=4)
    scales = [2.0 ** int(k) for k in args.scales.split(",")] if args.scales else SCALES
    norms = {n for n, _ in patching.KERNEL_PATCHES if "Norm" in n}
    mlps = {n for n, _ in patching.KERNEL_PATCHES if n not in norms}
    variants = [("as shipped", "full", None, set(), "fp16"), ("as shipped", "none", None, set(), "fp16"),
                ("bf16", "none", None, set(), "bf16"),
                ("no RMSNorm kernel", "none", None, norms, "fp16"), ("no gated-MLP kernel", "none", None, mlps, "fp16"),
                ("no Triton RoPE", "none", "rope", set(), "fp16"),
                ("no chunked attention", "none", "wide_head_attention,sliding_band_attention", set(), "fp16"),
                ("full loss", "none", None, set(), "fp16")]
    if args.variants:
        variants = [variants[int(i)] for i in args.variants.split(",")]
    for label, checkpointing, disabled, unpatched, dtype in variants:
        os.environ[switches.DISABLE_ENV] = disabled or ""
        plan = Plan(model="t", lora_rank=8, seq_len=args.seq, checkpointing=checkpointing, compute_dtype=dtype,
                    cuda_graphs=False, loss="full" if label == "full loss" else "chunked")
        with without_patches(unpatched):
            try:
                row = threshold(folder, plan, batch, device, random_init, scales)
            except Exception as err:  # a variant that cannot run says why and the others go on
                row = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps({"model": args.model or "tiny gemma4", "seq": args.seq, "variant": label,
                          "checkpointing": checkpointing, "dtype": dtype, **row}), flush=True)


if __name__ == "__main__":
    main()
