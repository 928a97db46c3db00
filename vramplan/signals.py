"""Signal handlers for a stretch of code, the previous ones put back after: the training loop's stop
requests, the checkpoint renames and the multi-GPU launcher each take SIGINT / SIGTERM for a while."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterable


@contextlib.contextmanager
def handling(signums: Iterable[int], handler: Callable, restore: bool = True):
    """``handler`` for each of ``signums`` while inside, then the previous handlers (unless not ``restore``).

    Main thread only: Python runs every handler there whichever thread took the signal, and
    elsewhere nothing changes. A signal the process ignores stays ignored (a background job's
    SIGINT, as the shell set it).
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN:
                signal.signal(signum, handler)
                installed[signum] = signal.SIG_DFL if previous is None else previous
    try:
        yield
    finally:
        if restore:
            for signum, previous in installed.items():
                signal.signal(signum, previous)
