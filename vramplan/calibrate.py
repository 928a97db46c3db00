"""A short profiled dry run of a plan on the real GPU: predicted vs measured, and the correction it teaches.

``run_calibration`` prices the plan first and refuses (before loading anything) when the
uncalibrated prediction exceeds the GPU's free memory: a calibration must not be the thing
that crashes a shared GPU. Then it runs a few optimizer steps at the plan's worst-case shape
(a full ``micro_batch × seq_len`` batch of random token ids, or the dataset's worst batch),
through vramplan's trainer or the hf recipe, with NVML sampled in a background thread (the
whole process, CUDA context and libraries included) and torch's allocator peak per phase.
Running out of memory is a measurement (it did not fit at N GB), never a crash.

It then runs the same plan at half the sequence length (``shorter_shape``) and stores both
points. The correction is ``a · static + b · per_token``: one point cannot tell a static error
(libraries, weights) from a per-token one (activations, fragmentation), and a single ratio
fitted at one length over- or under-corrects every other length. Two shapes that share the
static bytes and differ in half the per-token ones separate the two factors, where that half
is large beside the measurement's own noise (``calibration.MAX_FACTOR_ERROR``; otherwise the two
points are pooled into one ratio, still better founded than one). Other plans get the share of
that correction which carries from one configuration to another (``calibration.transfer_weight``);
the plan itself gets what was measured. Both runs are
measured above the same NVML baseline, taken before the first: what the first loaded and kept
(cuBLAS handles, kernel images) is then counted in both, as in a process that ran either alone.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

from vramplan.calibration import (Calibration, CalibrationKey, add_points, apply_calibration, driver_major,
                                  model_family, point_from, torch_minor)
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import Estimate, estimate_plan
from vramplan.plan import Plan


@dataclass
class MeasuredRun:
    """What a few steps of a plan really took. Byte figures above the CUDA context unless named otherwise."""

    plan: Plan
    fitted: bool
    steps: int
    measured_process_bytes: int  # NVML peak during load and steps, above the reading with the context up
    after_load_allocated: int = 0
    allocated_by_phase: dict[str, int] = field(default_factory=dict)  # max over the steps
    peak_reserved: int = 0
    batch_shape: tuple[int, int] = (0, 0)
    error: str | None = None
    baseline_used: int | None = None  # the NVML reading the process figure is measured above
    alloc_conf: str = ""  # torch's allocator settings the run measured under (``PYTORCH_CUDA_ALLOC_CONF``)

    def to_record(self) -> dict[str, Any]:
        return {"model": self.plan.model, "stack": self.plan.stack, "plan": self.plan.to_dict(), "fitted": self.fitted,
                "steps": self.steps, "nvml_used_delta": self.measured_process_bytes,
                "after_load_alloc": self.after_load_allocated, "allocated_by_phase": self.allocated_by_phase,
                "peak_alloc": max(self.allocated_by_phase.values(), default=0), "peak_reserved": self.peak_reserved,
                "batch_shape": list(self.batch_shape), "error": self.error, "alloc_conf": self.alloc_conf}


@dataclass
class CalibrationResult:
    predicted: Estimate  # uncalibrated
    run: MeasuredRun
    key: CalibrationKey
    calibration: Calibration | None  # after these points were added; None when nothing was stored
    gpu_free_bytes: int
    shorter_predicted: Estimate | None = None  # the second shape (half the sequence), when it ran
    shorter_run: MeasuredRun | None = None
    host: Any = None  # host.HostProbe: this machine's host speed, probed after the runs

    @property
    def predicted_above_context(self) -> int:
        return self.predicted.peak_bytes - self.predicted.components.get("cuda_context", 0)

    @property
    def calibrated(self) -> Estimate | None:
        if self.calibration is None or self.calibration.fit["kind"] == "none":
            return None
        return apply_calibration(self.predicted, self.calibration)[0]


def predicted_allocated_by_phase(est: Estimate) -> dict[str, int]:
    """The estimate's phases as torch's allocator sees them: less the context, libraries, fragmentation and the
    paged states NVML counts on the GPU (outside torch's pool, like the libraries)."""
    outside = est.components.get("cuda_context", 0) + est.components.get("cuda_libraries", 0)
    after_load = est.components.get("fragmentation", 0) + est.components.get("paged_states_resident", 0)
    return {name: total - outside - (after_load if name != "load" else 0) for name, total in est.phases.items()}


def refuse_if_over(est: Estimate, free_bytes: int) -> None:
    """Refuse a dry run the uncalibrated prediction says cannot fit: it could take a shared GPU down with it."""
    if est.peak_bytes > free_bytes:
        raise VramplanError(
            f"this plan is predicted to need {est.peak_bytes / 1e9:.2f} GB but the GPU has {free_bytes / 1e9:.2f} GB "
            f"free; calibrate a plan that fits (`vramplan fit {est.model} --gpu auto --out plan.json`)")


#: The second shape of a calibration has this share of the plan's sequence.
SHORTER_FRACTION = 0.5
#: Below this many tokens a second shape measures little but fixed costs: one point only.
MIN_SHORTER_SEQ = 64


def shorter_shape(plan: Plan) -> Plan | None:
    """The plan at half its sequence length (batch, rank and all else unchanged): the second point
    of a calibration, with the same static bytes and half the per-token ones; None when too short."""
    seq = int(plan.seq_len * SHORTER_FRACTION)
    return plan.replace(seq_len=seq) if seq >= MIN_SHORTER_SEQ else None


def shorter_batch(batch: dict, seq_len: int) -> dict:
    """The first ``seq_len`` positions of every row of a batch (a dataset's worst batch, cut to the shorter shape)."""
    return {name: tensor[:, :seq_len] for name, tensor in batch.items()}


def random_batch(plan: Plan, vocab_size: int, seed: int = 0) -> dict:
    """A full worst-case batch of random token ids, labelled as the plan's stack expects (host tensors)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (plan.micro_batch, plan.seq_len), generator=generator)
    if plan.stack == "hf":
        return {"input_ids": ids, "labels": ids.clone()}  # the model shifts labels itself
    labels = torch.cat([ids[:, 1:], torch.full((plan.micro_batch, 1), -100)], dim=1)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(plan.seq_len).expand(plan.micro_batch, -1)}


def _load(plan: Plan, model_dir: str, device):
    """(model, optimizer, step functions) for the plan's stack: forward, backward, optimizer step."""
    if plan.stack == "hf":
        from vramplan.runners.hf import load_hf_recipe

        recipe = load_hf_recipe(model_dir, plan, device=str(device))
        model, optimizer = recipe.model, recipe.optimizer

        def forward(batch):
            return model(**batch).loss

        def backward(loss):
            loss.backward()
        return model, optimizer, forward, backward, recipe.vocab_size
    from vramplan.train.loss import summed_loss
    from vramplan.train.model import load_for_training, lora_parameters
    from vramplan.train.optim import flat_update_pays
    from vramplan.train.recipe import make_optimizer

    model, _ = load_for_training(model_dir, plan, device)
    optimizer, _ = make_optimizer(lora_parameters(model), plan, 2e-4, 0.0, device, flat=flat_update_pays(model, plan))

    def forward(batch):
        return summed_loss(model, batch)

    def backward(out):
        loss, targets = out
        (loss / max(int(targets), 1)).backward()  # the trainer's mean over target tokens
    return model, optimizer, forward, backward, model.config.get_text_config().vocab_size


def measure_run(plan: Plan, model_dir: str, steps: int = 3, batch: dict | None = None, device_index: int = 0,
                baseline_used: int | None = None) -> MeasuredRun:
    """Load ``model_dir`` for ``plan`` and run ``steps`` optimizer steps, measuring memory; an OOM is a result.

    ``baseline_used``: measure above this NVML reading (an earlier run's) instead of the one now."""
    import torch

    from vramplan.measure import NvmlPeakSampler

    from vramplan.train.allocator import allocator_settings, prefer_expandable_segments

    if plan.stack == "vramplan":
        # measure the allocator `vramplan train` runs under: session 10's dry runs, made without expandable segments,
        # held 0.09-0.39 GB beyond their allocations, growing with the sequence; the trainer's eager runs 0.01-0.35
        prefer_expandable_segments()
    device = torch.device("cuda", device_index)
    torch.zeros(1, device=device)  # the CUDA context exists before the baseline: NVML deltas exclude it
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run = MeasuredRun(plan=plan, fitted=True, steps=0, measured_process_bytes=0, alloc_conf=allocator_settings())
    sampler = NvmlPeakSampler(device_index, baseline_used=baseline_used)
    run.baseline_used = sampler.baseline_used
    try:
        with sampler:
            _run_steps(run, plan, model_dir, device, steps, batch)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        run.fitted = False
        run.error = f"out of memory: {str(err).splitlines()[0][:200]}"
    finally:
        run.measured_process_bytes = sampler.peak_delta
        gc.collect()  # the model and optimizer died with _run_steps' frame; give their memory back
        torch.cuda.empty_cache()
    return run


def _is_out_of_memory(err: BaseException) -> bool:
    """torch's OOM, or a library's (cuBLAS, bitsandbytes' paged buffers) that surfaces as a RuntimeError."""
    import torch

    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _run_steps(run: MeasuredRun, plan: Plan, model_dir: str, device, steps: int, batch: dict | None) -> None:
    import torch

    from vramplan.measure import measure_step

    model, optimizer, forward, backward, vocab = _load(plan, model_dir, device)
    run.after_load_allocated = torch.cuda.memory_allocated(device)
    host = batch if batch is not None else random_batch(plan, vocab)
    on_device = {k: v.to(device) for k, v in host.items()}
    run.batch_shape = tuple(on_device["input_ids"].shape)

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps):
        peaks = measure_step(lambda: forward(on_device), backward, optimizer_step)
        for name in ("forward", "backward", "optimizer"):
            run.allocated_by_phase[name] = max(run.allocated_by_phase.get(name, 0), getattr(peaks, f"{name}_allocated"))
        run.peak_reserved = max(run.peak_reserved, peaks.peak_reserved)
        run.steps += 1


