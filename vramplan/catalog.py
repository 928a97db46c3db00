"""Loads the data under ``profiles/``: model architectures and the GPU catalog.

Profiles are data, validated on load: a broken file fails with the file and field named,
not with a KeyError deep inside the planner. The folder is ``profiles/`` beside the package,
or the one named by the environment variable ``VRAMPLAN_PROFILES`` (read on every call, so a
test or a user can point at their own; loaded files are cached per folder, see
:func:`clear_caches`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from vramplan.errors import VramplanError

def _packaged_profiles() -> Path:
    """``profiles/`` as installed (package data ``vramplan.profiles``), or beside the source tree."""
    installed = Path(__file__).resolve().parent / "profiles"
    return installed if (installed / "gpus.json").exists() else Path(__file__).resolve().parent.parent / "profiles"


PROFILES_DIR = _packaged_profiles()
PROFILES_ENV = "VRAMPLAN_PROFILES"


def profiles_dir(override: str | Path | None = None) -> Path:
    """The profiles folder: ``override``, else ``$VRAMPLAN_PROFILES``, else the packaged one."""
    return Path(override or os.environ.get(PROFILES_ENV) or PROFILES_DIR)


def clear_caches() -> None:
    """Forget loaded profiles, for when a file changed in place (the caches are keyed by folder)."""
    _model_files.cache_clear()
    _gpu_catalog.cache_clear()


@dataclass(frozen=True)
class ModelProfile:
    """A model's architecture config (the Hugging Face config.json, verbatim) and where it came from.

    ``published_counts`` says what ``published_params`` counts: ``all`` (every parameter, tied
    matrices once, as transformers counts), ``language_model`` (the text tower alone) or
    ``all+untied_lm_head`` (the checkpoint stores a tied LM head twice and the count includes both).
    """

    name: str
    config: dict[str, Any]
    published_params: int | None = None
    source: str = ""
    hf_id: str = ""
    family: str = ""
    published_counts: str = "all"


PUBLISHED_COUNTS = ("all", "language_model", "all+untied_lm_head")
GPU_KINDS = ("consumer", "laptop", "workstation", "datacenter", "unified", "budget")


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
    sms: int = 0  # streaming multiprocessors (AMD: compute units, Apple: GPU cores); 0: unknown


def read_json(path: Path) -> Any:
    """A profiles JSON file, or a one-line VramplanError naming the file and what is wrong."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VramplanError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise VramplanError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.4)
    return f"; did you mean {', '.join(close)}?" if close else ""


# ---------------------------------------------------------------- field checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item for item in value)


# field -> (check, what the field must be); JSON null is allowed only where the description says so
_GPU_FIELDS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and v.strip() == v and v != "", "a non-empty string"),
    "label": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "memory_bytes": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "bandwidth_gbs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "bf16_tflops": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fp16_tflops": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "supports_bf16": (lambda v: isinstance(v, bool), "true or false"),
    "unified_memory": (lambda v: isinstance(v, bool), "true or false"),
    "kind": (lambda v: v in GPU_KINDS, f"one of {', '.join(GPU_KINDS)}"),
    "price_usd": (lambda v: v is None or (_is_number(v) and v > 0), "a positive number or null"),
    "rent_usd_per_hour": (lambda v: v is None or (_is_number(v) and v > 0), "a positive number or null"),
    "interconnect": (lambda v: v is None or (isinstance(v, str) and v != ""), "a string or null"),
    "count": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "sms": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "aliases": (_is_str_list, "a list of non-empty strings"),
    "nvml_names": (_is_str_list, "a list of non-empty strings"),
}
_GPU_REQUIRED = ("name", "label", "memory_bytes")

_MODEL_META_FIELDS: dict[str, tuple[Any, str]] = {
    "published_params": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "hf_id": (lambda v: isinstance(v, str), "a string"),
    "family": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "published_counts": (lambda v: v in PUBLISHED_COUNTS, f"one of {', '.join(PUBLISHED_COUNTS)}"),
}


