"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, on every rank at once.

A terminal's Ctrl-C (torchrun passes it on) or a scheduler's SIGTERM reaches the ranks at
different moments: one may be inside a collective (DDP's gradient all-reduce, FSDP2's
all-gather) while another is between steps, and a rank that left the loop alone would hang
the others; saving needs a gather every rank joins. So while the loop runs the signals only
set a flag, the ranks agree on it at each step boundary (``StopRequests.agreed``), and if
any rank was asked, all save the checkpoint together and exit with 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM: the shell's convention), one process the same way.
"""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist

from vramplan.errors import VramplanError
from vramplan.signals import handling

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a relayed copy of the same Ctrl-C (a launcher and torchrun each passing it on) arrives within
# moments; a person pressing Ctrl-C again to quit comes later
RELAY_WINDOW_S = 1.0


def exit_code(signum: int) -> int:
    return 128 + signum


class Aborted(VramplanError):
    """A second Ctrl-C: the run stopped at once, without a checkpoint of the step under way."""

    def __init__(self, message: str):
        super().__init__(message)
        self.exit_code = exit_code(signal.SIGINT)


class StopRequests:
    """While entered (``signals.handling``), SIGINT and SIGTERM set ``signal`` instead of raising or killing.

    A second SIGINT, after ``RELAY_WINDOW_S``, raises KeyboardInterrupt: quit without saving
    (checkpoint writes are atomic, so the last complete one stays). Repeated SIGTERMs are ignored:
    torchrun sends one to the ranks still running when one rank has exited, and a scheduler's
    SIGKILL is its own way to insist. ``keep``: leave the handlers in place on exit, for a rank
    under torchrun that is about to exit anyway and must not be killed before it has reported.
    """

    def __init__(self, announce: bool = True, keep: bool = False):
        self.signal = 0  # the first signal received, 0 while none
        self._announce = announce
        self._at = 0.0
        self._handling = handling(SIGNALS, self._handle, restore=not keep)

    def __enter__(self) -> "StopRequests":
        self._handling.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handling.__exit__(*exc)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.signal:
            self.signal, self._at = signum, now
            if self._announce:
                print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint"
                      + (" (Ctrl-C again to quit without one)" if signum == signal.SIGINT else ""),
                      file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and now - self._at >= RELAY_WINDOW_S:
            raise KeyboardInterrupt

    def agreed(self, world_size: int, device: torch.device) -> int:
        """The signal any rank received (the highest number if they differ: SIGTERM over SIGINT), 0 for none.

        Every rank calls this at the same step boundary. On several ranks it costs one all-reduce
        (MAX) of one int per optimizer step, the price of a clean multi-rank stop; on one, nothing.
        """
        if world_size < 2:
            return self.signal
        flag = torch.tensor([self.signal], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
