"""A stop the user asked for (Ctrl-C, SIGTERM), kept even when a library swallows it.

Ctrl-C and SIGTERM stop a command by raising an exception (`KeyboardInterrupt`,
`Terminated`) in whatever code runs, so a scan keeps every step it completed. A C
extension running a Python callback at that moment (pydantic-core building a validator)
may print "Exception ignored" and carry on, and the scan would end as if never stopped.
So the handlers also set a flag, and the scan checks it before each step
(`raise_if_stopped`). The SIGTERM flag also tells Ctrl-C and SIGTERM apart when a library
(Ray's `get`) turns `Terminated` into a plain interrupt.
"""

from __future__ import annotations

import threading

__all__ = [
    "EXIT_TERMINATED",
    "Terminated",
    "clear_stop",
    "on_sigint",
    "on_sigterm",
    "raise_if_stopped",
    "was_terminated",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (what was completed is kept), exit 143."""


EXIT_TERMINATED = 143
_SIGTERM_RECEIVED = threading.Event()
_INTERRUPT_RECEIVED = threading.Event()


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: remember it and stop the command as Ctrl-C does."""
    _SIGTERM_RECEIVED.set()
    raise Terminated


def on_sigint(signum: int, frame: object) -> None:
    """SIGINT (Ctrl-C) handler: remember it and raise `KeyboardInterrupt`, as Python does."""
    _INTERRUPT_RECEIVED.set()
    raise KeyboardInterrupt


def clear_stop() -> None:
    """Forget an earlier stop (a new command starts in this process)."""
    _SIGTERM_RECEIVED.clear()
    _INTERRUPT_RECEIVED.clear()


def raise_if_stopped() -> None:
    """Raise the stop the user asked for, if the exception it raised was swallowed."""
    if _SIGTERM_RECEIVED.is_set():
        raise Terminated
    if _INTERRUPT_RECEIVED.is_set():
        raise KeyboardInterrupt


def was_terminated(stop: KeyboardInterrupt) -> bool:
    """Whether the interrupt `stop` came from SIGTERM rather than Ctrl-C."""
    return isinstance(stop, Terminated) or _SIGTERM_RECEIVED.is_set()
