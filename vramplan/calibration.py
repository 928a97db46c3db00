"""Correcting the planner with what a GPU really used: the calibration store.

A calibration belongs to one (GPU, driver major, torch minor, model family, stack): what the
allocator, cuBLAS and the kernels really take differs along each of those, and nowhere else
can the estimate be trusted to generalise. It holds measured points and one small fit:

    measured ≈ a · static + b · per_token + c + offset[model]

where ``static`` is the estimate's bytes that do not grow with the tokens of a micro-batch
(weights, adapters, optimizer states, libraries) and ``per_token`` those that do (activations,
logits, fragmentation), both above the CUDA context, which NVML's deltas exclude too. With one
point, or points that cannot separate the two parts against the measurement noise (their
per-token bytes too close for a 128 MiB reading step to leave ``b`` within ±10%), the fit is a
single ratio over all the points; the intercept is fitted only from five points on, so two or
three points never buy a free parameter.

Two levels, because a family's calibration pools the models measured in it (Llama-3.2-1B and
Llama-3.1-8B land in one ``llama`` calibration). The factors are the family's: how its layers'
activations, logits and allocator segments scale with shape is a property of the architecture and
the stack, and every model's points inform them. What a model's own runs show beyond that shared
fit is kept as that model's offset in bytes (``model_offsets``): bytes no tensor of the plan
accounts for and no factor should scale, the memory outside torch's pool (kernel images, the
driver's local-memory reservation, which step with the kernels cuBLAS picks for that model's
widths: 0.14-0.16 GB in every hf-stack run of Qwen3-0.6B on the H100, 0.27-0.29 GB in the other
models') and the allocator segments its layer sizes leave. Without it one model's error leaks into
another's prediction through the pooled ratio, and a calibration no longer reproduces the very run
it measured: on the H100's hf stack Llama-3.1-8B's 1.0 GB over-prediction pulled the ``llama``
ratio to 0.95 and Llama-3.2-1B's calibration run, which the estimate missed by 1.6%, came out 6.4%
under its own measurement. The offsets are fitted only where the points span two models or more;
one model's points are the family fit already, and an offset there would be the intercept three
points must not buy. A model with no points of its own gets the family fit alone.

Where they live: the user's cache (``$VRAMPLAN_CACHE``, else ``$XDG_CACHE_HOME/vramplan``, else
``~/.cache/vramplan``), under ``calibration/``, one file per key; and the ones this project
measured itself in ``profiles/calibration/*.json`` (a file may hold a list). A file's entry is
``{"key": {...}, "points": [...], "fit": {...}, "created": ISO date}``; a fit written before the
per-model offsets existed (no ``model_offsets``) reads as having none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vramplan.catalog import ModelProfile, profiles_dir
from vramplan.errors import VramplanError
from vramplan.estimate import Estimate

#: Estimate components that grow with the tokens of a micro-batch; the rest (less the context) is static.
PER_TOKEN_COMPONENTS = ("activations", "logits_loss", "per_layer_inputs", "shared_kv", "fragmentation")
#: Not corrected: NVML deltas are taken with the context already there, so no point measures it.
UNCORRECTED = ("cuda_context",)
CACHE_ENV = "VRAMPLAN_CACHE"
#: A fitted a or b outside this range means the points do not separate the parts; use a ratio.
_SANE = (0.5, 2.0)
_MIN_POINTS_FOR_INTERCEPT = 5
#: How far one process-memory reading can sit from another run's of the same plan for reasons no
#: plan shows: on the H100 the memory NVML sees outside torch's pool steps by 128 MiB between runs
#: (0.15 / 0.29 / 0.42 GB, benchmarks/results/trainer_h100.jsonl), a spread of about ±64 MiB.
MEASUREMENT_NOISE_BYTES = 64 * 2**20
#: The linear fit is kept only when that noise moves neither factor by more than this (its standard
#: error); two shapes a few hundred MB apart in per-token bytes cannot pin ``b`` down, and a
#: ``b`` of 2 fitted from noise doubles every other length's activations.
MAX_FACTOR_ERROR = 0.1


@dataclass(frozen=True)
class CalibrationKey:
    """What a correction is valid for. ``None`` for driver/torch: measured without recording it (matches any)."""

    gpu: str
    family: str
    stack: str
    driver_major: int | None = None
    torch_minor: str | None = None

    def slug(self) -> str:
        parts = [self.gpu, self.family, self.stack, f"driver{self.driver_major}" if self.driver_major else "",
                 f"torch{self.torch_minor}" if self.torch_minor else ""]
        return re.sub(r"[^a-z0-9.]+", "-", "-".join(p for p in parts if p).lower()).strip("-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationPoint:
    """One measured run: the estimate's two parts and the process memory above the CUDA context."""

    model: str
    static_bytes: int
    per_token_bytes: int
    measured_bytes: int  # process memory above the CUDA context (NVML peak delta)
    plan: dict[str, Any] = field(default_factory=dict)
    fitted: bool = True  # False: the run ran out of memory; kept as a fact, never fitted

    @property
    def predicted_bytes(self) -> int:
        return self.static_bytes + self.per_token_bytes


