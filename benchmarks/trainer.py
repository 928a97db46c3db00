"""vramplan's trainer on a model built from its config with random weights: memory and tokens/s.

Prints one JSON line per configuration with the same fields as
/work/shared/reference-stacks/hf_baseline.py (``nvml_used_delta``, ``peak_alloc``,
``peak_reserved``, ``tok_s``, ``step_s``, ...), so the two stacks compare line by line. The
steps go through the recipe's own functions (load_for_training, make_optimizer,
accumulate_gradients), not the CLI, on random token ids at the configured seq.

    python -m benchmarks.trainer --config llama-3.2-1b \
        --grid '[{"seq": 2048, "batch": 1, "rank": 16, "gc": true, "optim": "paged_adamw_8bit"}]'

A grid entry may also name ``quant``, ``checkpointing``, ``lora_dtype``, ``compute_dtype``, ``head_quant``
(``"int8"``: the frozen LM head / tied embedding as int8 rows), ``loss_chunk_mb`` and ``mlp_tiles``,
read by ``benchmarks.records.plan_of``; ``memory_history`` (a ``.pickle.gz`` path) records the allocator's
history over the steps there (``benchmarks.memory_history``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch

from vramplan.catalog import resolve_model
from vramplan.memory import activations
from benchmarks import memory_history
from benchmarks.harness import host_dispatch_us, random_batch, synced_seconds
from vramplan.host import autograd_op_us
from benchmarks.driver_memory import outside_pool_bytes, stack_limit_bytes, triton_kernels_with_local_memory
from benchmarks.mfu import bf16_matmul_tflops, model_flops, utilisation_of
from benchmarks.records import plan_of
from vramplan.gpu import used_memory_bytes
from vramplan.train import switches
from vramplan.train.recipe import TrainConfig, make_optimizer, train_step
from vramplan.train.optim import flat_update_pays
from vramplan.train.loss_scale import for_dtype
from vramplan.train.model import compute_dtype, load_for_training, lora_parameters, random_model_from_config
from vramplan.stacks.vramplan import int8_vocab_major, steps_fused
from vramplan.train.graphs import StepGraphs

#: The trainer's default clipping (TrainConfig.max_grad_norm): each step is the recipe's own (``train_step``).
MAX_GRAD_NORM = TrainConfig.max_grad_norm


def build_random_model(config_path: str, folder: str) -> int:
    """Random bf16 weights from a config.json, saved as a local model folder; returns the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**resolve_model(config_path).config)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: minutes faster than on the host for billions of weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return params


def write_config_only(config_path: str, folder: str) -> int:
    """Only ``config.json`` (``--random-init``: the trainer builds seeded random weights layer by layer
    on the GPU, for models too large to write to disk); returns the parameter count, counted on ``meta``."""
    from transformers import AutoConfig

    AutoConfig.for_model(**resolve_model(config_path).config).save_pretrained(folder)
    return sum(p.numel() for p in random_model_from_config(folder, torch.bfloat16).parameters())  # the model it will train


