"""Loads the data under ``profiles/``: model architectures and the GPU catalog.

Profiles are data, validated on load: a broken file fails with the file and field named,
not with a KeyError deep inside the planner.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vramplan.errors import VramplanError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class ModelProfile:
    """A model's architecture config (the Hugging Face config.json, verbatim) and where it came from."""

    name: str
    config: dict[str, Any]
    published_params: int | None = None
    source: str = ""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU (or a box of ``count`` identical GPUs); every figure is for a single GPU."""

    name: str
    label: str
    memory_bytes: int
    bandwidth_gbs: float = 0.0
    bf16_tflops: float = 0.0  # dense, no sparsity
    fp16_tflops: float = 0.0
    supports_bf16: bool = True
    unified_memory: bool = False
    kind: str = "datacenter"  # consumer | laptop | workstation | datacenter | unified | budget
    price_usd: float | None = None
    rent_usd_per_hour: float | None = None
    interconnect: str | None = None
    count: int = 1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VramplanError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise VramplanError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.4)
    return f"; did you mean {', '.join(close)}?" if close else ""


# ---------------------------------------------------------------- models


@lru_cache(maxsize=None)
def _model_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted((PROFILES_DIR / "models").glob("*.json"))}


def list_models() -> list[str]:
    return list(_model_files())


def _profile_from_file(name: str, path: Path) -> ModelProfile:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise VramplanError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    meta = data.pop("_vramplan", {}) or {}
    if "model_type" not in data:
        raise VramplanError(f"{path}: field 'model_type' is missing; is this a Hugging Face config.json?")
    published = meta.get("published_params")
    if published is not None and (not isinstance(published, int) or published <= 0):
        raise VramplanError(f"{path}: field '_vramplan.published_params' must be a positive integer")
    return ModelProfile(name=name, config=data, published_params=published, source=str(meta.get("source", path)))


def resolve_model(name_or_path: str) -> ModelProfile:
    """A profile name (``gemma-4-e2b``), a config.json, or a model folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise VramplanError(f"{name_or_path} has no config.json; point at a Hugging Face model folder or its config.json")
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise VramplanError(f"{path} does not exist")
        return _profile_from_file(path.parent.name if path.name == "config.json" else path.stem, path)
    files = _model_files()
    key = name_or_path.lower()
    if key not in files:
        raise VramplanError(f"unknown model '{name_or_path}'{_suggest(key, list(files))} (`vramplan models` lists them, or pass a config.json)")
    return _profile_from_file(key, files[key])


# ---------------------------------------------------------------- GPUs

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)\s*$", re.IGNORECASE)
_BOX = re.compile(r"^\s*(\d+)\s*x\s*(.+)$", re.IGNORECASE)


@lru_cache(maxsize=None)
def _gpu_table() -> dict[str, GpuSpec]:
    path = PROFILES_DIR / "gpus.json"
    data = _read_json(path)
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise VramplanError(f"{path}: expected {{\"gpus\": [...]}}")
    table: dict[str, GpuSpec] = {}
    fields = set(GpuSpec.__dataclass_fields__)
    for i, entry in enumerate(entries):
        where = f"{path}: gpus[{i}]"
        if not isinstance(entry, dict):
            raise VramplanError(f"{where} is not an object")
        for required in ("name", "label", "memory_bytes"):
            if required not in entry:
                raise VramplanError(f"{where}: field '{required}' is missing")
        if not isinstance(entry["memory_bytes"], int) or entry["memory_bytes"] <= 0:
            raise VramplanError(f"{where} ({entry['name']}): field 'memory_bytes' must be a positive integer")
        spec = GpuSpec(**{k: v for k, v in entry.items() if k in fields})
        for key in [spec.name, *entry.get("aliases", [])]:
            table[key.lower()] = spec
    return table


def list_gpus() -> list[GpuSpec]:
    seen: dict[str, GpuSpec] = {}
    for spec in _gpu_table().values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def budget_gpu(memory_bytes: int, label: str) -> GpuSpec:
    """A bare memory budget, as if it were a GPU of unknown speed."""
    return GpuSpec(name=label, label=f"{label} budget", memory_bytes=memory_bytes, kind="budget")


def resolve_gpu(spec: str) -> GpuSpec:
    """A catalog name or alias (``rtx-4060``), a budget (``12GB``, ``24GiB``) or a box (``8xh100``).

    ``auto`` is not handled here: detection needs pynvml, see :mod:`vramplan.gpu`.
    """
    text = spec.strip()
    budget = _BUDGET.match(text)
    if budget:
        amount, unit = float(budget.group(1)), budget.group(2).lower()
        if amount <= 0 or amount > 100_000:
            raise VramplanError(f"--gpu {spec}: a budget must be between 0 and 100000 GB")
        scale = 2**30 if unit == "gib" else 10**9
        return budget_gpu(int(amount * scale), text.replace(" ", ""))
    box = _BOX.match(text)
    if box and box.group(2).lower() in _gpu_table():
        count = int(box.group(1))
        if not 1 <= count <= 64:
            raise VramplanError(f"--gpu {spec}: a box holds 1 to 64 GPUs")
        single = _gpu_table()[box.group(2).lower()]
        return GpuSpec(**{**single.__dict__, "count": count, "name": f"{count}x{single.name}"})
    table = _gpu_table()
    if text.lower() not in table:
        raise VramplanError(
            f"unknown GPU '{spec}'{_suggest(text, list(table))} (`vramplan gpus` lists them, or give a budget such as --gpu 12GB)"
        )
    return table[text.lower()]
