"""Diagnose CUDA-graph capture of the trainer's micro-batch step on tiny random models (GPU only).

    python -m benchmarks.graph_debug                 # every model and variant, each in its own process
    python -m benchmarks.graph_debug llama anomaly   # one

Each run: the graph body run eagerly against the eager step; then the trainer's own path
(``StepGraphs.summed_loss``: eager, capture, replays after the adapters changed in place) with its
gradients against eager ones. Variants: ``full``; ``anomaly`` (autograd's anomaly mode without
NaN checks: a failing backward names the forward call of its node); ``override`` (torch's
stale-stream override, where this torch has it); ``fwd`` (the forward alone, captured);
``no-cudnn`` (SDPA without cuDNN). A separate process per run: a failed capture leaves the CUDA
generator unusable in the process that made it.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from train_fixtures import build_model, gemma4_config, llama_config, load_with_random_adapters  # noqa: E402
from vramplan.plan import Plan  # noqa: E402
from vramplan.train.graphs import StaticInputs, StepGraphs, graph_safe_checkpoints, packing_decided  # noqa: E402
from vramplan.train.loss import summed_loss  # noqa: E402


def _diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def check(arch: str, variant: str) -> None:
    config = llama_config() if arch == "llama" else gemma4_config()
    if variant == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    print(arch, variant, "torch", torch.__version__, "stale-stream override available:", override is not None, flush=True)
    if variant == "override" and override is not None:
        override(True)
    if variant == "anomaly":  # names the forward call of the backward node that fails (no NaN checks: those sync)
        torch.autograd.set_detect_anomaly(True, check_nan=False)
    folder = build_model(config, Path(tempfile.mkdtemp()) / arch)
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, checkpointing="full")
    model, params = load_with_random_adapters(folder, plan, "cuda")
    ids = torch.randint(4, 300, (2, 24), device="cuda")
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1), "position_ids": torch.arange(24, device="cuda").expand(2, -1)}
    denominator = torch.tensor(48.0, device="cuda")

    def eager():
        for p in params:
            p.grad = None
        loss, _ = summed_loss(model, batch)
        (loss / denominator).backward()
        return float(loss.detach()), [p.grad.detach().clone() for p in params]

    loss_e, grads_e = eager()
    graphs = StepGraphs(model, params)
    embeds, per_layer = graphs.prologue(batch)
    static = StaticInputs.like(embeds, per_layer, batch)
    static.fill(embeds, per_layer, batch, denominator)
    for p in params:
        p.grad = None
    graphs._grads_in_place()
    with packing_decided(False), graph_safe_checkpoints(model):
        graphs.body(static)
    print(arch, variant, "body eager: loss", float(static.loss), "vs", loss_e, "grad diff",
          _diff([p.grad for p in params], grads_e), flush=True)
    torch.cuda.synchronize()

    def forward_only():
        with torch.no_grad():
            kwargs = {"inputs_embeds": static.embeds, "position_ids": static.position_ids, "use_cache": False}
            if static.per_layer is not None:
                kwargs["per_layer_inputs"] = static.per_layer
            graphs.decoder(**kwargs)

    if variant == "fwd":
        graph = torch.cuda.CUDAGraph()
        try:
            with graphs._on_own_stream() as stream, torch.cuda.graph(graph, stream=stream):
                forward_only()
            print(arch, variant, "capture ok", flush=True)
        except Exception as err:
            print(arch, variant, "capture FAILED:", "".join(traceback.format_exception(err.__context__ or err)), flush=True)
        return
    # the trainer's own path: eager on the graphs' stream, then capture, then replays after in-place updates
    for trial in range(4):
        for p in params:
            p.grad = None
        loss_g = float(graphs.summed_loss(batch, denominator))
        grads_g = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        loss_e = float(graphs._eager(batch, denominator))
        grads_e = [p.grad.detach().clone() for p in params]
        captured = sum(g is not None for g in graphs.graphs.values())
        print(arch, variant, "step", trial, "graphs", captured, graphs.notes, "loss", loss_g, "vs eager", loss_e,
              "grad diff", _diff(grads_g, grads_e), flush=True)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)  # as an optimizer step would, in place


def main() -> None:
    import subprocess

    if len(sys.argv) == 3:
        check(sys.argv[1], sys.argv[2])
        return
    for arch in ("llama", "gemma4"):
        for variant in ("full", "anomaly"):
            subprocess.run([sys.executable, "-m", "benchmarks.graph_debug", arch, variant])


if __name__ == "__main__":
    main()
