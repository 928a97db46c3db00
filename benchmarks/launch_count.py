"""Kernel launches per optimizer step, counted on the CPU, by where in the step they come from.

On an H100 a Llama-3.2-1B QLoRA step took ~0.22 s at 1k, 2k and 4k tokens alike: the host, at
~35 µs per launch, not the GPU, set the pace. A launch costs about the same host time on any
device, so the count of launches is a proxy for the step time that needs no GPU. This builds a
tiny model with the *structure* of a real one (the profile's config: its layer count, layer
types, KV sharing, tied head, RoPE kind; only the widths and the vocabulary shrunk), loads it
the way the trainer does (NF4 + LoRA on all linears, kernel patches, full checkpointing, the
plan's optimizer), and counts one optimizer step under a ``TorchDispatchMode``:

* every aten op that reaches the dispatcher, split into ``launch`` (device work on a GPU),
  ``host`` (views, metadata, allocations: no kernel, still host time) and ``sync``
  (``.item()``-like reads that wait for the GPU);
* every Triton launch (the kernels run in the interpreter, ``TRITON_INTERPRET=1``; what the
  interpreter does inside a launch is not counted, and the NF4 decode, a single launch on the
  GPU, counts as one);
* bitsandbytes' optimizer ops (one per parameter it steps).

The counts compare with ``--compare BEFORE.json AFTER.json`` (benchmarks/results/launch_count*.md).

Each counted op is attributed to a component (the module or function running it: QLoRA linear,
norm, rope, attention, MLP, decoder layer, embedding, model, loss) and a phase (forward, the
checkpoint's recompute, backward, grad clip, optimizer, zero_grad). Backward ops are attributed
through the autograd node running them, labelled when the forward made it.

    python -m benchmarks.launch_count                      # both models, prints the table
    python -m benchmarks.launch_count --out benchmarks/results/launch_count_after

What it does not see: host work that dispatches nothing (Python, bitsandbytes' per-parameter
bookkeeping), and CUDA-only paths (the fused NF4 matmul below 64 tokens, CUDA SDPA backends).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {"llama": "llama-3.2-1b", "gemma4": "gemma-4-e2b-text", "qwen3": "qwen3-0.6b", "gemma3": "gemma-3-1b"}
#: widths of the tiny stand-in (structure keys are kept from the profile)
TINY = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 512},
    "gemma4": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 16, "global_head_dim": 32, "vocab_size": 512, "vocab_size_per_layer_input": 512,
               "hidden_size_per_layer_input": 8, "sliding_window": 16},
    "qwen3": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 512},
    "gemma3": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 16, "query_pre_attn_scalar": 16, "vocab_size": 512, "sliding_window": 16},
}
PHASES = ("forward", "recompute", "backward", "grad_clip", "optimizer", "zero_grad", "step")
#: what a counted op is: device work, a Triton launch, a bitsandbytes op, a wait for the device, or host-only
KINDS = ("launch", "triton", "bnb", "sync", "host")
LAUNCHING = ("launch", "triton", "bnb", "sync")

# aten ops that launch no kernel on a GPU (views, metadata, allocation); still host time
_HOST_ONLY = {"empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh", "set_", "resize_",
              "_reshape_alias", "unbind", "split", "split_with_sizes", "chunk"}
_SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


def kind_of(func) -> str:
    name = func.overloadpacket.__name__
    if name in _SYNCS:
        return "sync"
    if name in _HOST_ONLY or getattr(func, "is_view", False):
        return "host"
    return "launch"


def component_of(module: torch.nn.Module) -> str | None:
    """The component a module's own ops count towards (None: its parent's)."""
    name = type(module).__name__
    if name == "QLoRALinear" or hasattr(module, "lora_A"):  # vramplan's, or PEFT's LoRA layer (hf recipe)
        return "qlora_linear"
    if name.endswith("RMSNorm"):
        return "norm"
    if "RotaryEmbedding" in name:
        return "rope"
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "mlp"
    if "DecoderLayer" in name:
        return "decoder_layer"
    if "Embedding" in name:
        return "embedding"
    if name.endswith("Model"):
        return "model"
    return None


class LaunchCounter(TorchDispatchMode):
    """Counts (phase, component, kind) of every op dispatched while active; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.region = "step"  # the phase of ops outside any module and outside backward
        self.muted = 0
        self._components: list[str] = []
        self._boundaries: list[set] = []
        self._node_labels: dict[Any, str] = {}

    # -- attribution -------------------------------------------------------------------------
    def where(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if self._components:
            return ("recompute" if node is not None else "forward"), self._components[-1]
        if node is not None:
            return "backward", self._node_labels.get(node, "other")
        return self.region, "step"

    def add(self, kind: str, n: int = 1) -> None:
        phase, component = self.where()
        self.counts[(phase, component, kind)] += n

    def enter(self, component: str, inputs) -> None:
        self._components.append(component)
        self._boundaries.append({t.grad_fn for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)})

    def leave(self, outputs) -> None:
        """Label the autograd nodes made since ``enter`` (those between the outputs and the inputs)."""
        component, boundary = self._components.pop(), self._boundaries.pop()
        todo = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        seen = set()
        while todo:  # through the nodes inner modules labelled, which sit between this module's own
            node = todo.pop()
            if node is None or node in boundary or node in seen:
                continue
            seen.add(node)
            self._node_labels.setdefault(node, component)
            todo.extend(n for n, _ in node.next_functions)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.region = self.region, name
        try:
            yield
        finally:
            self.region = previous

    @contextlib.contextmanager
    def mute(self, kind: str | None) -> Iterator[None]:
        """Count what runs inside as one op of ``kind`` (a kernel whose insides are the interpreter's)."""
        if kind and not self.muted:
            self.add(kind)
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted and func.namespace != "profiler":
            self.add("bnb" if func.namespace == "bitsandbytes" else kind_of(func))
        return func(*args, **(kwargs or {}))

    # -- instrumentation ---------------------------------------------------------------------
    def labelled(self, component: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            self.enter(component, (args, kwargs))
            out = None
            try:
                out = fn(*args, **kwargs)
                return out
            finally:
                self.leave(out)
        run.__wrapped__ = fn
        return run

    @contextlib.contextmanager
    def instrument(self, model: torch.nn.Module) -> Iterator[None]:
        """Module hooks, labelled wrappers of the functions that are no module (RoPE, the loss) and
        the Triton launch hooks, for the duration of the block."""
        import triton.runtime.interpreter as interpreter

        import vramplan_kernels.nf4 as nf4
        from vramplan.train import ops

        handles = []
        for module in model.modules():
            component = component_of(module)
            if component is None:
                continue
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, c=component: self.enter(c, (args, kwargs)), with_kwargs=True))
            # always_call: the checkpoint's recompute stops early by raising inside a module
            handles.append(module.register_forward_hook(lambda m, args, kwargs, out: self.leave(out), with_kwargs=True,
                                                        always_call=True))
        patches = [(ops, "linear_cross_entropy", self.labelled("loss", ops.linear_cross_entropy))]
        for modeling in _modeling_modules(model):
            if hasattr(modeling, "apply_rotary_pos_emb"):
                patches.append((modeling, "apply_rotary_pos_emb", self.labelled("rope", modeling.apply_rotary_pos_emb)))
        grid_call = interpreter.GridExecutor.__call__

        def counted_grid_call(executor, *args, **kwargs):
            with self.mute("triton"):
                return grid_call(executor, *args, **kwargs)

        dequantize = nf4._dequantize_triton

        def counted_dequantize(*args, **kwargs):  # one launch on the GPU; staging copies are the interpreter's
            with self.mute("triton"):
                return dequantize(*args, **kwargs)

        patches += [(interpreter.GridExecutor, "__call__", counted_grid_call), (nf4, "_dequantize_triton", counted_dequantize)]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, new in patches:
            setattr(owner, name, new)
        try:
            yield
        finally:
            for owner, name, old in saved:
                setattr(owner, name, old)
            for handle in handles:
                handle.remove()
            self._node_labels.clear()

    # -- results -----------------------------------------------------------------------------
    def table(self) -> dict[str, dict[str, dict[str, int]]]:
        """{phase: {component: {kind: count}}}"""
        out: dict = {}
        for (phase, component, kind), n in sorted(self.counts.items()):
            out.setdefault(phase, {}).setdefault(component, {})[kind] = n
        return out


