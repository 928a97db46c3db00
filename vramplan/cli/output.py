"""How every command prints: a tabulate table for people, or JSON with ``--json`` for programs."""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import click
from tabulate import tabulate

json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON result.")


def emit_json(data: Any) -> None:
    click.echo(json_text(data))


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], **kwargs: Any) -> str:
    return tabulate(list(rows), headers=list(headers), **kwargs)


def gb(num_bytes: float) -> str:
    """Bytes as decimal gigabytes, the unit GPU vendors and nvidia-smi users read."""
    return f"{num_bytes / 1e9:.2f} GB"