def alternate(step, modes: dict, rounds: int, steps_each: int = 6) -> dict[str, list[float]]:
    """Median step time under each of ``modes`` (name -> a context manager factory), alternating in one
    process; rounds rotate which goes first, so a drift of the machine falls on all of them."""
    import contextlib

    medians: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with modes[name]() or contextlib.nullcontext():
                times = synced_seconds(step, steps_each)
            medians[name].append(round(sorted(times)[len(times) // 2], 5))
    return medians


def nvml_call_us(calls: int = 200) -> float:
    """One NVML memory reading's cost on the calling thread, in µs."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    started = time.perf_counter()
    for _ in range(calls):
        pynvml.nvmlDeviceGetMemoryInfo(handle)
    return round((time.perf_counter() - started) / calls * 1e6, 1)


def summarize_pools(snapshot: list[dict]) -> dict:
    """torch's segments after the steps, per pool (the default one, or a CUDA graph's private pool): how many, their
    bytes, what their blocks hold allocated, and the largest free blocks (where reserved bytes sit unallocated)."""
    pools: dict[str, dict] = {}
    for segment in snapshot:
        private = tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0)
        name = ("graph" if private else "default") + (":expandable" if segment.get("is_expandable") else "")
        pool = pools.setdefault(name, {"segments": 0, "bytes": 0, "allocated": 0, "free_blocks": []})
        pool["segments"] += 1
        pool["bytes"] += segment["total_size"]
        pool["allocated"] += segment["allocated_size"]
        pool["free_blocks"] += [b["size"] for b in segment["blocks"] if b["state"] == "inactive"]
    for pool in pools.values():
        free = sorted(pool.pop("free_blocks"), reverse=True)
        pool.update(free_blocks=len(free), largest_free=free[:8])
    return pools


def run_one(grid: dict, folder: str, vocab: int, steps: int, device: torch.device,
            random_init: bool = False, sample_nvml: bool = True, ab_rounds: int = 0,
            overlap_rounds: int = 0, pool_summary: bool = False) -> tuple[dict, list[float]]:
    plan = plan_of(dict({"cuda_graphs": True}, **grid, model=os.path.basename(folder)))  # graphs unless the grid says not
    record: dict = {}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, _ = load_for_training(folder, plan, device, random_init_from_config=random_init)
    params = lora_parameters(model)
    record["trainable"] = sum(p.numel() for p in params)
    record["after_load_alloc"] = torch.cuda.memory_allocated()
    optimizer, _ = make_optimizer(params, plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))
    graphs = StepGraphs.for_run(model, params, plan, device)
    # fp16 steps scale their loss, as the trainer's do ("loss_scaling": false in the grid: as before session 18)
    scaler = for_dtype(compute_dtype(plan, device)) if grid.get("loss_scaling", True) else None
    if plan.compute_dtype == "fp16":
        record["loss_scaling"] = scaler is not None
    record["load_peak_alloc"] = torch.cuda.max_memory_allocated()
    reserved = {"load": torch.cuda.max_memory_reserved()}  # torch's pool at its peak by phase: where slack appears
    torch.cuda.reset_peak_memory_stats()
    batch = random_batch(vocab, plan.micro_batch, plan.seq_len, device)
    times, losses = [], []
    from vramplan.measure import NvmlPeakSampler

    # the sampler's thread polls NVML every 2 ms beside the timed steps; --no-nvml-sampler times them without it
    sampler = NvmlPeakSampler().__enter__() if sample_nvml else None
    driver = {"stack_limit": [stack_limit_bytes()], "outside": [outside_pool_bytes()]}  # before the first step
    with memory_history.recorded(grid.get("memory_history")):  # "memory_history": a .pickle.gz path
        for step in range(steps):
            torch.cuda.synchronize()
            started = time.time()
            loss, _, norm = train_step(model, [batch], optimizer, params, MAX_GRAD_NORM, step, device, graphs=graphs,
                                       scaler=scaler)
            times.append(time.time() - started)
            losses.append(round(loss, 4))
            if scaler is not None:
                record.setdefault("loss_scale", []).append(scaler.scale)
                record.setdefault("grad_norms", []).append(norm)
            if step in (0, steps - 1):  # after the first step (graphs captured) and after the last
                reserved["first_step" if step == 0 else "last_step"] = torch.cuda.max_memory_reserved()
                driver["stack_limit"].append(stack_limit_bytes())
                driver["outside"].append(outside_pool_bytes())
    if scaler is not None:
        record["loss_scale_overflows"] = scaler.overflows  # backward passes run again at half the scale
    if sampler is not None:
        sampler.__exit__(None, None, None)
    def step():
        train_step(model, [batch], optimizer, params, MAX_GRAD_NORM, 0, device, graphs=graphs)

    if ab_rounds:  # the NVML sampler's thread beside the steps, and not
        record["sampler_ab"] = {"nvml_call_us": nvml_call_us()} | alternate(
            step, {"on": NvmlPeakSampler, "off": lambda: None}, ab_rounds)
    if overlap_rounds:  # the step queued whole (default), before the loss is read but ending on bitsandbytes'
        # sync (session 10's trainer), and after the loss is read (the trainer before session 10)
        record["overlap_ab"] = alternate(step, {"overlapped": lambda: switches.forced(overlap_optimizer=True,
                                                                                      queued_optimizer=False),
                                                "waiting": lambda: switches.forced(overlap_optimizer=False,
                                                                                   queued_optimizer=False),
                                                "queued": lambda: switches.forced(overlap_optimizer=True,
                                                                                  queued_optimizer=True)},
                                         overlap_rounds)
    driver["triton_local"] = triton_kernels_with_local_memory()
    record["driver"] = driver
    record["losses"] = losses
    record["enabled"] = os.environ.get("VRAMPLAN_ENABLE", "")  # opt-in switches this row ran with (switches.py)
    record["fused_optimizer"] = steps_fused(plan)  # what stepped it, whatever the switches' defaults were then
    record["int8_vocab_major"] = plan.head_quant == "int8" and int8_vocab_major()  # how its int8 head's loss ran
    record["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    record["overlap_optimizer"] = switches.enabled("overlap_optimizer")  # the step read its loss after queueing the optimizer
    record["queued_optimizer"] = switches.enabled("queued_optimizer")  # bitsandbytes without its last sync (default)
    record["prefetch_paged"] = switches.enabled("prefetch_paged")  # paged states prefetched every step (bitsandbytes')
    record["rope_gemma4"] = switches.enabled("rope_gemma4")  # Gemma 4's RoPE through the Triton kernel
    record["wide_head_attention"] = switches.enabled("wide_head_attention")  # heads over 256 through chunked matmuls
    record["wide_head_fused_rows"] = switches.enabled("wide_head_fused_rows")  # their row passes in one Triton launch
    record["sliding_band_attention"] = switches.enabled("sliding_band_attention")  # sliding windows over their band
    record["sliding_band_min_windows"] = activations.SLIDING_BAND_MIN_WINDOWS  # ... from rows this many windows long
    record["aligned_attention_chunks"] = switches.enabled("aligned_attention_chunks")  # chunks aligned for cuBLAS
    record["chunk_alignment"] = list(activations.chunk_multiples())  # their height and band first-key multiples
    record["compact_captures"] = switches.enabled("compact_captures")  # gradients in one buffer, eager copies dropped
    record["clipped"] = True  # the recipe's clipping ran in each step (train_step; lines before session 10 had none)
    if graphs is not None:
        record["cuda_graphs"] = len([g for g in graphs.graphs.values() if g is not None])
        record["graph_notes"] = graphs.notes
        record["causal_captures"] = True  # unpacked captures keep SDPA's causal kernel (graphs.packing_decided)
    record["nvml_sampler"] = sampler is not None
    if sampler is not None:
        record["nvml_peak_step_delta"] = sampler.peak_delta  # sampled peak during the steps, above the reading at their start
    record["peak_alloc"] = torch.cuda.max_memory_allocated()
    record["peak_reserved"] = torch.cuda.max_memory_reserved()
    record["peak_reserved_by_phase"] = reserved
    if pool_summary:
        record["pool_summary"] = summarize_pools(torch.cuda.memory_snapshot())
    # the host's speed, two probes (eager steps are bound by it), after the steps: run before them (session 21's call 4
    # to session 23's call 2) the autograd probe's matmuls loaded cuBLAS and placed its workspace ahead of the run
    record |= {"host_dispatch_us": host_dispatch_us(device), "host_autograd_us": autograd_op_us(device),
               "host_probes_after_steps": True}
    del model, optimizer, params, batch, graphs
    return record, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a profile name (llama-3.2-1b) or a config.json (text model)")
    parser.add_argument("--grid", required=True, help="JSON list (or a file holding one) of {seq,batch,rank,gc,optim,quant,head_quant}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fresh", action="store_true",
                        help="measure each configuration in its own process (no allocator or library state carried over)")
    parser.add_argument("--no-nvml-sampler", action="store_true",
                        help="time the steps without the thread that samples NVML's peak (its readings are left out)")
    parser.add_argument("--sampler-ab", type=int, default=0, metavar="ROUNDS",
                        help="after the timed steps, ROUNDS rounds of steps with the NVML sampler and without (sampler_ab)")
    parser.add_argument("--overlap-ab", type=int, default=0, metavar="ROUNDS",
                        help="after the timed steps, ROUNDS rounds of queued, overlapped and waiting optimizer steps (overlap_ab)")
    parser.add_argument("--random-init", action="store_true",
                        help="write only config.json and build seeded random weights on the GPU layer by layer (31B and up)")
    parser.add_argument("--pool-summary", action="store_true",
                        help="record torch's segments per pool after the steps (benchmarks.trainer.summarize_pools)")
    parser.add_argument("--folder", help="a model folder built already (by the --fresh parent); skips building one")
    parser.add_argument("--band-min-windows", type=int, metavar="N",
                        help="sliding-window layers over their band from rows of N windows (an A/B of the threshold "
                             "vramplan.memory.activations.SLIDING_BAND_MIN_WINDOWS); the lines record it")
    parser.add_argument("--unaligned-chunks", action="store_true",
                        help="the chunked attention's chunks as before session 15: heights straight off the budget, "
                             "band keys from window - 1 before the first query (switch aligned_attention_chunks off)")
    args = parser.parse_args()
    if args.band_min_windows:
        activations.SLIDING_BAND_MIN_WINDOWS = args.band_min_windows
    if args.unaligned_chunks:  # in the environment, so the --fresh children inherit it
        os.environ[switches.DISABLE_ENV] = ",".join(filter(None, (os.environ.get(switches.DISABLE_ENV),
                                                                  "aligned_attention_chunks")))
    from vramplan.train.allocator import prefer_expandable_segments

    prefer_expandable_segments()  # as `vramplan train` does (children inherit it)
    grid = json.loads(open(args.grid).read() if os.path.exists(args.grid) else args.grid)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/trainer.py measures GPU memory; run it on a machine with CUDA")
    device = torch.device("cuda")
    folder = args.folder or tempfile.mkdtemp(dir="/tmp")
    started = time.time()
    if args.folder:
        n_params = None
    else:
        n_params = (write_config_only if args.random_init else build_random_model)(args.config, folder)
        print(json.dumps({"event": "saved", "params": n_params, "s": round(time.time() - started, 1)}), flush=True)
    if args.fresh:  # the parent measures the MFU's denominator (a child's matmul buffers would sit in its memory)
        rate = bf16_matmul_tflops(device)
        torch.cuda.empty_cache()
        run_each_in_own_process(args, grid, folder, n_params, rate)
        return
    config = resolve_model(args.config).config
    vocab = config.get("text_config", config)["vocab_size"]
    torch.zeros(1, device=device)  # the CUDA context exists before the baseline, as in hf_baseline
    base_used = used_memory_bytes()
    for g in grid:
        rec = dict(g, model=os.path.basename(args.config), params=n_params, stack="vramplan")
        try:
            measured, times = run_one(g, folder, vocab, args.steps, device, args.random_init,
                                      sample_nvml=not args.no_nvml_sampler, ab_rounds=args.sampler_ab,
                                      overlap_rounds=args.overlap_ab, pool_summary=args.pool_summary)
            rec.update(measured)
            used = used_memory_bytes()
            rec["nvml_used_delta"] = (used - base_used) if base_used is not None and used is not None else None
            rec["step_times"] = [round(t, 4) for t in times]  # each step's wall seconds: how long warming up took
            tail = sorted(times[1:]) or times
            rec["step_s"] = tail[len(tail) // 2]
            rec["tok_s"] = g["batch"] * g["seq"] / rec["step_s"]
        except torch.cuda.OutOfMemoryError:
            rec["error"] = "OOM"
        except Exception as err:  # one failing configuration must not hide the others' lines
            rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(json.dumps(rec), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)


def with_mfu(rec: dict, rate: float) -> dict:
    """The line's model FLOPs utilisation against ``rate``, the bf16 matmul TFLOP/s measured in this run."""
    from vramplan.errors import VramplanError

    if rec.get("step_s") is None:
        return {}
    try:
        flops = model_flops(plan_of(dict(rec, model=os.path.basename(rec["model"]))))
    except VramplanError:  # a config.json that is not a profile: no FLOP count for it
        return {}
    return {"bf16_matmul_tflops": round(rate, 1), "model_tflop_per_step": round(flops / 1e12, 3),
            "mfu": round(utilisation_of(flops, rec["step_s"], rate), 4)}


def run_each_in_own_process(args, grid: list[dict], folder: str, n_params: int, rate: float) -> None:
    """One child process per configuration, so each line's NVML delta is that configuration's alone.

    Run one after another in a process, a configuration inherits the allocator's cached segments,
    cuBLAS workspaces and bitsandbytes' paged buffers of those before it, and the first one pays
    for what the later ones reuse: the deltas stop being comparable.
    """
    import subprocess
    import sys

    for index, g in enumerate(grid):
        child = subprocess.run([sys.executable, "-m", "benchmarks.trainer", "--config", args.config, "--grid",
                                json.dumps([g]), "--steps", str(args.steps), "--folder", folder,
                                *(["--random-init"] if args.random_init else []),
                                *(["--no-nvml-sampler"] if args.no_nvml_sampler else []),
                                "--sampler-ab", str(args.sampler_ab), "--overlap-ab", str(args.overlap_ab),
                                *(["--band-min-windows", str(args.band_min_windows)] if args.band_min_windows else []),
                                *(["--unaligned-chunks"] if args.unaligned_chunks else []),
                                *(["--pool-summary"] if args.pool_summary else [])],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode or not lines:
            rec = dict(g, model=os.path.basename(args.config), stack="vramplan",
                       error=f"child exited {child.returncode}: {child.stderr.strip().splitlines()[-1:]}")
        else:
            rec = json.loads(lines[-1])
            rec.update(with_mfu(rec, rate))
        # its place in the parent's series: a later child's baseline can hold a chunk a paging child left, which it
        # may take over (records.previous_process_bytes)
        rec.update(params=n_params, fresh_process=True, child_index=index)
        print(json.dumps(rec), flush=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
