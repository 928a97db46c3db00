"""Host ops of one optimizer step of the hf recipe (transformers + PEFT + bitsandbytes), counted on the CPU.

The sibling of :mod:`benchmarks.launch_count`, which counts vramplan's trainer: the same counter
(:class:`~benchmarks.launch_count.LaunchCounter`, a ``TorchDispatchMode``), the same tiny models with
the real architectures' structure (layer count, layer types, qk-norms, Gemma 4's per-layer inputs and
shared KV; only the widths and the vocabulary shrunk), loaded by :func:`vramplan.runners.hf.load_hf_recipe`
on the CPU and stepped the way the H100 measurements stepped it
(/work/shared/reference-stacks/hf_baseline.py: ``model(input_ids, labels)``, ``loss.backward()``,
``opt.step()``, ``opt.zero_grad()``; no gradient clipping).

On the CPU bitsandbytes runs the same Python as on a GPU down to its ``bitsandbytes::`` ops: PEFT's
LoRA layer around ``Linear4bit``, ``MatMul4Bit`` (``gemm_4bit`` in the forward, the double-quantized
dequantization in the backward) and the 8-bit optimizers' per-parameter
``optimizer_update_8bit_blockwise``, each such op counted as one. Below them the backends differ: on
a GPU ``gemm_4bit`` is Python that launches the absmax's and the weight's dequantization and the
matmul itself (bitsandbytes/backends/cuda/ops.py). Also different from the GPU:

* SDPA: the CPU takes its own flash kernel where the GPU (fp32 under the NF4 recipe, GQA) takes the
  math or memory-efficient one; either is one op a call here and a handful there, per layer;
* bitsandbytes' paged buffers are plain ones on the CPU (its page prefetch is host work on a GPU).

So the counts are the recipe's host ops per phase to within a few ops per layer, which is what
:data:`vramplan.throughput.HOST_OPS_PER_LINEAR` and its siblings model for ``stack="hf"``.

What the count cannot see is what a bitsandbytes op does behind its one dispatch (Python, ctypes):
:func:`uncounted_dequant_host_ops` times it instead, as the wall time a quantized layer's step takes
beyond the bf16 one's, in the counted ops' worth of this CPU
(:data:`vramplan.throughput.HF_UNCOUNTED_DEQUANT_HOST_OPS`).

    python -m benchmarks.launch_count_hf                  # all four families, nf4/bf16, with/without checkpointing
    python -m benchmarks.launch_count_hf --time           # instead: time the bitsandbytes linear's uncounted host work
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.launch_count import LAUNCHING, MODELS, LaunchCounter, build_model  # noqa: E402

#: The configurations the throughput model needs: both base weights, with and without checkpointing.
SETTINGS = (("nf4", "full"), ("nf4", "none"), ("bf16", "full"), ("bf16", "none"))


def _recipe_step(folder: Path, family: str, quant: str, checkpointing: str, optimizer: str, seq: int, counter):
    """The hf recipe loaded from ``folder`` on the CPU (bf16 compute, as on a GPU) and its loop body
    (hf_baseline.py's), phases marked for ``counter``."""
    from vramplan.plan import Plan
    from vramplan.runners.hf import load_hf_recipe

    warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
    plan = Plan(model=family, stack="hf", quant=quant, lora_rank=8, seq_len=seq, optimizer=optimizer,
                checkpointing=checkpointing)
    recipe = load_hf_recipe(str(folder), plan, device="cpu", dtype=torch.bfloat16)
    model, opt = recipe.model, recipe.optimizer
    ids = torch.randint(0, recipe.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        with counter.phase("optimizer"):
            opt.step()
        with counter.phase("zero_grad"):
            opt.zero_grad(set_to_none=True)
    return model, step


def count_hf_step(family: str, layers: int, quant: str = "nf4", checkpointing: str = "full",
                  optimizer: str = "paged_adamw8bit", seq: int = 8) -> dict:
    """Launching host ops of one optimizer step (after a warm-up step) of the hf recipe on the tiny
    model, by phase and by component: ``{"per_phase": {...}, "by_component": {phase: {component: n}}}``."""
    folder = build_model(family, Path(tempfile.mkdtemp(prefix="launch-count-hf-")), layers)
    counter = LaunchCounter()
    model, step = _recipe_step(folder, family, quant, checkpointing, optimizer, seq, counter)
    step()
    with counter.instrument(model), counter:
        step()
    per_phase: Counter = Counter()
    by_component: dict = {}
    for (phase, component, kind), n in counter.counts.items():
        if kind in LAUNCHING:
            per_phase[phase] += n
            by_component.setdefault(phase, Counter())[component] += n
    return {"model": MODELS[family], "layers": layers, "quant": quant, "checkpointing": checkpointing,
            "optimizer": optimizer, "per_phase": dict(per_phase),
            "by_component": {p: dict(c) for p, c in by_component.items()}}


def uncounted_dequant_host_ops(family: str = "llama", layers: tuple[int, int] = (2, 6), repeats: int = 15) -> dict:
    """The host time a bitsandbytes 4-bit linear takes beyond its counted ops, in counted ops' worth:
    per decoder layer (the difference of two layer counts), the NF4 recipe's checkpointed step time
    minus the bf16 one's, over the quantized linear passes (3 a linear: forward, recompute, backward),
    in units of the bf16 step's seconds per counted op, less the ops the counter saw the NF4 layer add.
    Single-threaded wall time on this CPU, so a proxy: on a GPU the same Python dispatches CUDA kernels."""
    torch.set_num_threads(1)
    seconds, ops = {}, {}
    for n in layers:
        folder = build_model(family, Path(tempfile.mkdtemp(prefix="launch-count-hf-")), n)
        for quant in ("nf4", "bf16"):
            _, step = _recipe_step(folder, family, quant, "full", "paged_adamw8bit", 8, LaunchCounter())
            for _ in range(3):
                step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            seconds[(n, quant)] = statistics.median(times)
            ops[(n, quant)] = sum(v for k, v in count_hf_step(family, n, quant, "full")["per_phase"].items()
                                  if k in ("forward", "recompute", "backward"))
    per_layer = {q: {"seconds": (seconds[(layers[1], q)] - seconds[(layers[0], q)]) / (layers[1] - layers[0]),
                     "ops": (ops[(layers[1], q)] - ops[(layers[0], q)]) / (layers[1] - layers[0])} for q in ("nf4", "bf16")}
    seconds_per_op = per_layer["bf16"]["seconds"] / per_layer["bf16"]["ops"]
    linear_passes = 3 * 7  # q, k, v, o, gate, up, down
    extra = (per_layer["nf4"]["seconds"] - per_layer["bf16"]["seconds"]) / seconds_per_op - (
        per_layer["nf4"]["ops"] - per_layer["bf16"]["ops"])
    return {"family": family, "per_layer": per_layer, "seconds_per_op": seconds_per_op,
            "uncounted_ops_per_linear_pass": extra / linear_passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama,qwen3,gemma3,gemma4")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="", help="write OUT.json")
    parser.add_argument("--time", action="store_true", help="time the bitsandbytes linear's uncounted host work")
    args = parser.parse_args()
    if args.time:
        print(json.dumps(uncounted_dequant_host_ops()))
        return
    results = []
    for family in args.models.split(","):
        for quant, checkpointing in SETTINGS:
            result = count_hf_step(family, args.layers, quant, checkpointing)
            results.append(result)
            print(json.dumps(result))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