def _modeling_modules(model: torch.nn.Module) -> list:
    """The transformers modeling modules the model's classes come from (where apply_rotary_pos_emb lives)."""
    return list({sys.modules[type(m).__module__] for m in model.modules()
                 if type(m).__module__.startswith("transformers.models.")})


def tiny_config(family: str, layers: int | None = None) -> dict:
    from vramplan.catalog import resolve_model

    config = dict(resolve_model(MODELS[family]).config, **TINY[family])
    config.pop("torch_dtype", None)
    if layers is not None:  # fewer layers (tests): both layer types, and for shared KV half the layers sharing
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = (["sliding_attention", "full_attention"] * layers)[:layers]
        if "num_kv_shared_layers" in config:
            config["num_kv_shared_layers"] = layers // 2 if layers >= 4 else 0
    return config


def build_model(family: str, folder: Path, layers: int | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config(family, layers)),
                                     dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def count_step(family: str, layers: int | None = None, seq: int = 32, optimizer: str = "paged_adamw8bit",
               base: str = "dequant", checkpointing: str = "full") -> dict:
    """Launches of one optimizer step (after one warm-up step) of the trainer on the tiny model
    (``checkpointing="none"``: without torch.utils.checkpoint around the layers)."""
    import warnings

    from vramplan.plan import Plan
    from vramplan.train.loss import accumulate_gradients
    from vramplan.train.model import enable_checkpointing, load_base_model, lora_parameters, prepare_for_qlora
    from vramplan.train.recipe import make_optimizer
    from vramplan_kernels.dispatch import kernel_mode
    from vramplan_kernels.qlora_linear import base_path

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    folder = build_model(family, Path(tempfile.mkdtemp(prefix="launch-count-")), layers)
    device = torch.device("cpu")
    plan = Plan(model=family, quant="nf4", lora_rank=16, seq_len=seq, optimizer=optimizer, checkpointing=checkpointing)
    # bf16 as on a GPU (load_for_training computes in fp32 on the CPU); per-layer tables on the host as on a GPU
    model = load_base_model(folder, torch.bfloat16, plan.attention)
    prepare_for_qlora(model, plan, device, host_per_layer_embeddings=True)
    params = lora_parameters(model)
    for param in params:
        param.requires_grad_(True)
    if checkpointing == "full":
        enable_checkpointing(model)
    model.train()
    from vramplan.train.optim import flat_update_pays

    opt, _note = make_optimizer(params, plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))  # as the trainer chooses
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1),
             "position_ids": torch.arange(seq)[None]}
    counter = LaunchCounter()

    def step():  # the recipe's loop body, with the GPU's foreach clipping
        accumulate_gradients(model, [batch])
        with counter.phase("grad_clip"):
            float(torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
        with counter.phase("optimizer"):
            opt.step()
        with counter.phase("zero_grad"):
            opt.zero_grad(set_to_none=True)

    with kernel_mode("triton"), base_path(base):
        step()  # warm-up: optimizer state, cached copies and buffers exist from here on
        with counter.instrument(model), counter:
            step()
    table = counter.table()
    by_kind = Counter()
    for components in table.values():
        for kinds in components.values():
            by_kind.update(kinds)
    return {"model": MODELS[family], "tiny": TINY[family], "layers": model.config.get_text_config().num_hidden_layers,
            "seq": seq, "lora_linears": len(params) // 2, "optimizer": type(opt).__name__, "base_path": base,
            "totals": dict(by_kind), "launches": sum(by_kind[k] for k in LAUNCHING),
            "per_phase": {p: sum(sum(k.get(x, 0) for x in LAUNCHING) for k in c.values()) for p, c in table.items()},
            "table": table}


def count_graph_prologue(family: str, layers: int | None = None, seq: int = 32) -> dict[str, int]:
    """Host ops a CUDA-graph replay leaves eager, per micro-batch (vramplan.train.graphs.StepGraphs):
    ``lookup``, the prologue's frozen embedding lookups (Gemma 4's per-layer inputs too), and ``replay``,
    the rest around the graph: the packing check, filling the static inputs, the replay, the loss's clone.
    Counted as :func:`count_step` counts (launches, syncs and host-only ops alike), on the same tiny model."""
    from vramplan.plan import Plan
    from vramplan.train.graphs import StaticInputs, StepGraphs, is_packed
    from vramplan.train.model import load_base_model, prepare_for_qlora

    folder = build_model(family, Path(tempfile.mkdtemp(prefix="launch-count-")), layers)
    plan = Plan(model=family, quant="nf4", lora_rank=16, seq_len=seq)
    model = load_base_model(folder, torch.bfloat16, plan.attention)
    prepare_for_qlora(model, plan, torch.device("cpu"), host_per_layer_embeddings=True)
    graphs = StepGraphs(model, [])
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq)[None]}
    counts = {}
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    with LaunchCounter() as counter:
        graphs.prologue(batch)
    counts["lookup"] = sum(counter.counts.values())
    with LaunchCounter() as counter:
        is_packed(batch["position_ids"])
        static.fill(embeds, per_layer, batch, torch.ones(()))
        static.loss.clone()
    counts["replay"] = sum(counter.counts.values()) + 1  # + graph.replay(): one launch, not an aten op
    return counts