@dataclass(frozen=True)
class Calibration:
    key: CalibrationKey
    points: tuple[CalibrationPoint, ...]
    fit: dict[str, Any]
    created: str
    source: str = ""

    def offset_for(self, model: str | None) -> float:
        """The bytes added to every corrected estimate of ``model``: the intercept and the model's own offset."""
        return self.fit.get("c", 0.0) + self.fit.get("model_offsets", {}).get(model, 0.0)

    def correct(self, static: float, per_token: float, model: str | None = None) -> float:
        """Measured-equivalent bytes above the CUDA context for an estimate of ``model`` with these parts."""
        return self.fit["a"] * static + self.fit["b"] * per_token + self.offset_for(model)

    def describe(self) -> str:
        n = sum(p.fitted for p in self.points)
        where = f" from {self.source}" if self.source else ""
        models = len(self.fit.get("model_offsets", {}))
        per_model = f" with offsets for {models} models" if models else ""
        return (f"calibrated with {self.key.gpu}/{self.key.family}/{self.key.stack}{where} "
                f"({n} point{'s' if n != 1 else ''}, {self.created[:10]}, {self.fit['kind']} fit{per_model})")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "points": [dataclasses.asdict(p) for p in self.points],
                "fit": dict(self.fit), "created": self.created}


# ---------------------------------------------------------------- the correction


def split_estimate(est: Estimate) -> tuple[int, int]:
    """(static, per-token) bytes of an estimate's peak, the CUDA context left out."""
    per_token = sum(v for k, v in est.components.items() if k in PER_TOKEN_COMPONENTS)
    static = sum(v for k, v in est.components.items() if k not in PER_TOKEN_COMPONENTS and k not in UNCORRECTED)
    return static, per_token


def point_from(est: Estimate, measured_above_context: int, fitted: bool = True) -> CalibrationPoint:
    static, per_token = split_estimate(est)
    return CalibrationPoint(model=est.model, static_bytes=static, per_token_bytes=per_token,
                            measured_bytes=int(measured_above_context), plan=est.plan.to_dict(), fitted=fitted)


def _ratio(points: list[CalibrationPoint]) -> dict[str, Any]:
    ratio = sum(p.measured_bytes for p in points) / sum(p.predicted_bytes for p in points)
    return {"kind": "ratio", "a": ratio, "b": ratio, "c": 0.0}


def _model_offsets(fit: dict[str, Any], points: list[CalibrationPoint]) -> dict[str, float]:
    """Each model's mean departure (bytes) from the family's fit, where the points span two models or
    more; none for one model's points (its own fit already, and an offset would be a free intercept)."""
    by_model: dict[str, list[float]] = {}
    for p in points:
        shared = fit["a"] * p.static_bytes + fit["b"] * p.per_token_bytes + fit["c"]
        by_model.setdefault(p.model, []).append(p.measured_bytes - shared)
    if len(by_model) < 2:
        return {}
    return {model: float(sum(residuals) / len(residuals)) for model, residuals in sorted(by_model.items())}


