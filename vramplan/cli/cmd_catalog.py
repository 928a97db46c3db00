"""`vramplan gpus` and `vramplan models`: what the catalog knows, for people or as JSON."""

from __future__ import annotations

from dataclasses import asdict

import click

from vramplan.catalog import list_gpus, list_models, resolve_model
from vramplan.cli import main
from vramplan.cli.output import emit_json, gb, json_option, table


def _money(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"${value:,.2f}{unit}" if value < 100 else f"${value:,.0f}{unit}"


@main.command()
@json_option
def gpus(as_json: bool) -> None:
    """List the GPUs in the catalog (names to pass as --gpu)."""
    specs = list_gpus()
    if as_json:
        emit_json([asdict(spec) for spec in specs])
        return
    rows = [
        (
            s.name,
            s.label,
            gb(s.memory_bytes),
            f"{s.bandwidth_gbs:g} GB/s",
            f"{s.bf16_tflops:g}",
            "yes" if s.supports_bf16 else "no",
            _money(s.price_usd),
            _money(s.rent_usd_per_hour, "/h"),
        )
        for s in specs
    ]
    click.echo(table(rows, ["name", "label", "memory", "bandwidth", "bf16 TFLOP/s", "bf16", "price", "rent"]))


def _architecture(config: dict) -> dict:
    # multimodal configs keep the language model's shape under text_config
    return config.get("text_config") or config


@main.command()
@json_option
def models(as_json: bool) -> None:
    """List the model architecture profiles (names to pass as --model)."""
    rows = []
    for name in list_models():
        profile = resolve_model(name)
        text = _architecture(profile.config)
        rows.append(
            {
                "name": name,
                "family": profile.family,
                "hf_id": profile.hf_id,
                "published_params": profile.published_params,
                "hidden_size": text.get("hidden_size"),
                "num_hidden_layers": text.get("num_hidden_layers"),
                "vocab_size": text.get("vocab_size"),
            }
        )
    if as_json:
        emit_json(rows)
        return
    click.echo(
        table(
            [
                (r["name"], r["family"], "-" if r["published_params"] is None else f"{r['published_params'] / 1e9:.2f} B",
                 r["hidden_size"], r["num_hidden_layers"], r["vocab_size"])
                for r in rows
            ],
            ["name", "family", "published params", "hidden", "layers", "vocab"],
        )
    )