def _detect(device_index: int):
    from vramplan.gpu import detect_gpu

    try:
        return detect_gpu(device_index)
    except VramplanError as err:
        raise VramplanError(f"calibrate measures on a real GPU and found none ({err}); without one, plan "
                            "with `vramplan fit MODEL --gpu NAME` instead") from None


def run_calibration(plan: Plan, model_dir: str, steps: int = 3, batch: dict | None = None, device_index: int = 0,
                    store: bool = True, also_in=None, shapes: int = 2) -> CalibrationResult:
    """Price, refuse if it cannot fit, measure the plan's shape and (``shapes=2``) the same plan at half
    the sequence, and store both points in the user's calibration for this key (and in the folder
    ``also_in``, e.g. profiles/calibration of a repository, to commit them). The second shape runs
    only when the first fitted; a shape that runs out of memory is stored as such, never fitted."""
    if steps < 1:
        raise VramplanError(f"--steps is {steps}; run at least 1 step (3 is the default)")
    if shapes not in (1, 2):
        raise VramplanError(f"a calibration measures 1 or 2 shapes, not {shapes}; leave it at 2 unless time is short")
    # the dry run times forward, backward and optimizer apart, eagerly: it calibrates the eager plan,
    # and the planner prices the graphs' measured constant on top of the corrected estimate
    plan = plan.replace(cuda_graphs=False)
    detected = _detect(device_index)
    profile = resolve_model(model_dir)
    est = estimate_plan(plan, profile, detected.spec, budget=detected.free_bytes)
    refuse_if_over(est, detected.free_bytes)
    run = measure_run(plan, model_dir, steps=steps, batch=batch, device_index=device_index)
    points = [point_from(est, run.measured_process_bytes, fitted=run.fitted)]
    shorter = shorter_shape(plan) if shapes == 2 and run.fitted else None
    shorter_est = shorter_run = None
    if shorter is not None:
        shorter_est = estimate_plan(shorter, profile, detected.spec, budget=detected.free_bytes)
        shorter_run = measure_run(shorter, model_dir, steps=steps, device_index=device_index,
                                  batch=shorter_batch(batch, shorter.seq_len) if batch is not None else None,
                                  baseline_used=run.baseline_used)
        points.append(point_from(shorter_est, shorter_run.measured_process_bytes, fitted=shorter_run.fitted))
    key = CalibrationKey(gpu=detected.spec.name, family=model_family(profile), stack=plan.stack,
                         driver_major=driver_major(detected.driver), torch_minor=torch_minor())
    host = probe_host(detected.spec.name, device_index, store)
    calibration = None
    if store:
        calibration = add_points(key, points)
        if also_in:
            from pathlib import Path

            add_points(key, points, Path(also_in))
    return CalibrationResult(predicted=est, run=run, key=key, calibration=calibration, gpu_free_bytes=detected.free_bytes,
                             shorter_predicted=shorter_est, shorter_run=shorter_run, host=host)