def markdown(results: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "Per optimizer step, counted on the CPU (`python -m benchmarks.launch_count`). launches = aten ops that "
             "launch device work + Triton launches + bitsandbytes ops + syncs; host = views/allocations (no kernel).", ""]
    for r in results:
        lines += [f"## {r['model']} structure ({r['layers']} layers, {r['lora_linears']} LoRA linears, seq {r['seq']}, "
                  f"{r['optimizer']}, NF4 base path {r['base_path']})", "",
                  f"**{r['launches']} launches/step**; totals: " + ", ".join(f"{k} {v}" for k, v in sorted(r['totals'].items())), "",
                  "| phase | component | launch | triton | bnb | sync | host |", "|---|---|---|---|---|---|---|"]
        for phase in PHASES + tuple(p for p in r["table"] if p not in PHASES):
            for component, kinds in sorted(r["table"].get(phase, {}).items()):
                lines.append(f"| {phase} | {component} | " + " | ".join(str(kinds.get(k, 0)) for k in
                                                                       ("launch", "triton", "bnb", "sync", "host")) + " |")
        lines.append("")
    return "\n".join(lines)


def _by_component(result: dict) -> Counter:
    out: Counter = Counter()
    for components in result["table"].values():
        for component, kinds in components.items():
            out[component] += sum(kinds.get(k, 0) for k in LAUNCHING)
    return out


