"""Correcting the planner with what a GPU really used: the calibration store.

A calibration belongs to one (GPU, driver major, torch minor, model family, stack): what the
allocator, cuBLAS and the kernels really take differs along each of those, and nowhere else
can the estimate be trusted to generalise. It holds measured points and one small fit:

    measured ≈ a · static + b · per_token + c

where ``static`` is the estimate's bytes that do not grow with the tokens of a micro-batch
(weights, adapters, optimizer states, libraries) and ``per_token`` those that do (activations,
logits, fragmentation), both above the CUDA context, which NVML's deltas exclude too.

Only shapes of one configuration (a plan up to its sequence length: a calibration's plan and its
half-length twin) separate the two parts, since they share the static bytes; so ``b`` comes from
those pairs alone, and ``a`` from what ``b`` leaves of every point. Runs of different configurations
differ in both parts and each carries its own error, which a fit across them would hand to ``a`` or
``b`` by the accident of which one has more static bytes. Where no configuration's shapes pin ``b``
down against the measurement noise (their per-token bytes too close for a 128 MiB reading step to
leave ``b`` within ±10%), the fit is a single ratio over all the points; the intercept is fitted only
from five points on, so two or three points never buy a free parameter.

The fit is exact on its points; how much of it carries over to a plan it did not measure is a
second question. A calibration's departure from the estimate is part the key's, which every
configuration repeats and which the correction is for, and part its configuration's own, which the
next one draws anew: the allocator's cached segments for those block sizes, the 128 MiB step NVML
read outside torch's pool in that process. On the committed H100 runs the two are about equally
large (the planner's error spreads by ``CONFIGURATION_SPREAD`` between configurations of one stack
and family, the families' mean errors by ``KEY_SPREAD`` beyond what that spread alone makes of a
mean of a few runs), so carrying the whole departure over adds a second configuration error for each
one it removes. The best linear estimate of the key's part is the departure times
``transfer_weight`` = K² / (K² + C² / m), m the configurations measured (0.43 for one, 0.60 for
two): the factors are moved that share of the way from 1, the intercept from 0. A plan the
calibration measured itself gets its measurement (its own configuration error is known there).
Over 150 random choices of each model's calibrating configuration on the committed runs
(benchmarks/results/accuracy.md), the held-out error was 3.5% mean with a fit across
configurations applied in full, 3.3% with ``b`` from shape pairs, 2.9% with the share, against 3.1%
uncalibrated.

Where they live: the user's cache (``$VRAMPLAN_CACHE``, else ``$XDG_CACHE_HOME/vramplan``, else
``~/.cache/vramplan``), under ``calibration/``, one file per key; and the ones this project
measured itself in ``profiles/calibration/*.json`` (a file may hold a list). A file's entry is
``{"key": {...}, "points": [...], "fit": {...}, "created": ISO date}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from vramplan.catalog import ModelProfile, profiles_dir
from vramplan.errors import VramplanError
from vramplan.estimate import Estimate
from vramplan.plan import Plan

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
#: How far the planner's relative error moves between configurations of one stack and family (its
#: standard deviation within a family, 3.0% over the 52 H100 runs of benchmarks/results/accuracy.json,
#: uncalibrated): the allocator's segments for each shape, NVML's steps outside torch's pool.
CONFIGURATION_SPREAD = 0.030
#: How far a stack and family's own mean error sits from zero (standard deviation, same runs): the 7
#: families' means spread by 2.9%, of which about 1.3% is CONFIGURATION_SPREAD averaged over their 4-9 runs.
KEY_SPREAD = 0.026


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

    def measured_for(self, est: Estimate) -> float | None:
        """What this calibration measured for the estimate's very plan (the mean of its runs), or None."""
        runs = [p.measured_bytes for p in self.points
                if p.fitted and p.model == est.model and _same_plan(p.plan, est.plan)]
        return sum(runs) / len(runs) if runs else None

    def factors_for(self, est: Estimate) -> tuple[float, float, float]:
        """(a, b, c) applied to this estimate: the fit's where the calibration measured this plan,
        else moved ``transfer_weight`` of the way from (1, 1, 0) toward them."""
        a, b, c = self.fit["a"], self.fit["b"], self.fit.get("c", 0.0)
        if self.measured_for(est) is not None:
            return a, b, c
        w = transfer_weight(self.points)
        return 1 + w * (a - 1), 1 + w * (b - 1), w * c

    def correct(self, est: Estimate) -> float:
        """Measured-equivalent bytes above the CUDA context for this estimate: the measurement of its
        plan where the calibration has one, else the transferred correction of its two parts."""
        measured = self.measured_for(est)
        if measured is not None:
            return measured
        a, b, c = self.factors_for(est)
        static, per_token = split_estimate(est)
        return a * static + b * per_token + c

    def describe(self) -> str:
        n = sum(p.fitted for p in self.points)
        where = f" from {self.source}" if self.source else ""
        share = f", {100 * transfer_weight(self.points):.0f}% carried to other plans" if n else ""
        return (f"calibrated with {self.key.gpu}/{self.key.family}/{self.key.stack}{where} "
                f"({n} point{'s' if n != 1 else ''}, {self.created[:10]}, {self.fit['kind']} fit{share})")

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


