"""Turning single speed-ups off, for side-by-side benchmarks: ``VRAMPLAN_DISABLE=rope,flat_optimizer``.

A change that is faster in a launch count can still be slower on a GPU; measuring it means
running the same trainer with and without it in one session. Nothing here changes results:
each switch selects between two implementations that the tests hold equal.
"""

from __future__ import annotations

import os

DISABLE_ENV = "VRAMPLAN_DISABLE"
SWITCHES = ("rope", "flat_optimizer")


def enabled(name: str) -> bool:
    """False when ``name`` is listed in ``$VRAMPLAN_DISABLE``."""
    assert name in SWITCHES, name
    return name not in {part.strip() for part in os.environ.get(DISABLE_ENV, "").split(",")}