def comparison(before: list[dict], after: list[dict]) -> str:
    """Before/after launches per step, per model, by phase and by component (all phases)."""
    lines = ["# Kernel launches per optimizer step, before and after", "",
             "Counted on the CPU by `python -m benchmarks.launch_count` (see its docstring); launches = aten ops "
             "that launch device work + Triton launches + bitsandbytes ops + syncs.", ""]
    for b, a in zip(before, after):
        lines += [f"## {a['model']} structure ({a['layers']} layers, {a['lora_linears']} LoRA linears)", "",
                  f"**{b['launches']} → {a['launches']} launches/step** ({a['launches'] / b['launches'] - 1:+.0%})", "",
                  "| phase | before | after |", "|---|---|---|"]
        for phase in PHASES:
            if phase in b["per_phase"] or phase in a["per_phase"]:
                lines.append(f"| {phase} | {b['per_phase'].get(phase, 0)} | {a['per_phase'].get(phase, 0)} |")
        lines += ["", "| component (all phases) | before | after |", "|---|---|---|"]
        cb, ca = _by_component(b), _by_component(a)
        for c in sorted(cb.keys() | ca.keys(), key=lambda c: -cb.get(c, 0)):
            lines.append(f"| {c} | {cb.get(c, 0)} | {ca.get(c, 0)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama,gemma4")
    parser.add_argument("--layers", type=int, default=None, help="override the profile's layer count")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    parser.add_argument("--title", default="Kernel launches per optimizer step")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"),
                        help="print the before/after table of two earlier --out runs instead of counting")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        print(comparison(before, after))
        return
    results = [count_step(family, args.layers, args.seq) for family in args.models.split(",")]
    md = markdown(results, args.title)
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out + ".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