def _check_fields(where: str, entry: dict[str, Any], spec: dict[str, tuple[Any, str]]) -> None:
    for key, value in entry.items():
        if key not in spec:
            raise VramplanError(f"{where}: unknown field '{key}'{_suggest(key, list(spec))}")
        check, wanted = spec[key]
        if not check(value):
            raise VramplanError(f"{where}: field '{key}' must be {wanted}, not {json.dumps(value)}")


# ---------------------------------------------------------------- models


@lru_cache(maxsize=None)
def _model_files(directory: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((directory / "models").glob("*.json"))}


def list_models(profiles: str | Path | None = None) -> list[str]:
    return list(_model_files(profiles_dir(profiles)))


def _profile_from_file(name: str, path: Path) -> ModelProfile:
    data = read_json(path)
    if not isinstance(data, dict):
        raise VramplanError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    meta = data.pop("_vramplan", None) or {}
    if not isinstance(meta, dict):
        raise VramplanError(f"{path}: field '_vramplan' must be an object")
    _check_fields(f"{path}: _vramplan", meta, _MODEL_META_FIELDS)
    if not isinstance(data.get("model_type"), str):
        raise VramplanError(f"{path}: field 'model_type' is missing or not a string; is this a Hugging Face config.json?")
    for sub in ("text_config", "vision_config", "audio_config"):
        if data.get(sub) is not None and not isinstance(data[sub], dict):
            raise VramplanError(f"{path}: field '{sub}' must be an object or null")
    return ModelProfile(
        name=name,
        config=data,
        published_params=meta.get("published_params"),
        source=meta.get("source", str(path)),
        hf_id=meta.get("hf_id", ""),
        family=meta.get("family", ""),
        published_counts=meta.get("published_counts", "all"),
    )


def resolve_model(name_or_path: str, profiles: str | Path | None = None) -> ModelProfile:
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
    files = _model_files(profiles_dir(profiles))
    key = name_or_path.lower()
    if key not in files:
        raise VramplanError(f"unknown model '{name_or_path}'{_suggest(key, list(files))} (`vramplan models` lists them, or pass a config.json)")
    return _profile_from_file(key, files[key])


# ---------------------------------------------------------------- GPUs

_BUDGET = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(gb|gib|g)\s*$", re.IGNORECASE)
_BOX = re.compile(r"^\s*(\d+)\s*x\s*(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class _Catalog:
    by_key: dict[str, GpuSpec]  # names and aliases, lower-case
    nvml_names: dict[str, tuple[str, ...]]  # GPU name -> the names NVML reports for it


@lru_cache(maxsize=None)
def _gpu_catalog(directory: Path) -> _Catalog:
    path = directory / "gpus.json"
    data = read_json(path)
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise VramplanError(f"{path}: expected {{\"gpus\": [...]}}")
    by_key: dict[str, GpuSpec] = {}
    nvml_names: dict[str, tuple[str, ...]] = {}
    spec_fields = {f.name for f in fields(GpuSpec)}
    for i, entry in enumerate(entries):
        where = f"{path}: gpus[{i}]"
        if not isinstance(entry, dict):
            raise VramplanError(f"{where} is not an object")
        for required in _GPU_REQUIRED:
            if required not in entry:
                raise VramplanError(f"{where}: field '{required}' is missing")
        where = f"{where} ({entry['name']})"
        _check_fields(where, entry, _GPU_FIELDS)
        spec = GpuSpec(**{k: v for k, v in entry.items() if k in spec_fields})
        if not spec.supports_bf16 and spec.bf16_tflops:
            raise VramplanError(f"{where}: field 'bf16_tflops' must be 0 when 'supports_bf16' is false")
        if (spec.kind == "unified") != spec.unified_memory:
            raise VramplanError(f"{where}: field 'unified_memory' must be true exactly when 'kind' is \"unified\"")
        for key in [spec.name, *entry.get("aliases", [])]:
            if key.lower() in by_key:
                raise VramplanError(f"{where}: name or alias '{key}' is already used by {by_key[key.lower()].name}")
            by_key[key.lower()] = spec
        nvml_names[spec.name] = tuple(entry.get("nvml_names", []))
    return _Catalog(by_key, nvml_names)


def gpu_catalog_about(profiles: str | Path | None = None) -> dict[str, Any]:
    """The catalog's ``_about`` block: its ``date`` (when the figures and prices were gathered) and ``sources``."""
    about = read_json(profiles_dir(profiles) / "gpus.json").get("_about")
    return about if isinstance(about, dict) else {}


def _gpu_table(profiles: str | Path | None = None) -> dict[str, GpuSpec]:
    return _gpu_catalog(profiles_dir(profiles)).by_key


def list_gpus(profiles: str | Path | None = None) -> list[GpuSpec]:
    seen: dict[str, GpuSpec] = {}
    for spec in _gpu_table(profiles).values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def _normalized_gpu_name(name: str) -> str:
    # "NVIDIA GeForce RTX 4060 Laptop GPU" and "rtx 4060 laptop gpu" are the same card
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))