def _solve(rows: list[list[float]], targets: list[float], noise: float = 0.0) -> list[float] | None:
    """Least squares by the normal equations (2 or 3 unknowns); None when singular, or when a
    measurement error of ``noise`` (in the rows' units) would move a or b by more than
    ``MAX_FACTOR_ERROR`` (their standard errors, from the inverse of the normal matrix)."""
    import numpy as np

    x, y = np.array(rows, dtype=float), np.array(targets, dtype=float)
    gram = x.T @ x
    if np.linalg.cond(gram) > 1e12:
        return None
    if noise and max(np.sqrt(np.diag(np.linalg.inv(gram))[:2])) * noise > MAX_FACTOR_ERROR:
        return None
    return list(np.linalg.solve(gram, x.T @ y))


def fit_correction(points: list[CalibrationPoint]) -> dict[str, Any]:
    """The correction for these points: the family's factors (linear in the two parts where the points
    pin both down against the measurement noise, ``MAX_FACTOR_ERROR``, else one ratio over all of them)
    and, where the points span several models, each model's offset from that shared fit."""
    usable = [p for p in points if p.fitted and p.predicted_bytes > 0]
    if not usable:
        raise VramplanError("a calibration needs at least one run that fitted; calibrate a smaller plan first")
    fit = _family_fit(usable)
    return fit | {"model_offsets": _model_offsets(fit, usable)}


def _family_fit(usable: list[CalibrationPoint]) -> dict[str, Any]:
    if len(usable) < 2:
        return _ratio(usable)
    scale = 1e9  # gigabytes keep the normal equations well conditioned
    with_intercept = len(usable) >= _MIN_POINTS_FOR_INTERCEPT
    rows = [[p.static_bytes / scale, p.per_token_bytes / scale] + ([1.0] if with_intercept else []) for p in usable]
    solved = _solve(rows, [p.measured_bytes / scale for p in usable], noise=MEASUREMENT_NOISE_BYTES / scale)
    if solved is None or not all(_SANE[0] <= v <= _SANE[1] for v in solved[:2]):
        return _ratio(usable)
    c = solved[2] * scale if with_intercept else 0.0
    return {"kind": "linear", "a": float(solved[0]), "b": float(solved[1]), "c": float(c)}


def apply_calibration(est: Estimate, calibration: Calibration | None) -> tuple[Estimate, str | None]:
    """The estimate corrected by ``calibration`` (or unchanged with None), and a note saying which one.

    Static components are scaled by ``a``, per-token ones by ``b``, the intercept and the estimated
    model's own offset become a ``calibration_offset`` component, the CUDA context is kept; the
    phases are scaled by the peak's ratio above the context (the fit was made on peaks, not on phases).
    """
    if calibration is None:
        return est, None
    a, b, c = calibration.fit["a"], calibration.fit["b"], calibration.offset_for(est.model)
    components = {}
    for name, value in est.components.items():
        if name in UNCORRECTED:
            components[name] = value
        else:
            components[name] = int(round(value * (b if name in PER_TOKEN_COMPONENTS else a)))
    if round(c):
        components["calibration_offset"] = int(round(c))
    peak = sum(components.values())
    context = sum(est.components.get(k, 0) for k in UNCORRECTED)
    scale = (peak - context) / max(est.peak_bytes - context, 1)
    phases = {k: int(round(context + (v - context) * scale)) for k, v in est.phases.items()}
    note = calibration.describe()
    corrected = dataclasses.replace(est, peak_bytes=peak, components=components, phases=phases,
                                    notes=tuple(est.notes) + (note,))
    return corrected, note


# ---------------------------------------------------------------- the store


