"""SIGTERM stops a command as Ctrl-C does (`Terminated`), so a scan keeps what it completed.

The flag `SIGTERM_RECEIVED` remembers it when a library (Ray's `get`) turns the exception
into a plain interrupt.
"""

from __future__ import annotations

import threading

__all__ = ["EXIT_TERMINATED", "SIGTERM_RECEIVED", "Terminated", "was_terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (what was completed is kept), exit 143."""


EXIT_TERMINATED = 143
SIGTERM_RECEIVED = threading.Event()
"""Set by SIGTERM: a library (Ray's `get`) may turn `Terminated` into a plain interrupt."""


def was_terminated(stop: KeyboardInterrupt) -> bool:
    """Whether the interrupt `stop` came from SIGTERM rather than Ctrl-C."""
    return isinstance(stop, Terminated) or SIGTERM_RECEIVED.is_set()