def gpus_named_by_nvml(nvml_name: str, profiles: str | Path | None = None) -> list[GpuSpec]:
    """The catalog entries NVML's device name can mean (several where one name covers several memory sizes)."""
    catalog = _gpu_catalog(profiles_dir(profiles))
    wanted = _normalized_gpu_name(nvml_name)
    return [
        spec
        for spec in list_gpus(profiles)
        if wanted in {_normalized_gpu_name(n) for n in (spec.label, *catalog.nvml_names[spec.name])}
    ]


def budget_gpu(memory_bytes: int, label: str) -> GpuSpec:
    """A bare memory budget, as if it were a GPU of unknown speed."""
    return GpuSpec(name=label, label=f"{label} budget", memory_bytes=memory_bytes, kind="budget")


def gpu_box(gpu: GpuSpec, count: int) -> GpuSpec:
    """A box of ``count`` GPUs like ``gpu`` (``2xrtx-4090``); every figure stays per GPU."""
    if count == gpu.count:
        return gpu
    single = gpu.name.split("x", 1)[1] if gpu.count > 1 else gpu.name
    return GpuSpec(**{**gpu.__dict__, "count": count, "name": single if count == 1 else f"{count}x{single}"})


def box_count(gpu: GpuSpec | None, gpus: int | None) -> int:
    """GPUs in the run: ``gpus`` (``--gpus N``) or the box ``gpu`` names (``2xrtx-4090``); they must agree."""
    boxed = gpu.count if gpu is not None else 1
    if gpus is not None and boxed > 1 and gpus != boxed:
        raise VramplanError(f"--gpu {gpu.name} is a box of {boxed} GPUs but --gpus is {gpus}; give one of them")
    return gpus or boxed


def resolve_gpu(spec: str, profiles: str | Path | None = None) -> GpuSpec:
    """A catalog name or alias (``rtx-4060``), a budget (``12GB``, ``24GiB``) or a box (``8xh100``).

    ``auto`` is not handled here: detection needs pynvml, see :mod:`vramplan.gpu`.
    """
    text = spec.strip()
    budget = _BUDGET.match(text)
    if budget:
        amount, unit = float(budget.group(1)), budget.group(2).lower()
        if not 0 < amount <= 100_000:
            raise VramplanError(f"--gpu {spec}: a memory budget must be more than 0 and at most 100000 GB, e.g. --gpu 12GB")
        scale = 2**30 if unit == "gib" else 10**9
        return budget_gpu(int(amount * scale), text.replace(" ", ""))
    table = _gpu_table(profiles)
    box = _BOX.match(text)
    if box and box.group(2).strip().lower() in table:
        count = int(box.group(1))
        if not 1 <= count <= 64:
            raise VramplanError(f"--gpu {spec}: a box holds 1 to 64 GPUs")
        return gpu_box(table[box.group(2).strip().lower()], count)
    if text.lower() not in table:
        raise VramplanError(
            f"unknown GPU '{spec}'{_suggest(text, list(table))} (`vramplan gpus` lists them, or give a budget such as --gpu 12GB)"
        )
    return table[text.lower()]