def cache_dir() -> Path:
    """Where this user's own calibrations go (``$VRAMPLAN_CACHE``, ``$XDG_CACHE_HOME/vramplan``, ``~/.cache/vramplan``)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vramplan"
    return root / "calibration"


def shipped_dir() -> Path:
    """The calibrations this project measured itself: ``profiles/calibration/``."""
    return profiles_dir() / "calibration"


def _entry(data: Any, where: str) -> Calibration:
    if not isinstance(data, dict) or not {"key", "points", "fit"} <= set(data):
        raise VramplanError(f"{where}: a calibration needs 'key', 'points' and 'fit'; delete or fix the file")
    try:
        key = CalibrationKey(**data["key"])
        points = tuple(CalibrationPoint(**p) for p in data["points"])
        fit = {k: data["fit"][k] for k in ("kind", "a", "b")} | {"c": data["fit"].get("c", 0.0)}
        # files written before per-model offsets existed have none: the family fit alone, as then
        fit["model_offsets"] = {str(m): float(v) for m, v in data["fit"].get("model_offsets", {}).items()}
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise VramplanError(f"{where}: malformed calibration ({err}); delete or fix the file") from None
    return Calibration(key=key, points=points, fit=fit, created=str(data.get("created", "")), source=where)


def read_calibration_file(path: Path) -> list[Calibration]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VramplanError(f"{path}: not valid JSON (line {err.lineno}); delete or fix the file") from None
    entries = data if isinstance(data, list) else [data]
    return [_entry(e, str(path)) for e in entries]


def load_calibrations(directories: list[Path] | None = None) -> list[Calibration]:
    """Every calibration in the user's cache, then the shipped ones."""
    found = []
    for directory in directories if directories is not None else [cache_dir(), shipped_dir()]:
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                found.extend(read_calibration_file(path))
    return found


def find_calibration(gpu: str, family: str, stack: str, driver_major: int | None = None, torch_minor: str | None = None,
                     directories: list[Path] | None = None) -> Calibration | None:
    """The calibration for this GPU, family and stack: one measured under the same driver and torch
    first, then one that recorded neither or differs in them; among equals the most points, then the newest.
    The cache is searched before the shipped files, so a user's own measurement wins a tie."""
    candidates = [c for c in load_calibrations(directories)
                  if c.key.gpu == gpu and c.key.family == family and c.key.stack == stack]

    def rank(c: Calibration) -> tuple:
        same = (driver_major is not None and c.key.driver_major == driver_major) + \
               (torch_minor is not None and c.key.torch_minor == torch_minor)
        return (same, sum(p.fitted for p in c.points), c.created)

    return max(candidates, key=rank) if candidates else None  # max keeps the first of equals: the cache's


def new_calibration(key: CalibrationKey, points: list[CalibrationPoint], created: str | None = None) -> Calibration:
    return Calibration(key=key, points=tuple(points), fit=fit_correction(points),
                       created=created or datetime.now(timezone.utc).isoformat(timespec="seconds"))


def add_point(key: CalibrationKey, point: CalibrationPoint, directory: Path | None = None) -> Calibration:
    """Add one measured point to the user's calibration for ``key``, refit, and write it atomically."""
    return add_points(key, [point], directory)


def add_points(key: CalibrationKey, new_points: list[CalibrationPoint], directory: Path | None = None) -> Calibration:
    """Add the points of one calibration (the plan's shape and its shorter twin) to the user's
    calibration for ``key``, refit once, and write it atomically."""
    from vramplan.atomic import write_json_atomic

    directory = directory or cache_dir()
    path = directory / f"{key.slug()}.json"
    points = list(read_calibration_file(path)[0].points) if path.exists() else []
    points.extend(new_points)
    if not any(p.fitted for p in points):  # only OOMs so far: keep them, nothing to fit yet
        calibration = Calibration(key=key, points=tuple(points), fit={"kind": "none", "a": 1.0, "b": 1.0, "c": 0.0, "model_offsets": {}},
                                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    else:
        calibration = new_calibration(key, points)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, calibration.to_dict())
    return dataclasses.replace(calibration, source=str(path))


# ---------------------------------------------------------------- keys


def model_family(profile: ModelProfile) -> str:
    """The profile's family (``llama``, ``gemma4``), else its config's model_type."""
    if profile.family:
        return profile.family
    from vramplan.estimate import architecture

    return architecture(profile).model_type


def torch_minor() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def driver_major(driver: str) -> int | None:
    head = driver.split(".")[0]
    return int(head) if head.isdigit() else None


def calibration_for(profile: ModelProfile, stack: str, gpu_name: str | None, driver: str | None = None,
                    directories: list[Path] | None = None) -> Calibration | None:
    """The calibration an estimate on ``gpu_name`` (a catalog name) should use, or None."""
    if not gpu_name:
        return None
    major = driver_major(driver) if driver else None
    return find_calibration(gpu_name, model_family(profile), stack, major, torch_minor() if driver else None, directories)
