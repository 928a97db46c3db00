"""Atomic file writes: a crash or Ctrl-C leaves the old file or the new one, never half of one.

Plans, calibrations and training checkpoints all go through here, so no command can
lose a file the user already had.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

from vramplan.signals import handling


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then rename it over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")

    write_atomic(path, write)


def replace_dir_atomic(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written ``staging`` folder to ``final``, keeping the old one until the new is in place.

    Between the two renames ``final`` does not exist: a Ctrl-C or SIGTERM there waits until both are done.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    with signals_deferred():
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside are handled on leaving, as if they had come just after.

    A Python-level handler, not a signal mask: any thread may take a process's signal, and the
    interpreter runs the handler in the main thread whichever did.
    """
    caught: list[int] = []
    with handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: caught.append(signum)):
        yield
    for signum in caught:
        signal.raise_signal(signum)