def probe_host(gpu: str, device_index: int = 0, store: bool = True):
    """Time this machine's host driving the GPU (``vramplan.host``) and keep the reading for later predictions here:
    eager steps' speed follows it."""
    import torch

    from vramplan.host import HostProbe, autograd_op_us, store_probe

    reading = autograd_op_us(torch.device("cuda", device_index))
    return store_probe(reading, gpu) if store else HostProbe.taken_now(reading, gpu)


def fit_and_calibrate(model_dir: str, base: Plan, steps: int = 3, device_index: int = 0):
    """`fit --calibrate`: fit to the free memory, measure the chosen plan, refit with the correction.

    Returns (first fit, calibration result, refit, the GPU). The refit can only differ from the first
    fit where the measurement moved the prediction across a plan boundary.
    """
    from vramplan.fit import fit_plan

    detected = _detect(device_index)
    profile = resolve_model(model_dir)
    first = fit_plan(profile, detected.spec, budget=detected.free_bytes, base=base)
    result = run_calibration(first.plan, model_dir, steps=steps, device_index=device_index)
    if result.calibration is None or result.calibration.fit["kind"] == "none":
        return first, result, first, detected.spec
    refit = fit_plan(profile, detected.spec, budget=detected.free_bytes, base=base,
                     adjust=lambda est: apply_calibration(est, result.calibration)[0])
    return first, result, refit, detected.spec