def _same_plan(stored: dict[str, Any], plan: Plan) -> bool:
    """Whether a point's stored plan is this plan (a plan of an older or newer field set is not)."""
    try:
        return Plan.from_dict(stored) == plan
    except VramplanError:
        return False


def _configuration(point: CalibrationPoint) -> tuple[str, str]:
    """A point's configuration: its model and plan up to the sequence length."""
    return point.model, json.dumps({k: v for k, v in point.plan.items() if k != "seq_len"}, sort_keys=True)


def configurations(points: Iterable[CalibrationPoint]) -> int:
    """How many configurations these points measured: plans up to their sequence length, since the
    half-length shape of a calibration shares its plan's shapes and its process's readings."""
    return len({_configuration(p) for p in points if p.fitted})


def transfer_weight(points: Iterable[CalibrationPoint]) -> float:
    """The share of a fitted departure that carries to a plan the points did not measure: the key's part
    of it as best estimated from ``configurations(points)`` configurations, each with its own error
    (``CONFIGURATION_SPREAD``) on top of the key's (``KEY_SPREAD``)."""
    m = configurations(points)
    if m == 0:
        return 0.0
    return KEY_SPREAD**2 / (KEY_SPREAD**2 + CONFIGURATION_SPREAD**2 / m)


def _ratio(points: list[CalibrationPoint]) -> dict[str, Any]:
    ratio = sum(p.measured_bytes for p in points) / sum(p.predicted_bytes for p in points)
    return {"kind": "ratio", "a": ratio, "b": ratio, "c": 0.0}


def _solve(rows: list[list[float]], targets: list[float], noise: float = 0.0) -> list[float] | None:
    """Least squares by the normal equations (``a``, and an intercept where the rows have one); None when
    singular, or when a measurement error of ``noise`` (in the rows' units) would move ``a`` by more than
    ``MAX_FACTOR_ERROR`` (its standard error, from the inverse of the normal matrix)."""
    import numpy as np

    x, y = np.array(rows, dtype=float), np.array(targets, dtype=float)
    gram = x.T @ x
    if np.linalg.cond(gram) > 1e12:
        return None
    if noise and np.sqrt(np.linalg.inv(gram)[0, 0]) * noise > MAX_FACTOR_ERROR:
        return None
    return list(np.linalg.solve(gram, x.T @ y))


def _per_token_factor(usable: list[CalibrationPoint], scale: float) -> float | None:
    """``b`` from the shapes of each configuration against each other, or None where they cannot pin it
    down against the measurement noise (``MAX_FACTOR_ERROR``).

    Only shapes of one configuration separate the two parts: they share the static bytes (whatever small
    difference their peak phases make is counted at face value) and differ in per-token ones. Points of
    different configurations differ in both and each carries its own error (``CONFIGURATION_SPREAD``),
    which a fit across them would hand to ``a`` or ``b`` by the accident of which configuration has more
    static bytes: pooling Llama-3.2-1B's and Llama-3.1-8B's hf runs that way gave a = 0.70, b = 1.22.
    """
    groups: dict[tuple[str, str], list[CalibrationPoint]] = {}
    for p in usable:
        groups.setdefault(_configuration(p), []).append(p)
    spread = covariance = 0.0
    for group in groups.values():
        if len(group) < 2:
            continue
        tokens = [p.per_token_bytes / scale for p in group]
        rest = [(p.measured_bytes - p.static_bytes) / scale for p in group]
        t_mean, r_mean = sum(tokens) / len(tokens), sum(rest) / len(rest)
        spread += sum((t - t_mean) ** 2 for t in tokens)
        covariance += sum((t - t_mean) * (r - r_mean) for t, r in zip(tokens, rest))
    if spread == 0 or MEASUREMENT_NOISE_BYTES / scale / spread**0.5 > MAX_FACTOR_ERROR:
        return None
    return covariance / spread


def fit_correction(points: list[CalibrationPoint]) -> dict[str, Any]:
    """The correction for these points: ``b`` from the shapes of each configuration where they pin it down
    against the measurement noise, then ``a`` (and from five points on ``c``) by least squares on what is
    left of every point; else one ratio over all of them."""
    usable = [p for p in points if p.fitted and p.predicted_bytes > 0]
    if not usable:
        raise VramplanError("a calibration needs at least one run that fitted; calibrate a smaller plan first")
    scale = 1e9  # gigabytes keep the normal equations well conditioned
    b = _per_token_factor(usable, scale) if len(usable) >= 2 else None
    if b is None:
        return _ratio(usable)
    with_intercept = len(usable) >= _MIN_POINTS_FOR_INTERCEPT
    rows = [[p.static_bytes / scale] + ([1.0] if with_intercept else []) for p in usable]
    targets = [(p.measured_bytes - b * p.per_token_bytes) / scale for p in usable]
    solved = _solve(rows, targets, noise=MEASUREMENT_NOISE_BYTES / scale) if with_intercept else None
    if solved is None:  # no intercept asked for, or the static bytes cannot separate one from ``a``
        with_intercept, solved = False, _solve([r[:1] for r in rows], targets)
    if solved is None or not all(_SANE[0] <= v <= _SANE[1] for v in (solved[0], b)):
        return _ratio(usable)
    c = solved[1] * scale if with_intercept else 0.0
    return {"kind": "linear", "a": float(solved[0]), "b": float(b), "c": float(c)}


def apply_calibration(est: Estimate, calibration: Calibration | None) -> tuple[Estimate, str | None]:
    """The estimate corrected by ``calibration`` (or unchanged with None), and a note saying which one.

    Static components are scaled by ``a``, per-token ones by ``b`` (``Calibration.factors_for``:
    the fit's share that carries to this plan, or all of it for a plan the calibration measured), the
    rest of ``Calibration.correct`` (the intercept; for a measured plan, what its measurement adds)
    becomes a ``calibration_offset`` component, the CUDA context is kept; the phases are scaled by
    the peak's ratio above the context (the fit was made on peaks, not on phases).
    """
    if calibration is None:
        return est, None
    a, b, _ = calibration.factors_for(est)
    components = {}
    for name, value in est.components.items():
        if name in UNCORRECTED:
            components[name] = value
        else:
            components[name] = int(round(value * (b if name in PER_TOKEN_COMPONENTS else a)))
    context = sum(est.components.get(k, 0) for k in UNCORRECTED)
    offset = int(round(calibration.correct(est))) - (sum(components.values()) - context)
    if abs(offset) > len(components):  # more than the scaled parts' rounding
        components["calibration_offset"] = offset
    peak = sum(components.values())
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
    except (TypeError, KeyError) as err:
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
        calibration = Calibration(key=key, points=tuple(points), fit={"kind": "none", "a": 1.0, "b": 1.0, "c": 0.0},
                                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    else:
        calibration = new_calibration(key, points)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, calibration.to_dict())
    return dataclasses.replace(calibration, source=str(path))


# ---------------------------------------------------------------- keys


def model_family(profile: ModelProfile) -> str:
    """The profile's family (``llama``, ``gemma4``); for a model folder, the family of the shipped profiles
    of its model_type (a Gemma 4 folder's text config says ``gemma4_text``: without this, what ``calibrate
    --model ./gemma-4-E2B-it`` stored would never reach ``fit gemma-4-e2b``), else that model_type."""
    if profile.family:
        return profile.family
    from vramplan.estimate import architecture

    model_type = architecture(profile).model_type
    return _families_of_model_types(profiles_dir()).get(model_type, model_type)


@lru_cache(maxsize=None)
def _families_of_model_types(directory: Path) -> dict[str, str]:
    """model_type (the config's and its text config's) -> family, over the shipped profiles that name one."""
    from vramplan.catalog import list_models, resolve_model

    families: dict[str, str] = {}
    for name in list_models(directory):
        profile = resolve_model(name, directory)
        if profile.family:
            text = profile.config.get("text_config")
            for config in (profile.config, text if isinstance(text, dict) else {}):
                if isinstance(config.get("model_type"), str):
                    families.setdefault(config["model_type"], profile.family)
    return families


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
