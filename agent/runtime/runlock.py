"""One writer per run folder: an advisory lock held while a scan or an event pass writes it.

`run_folder_lock(folder)` takes an exclusive `flock` on ``folder/.anomscan.lock`` and writes
the holder's PID into it. A second process gets `FolderInUseError` ("in use by PID N")
at once instead of interleaving its files with the first one's. The kernel releases the
lock when its holder dies (even by SIGKILL), so a lock file left by a dead process is
simply taken over; nothing has to guess whether a PID is stale. Re-entrant within one
process (a scan that holds the lock may call the event pass on the same folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from core.errors import FolderInUseError, InvalidInputError

__all__ = ["LOCK_NAME", "lock_holder", "run_folder_lock"]

LOCK_NAME: Final = ".anomscan.lock"

_held: dict[Path, tuple[int, int]] = {}
"""Locks this process holds: folder -> (file descriptor, depth)."""
_guard = threading.Lock()


def lock_holder(folder: str | Path) -> dict[str, object] | None:
    """What the lock file of `folder` says about its last holder (PID, host, purpose), if any."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def run_folder_lock(folder: str | Path, purpose: str = "anomscan") -> Iterator[Path]:
    """Hold the write lock of `folder` (created if missing) for the duration of the block."""
    target = Path(folder).absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise InvalidInputError(
            f"run folder {target} can not be created: a file of that name is in the way; "
            "give another folder"
        ) from error
    except PermissionError as error:
        raise InvalidInputError(
            f"run folder {target} can not be created: permission denied; give another folder"
        ) from error
    with _guard:
        if target in _held:
            descriptor, depth = _held[target]
            _held[target] = (descriptor, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        descriptor = _acquire(target, purpose)
        with _guard:
            _held[target] = (descriptor, 1)
    try:
        yield target
    finally:
        with _guard:
            descriptor, depth = _held[target]
            if depth > 1:
                _held[target] = (descriptor, depth - 1)
            else:
                del _held[target]
                os.close(descriptor)


def _acquire(target: Path, purpose: str) -> int:
    path = target / LOCK_NAME
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise InvalidInputError(
            f"run folder {target} is not writable ({error.strerror}); give another folder"
        ) from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FolderInUseError(_in_use_message(target)) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": purpose,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    return descriptor


def _in_use_message(target: Path) -> str:
    holder = None
    for _ in range(20):  # the holder writes its PID right after taking the lock
        holder = lock_holder(target)
        if holder and holder.get("pid") != os.getpid():
            break
        time.sleep(0.01)
    if not holder:
        return (
            f"run folder {target} is in use by another process; wait for it to finish or "
            "choose another folder"
        )
    return (
        f"run folder {target} is in use by PID {holder.get('pid')} on {holder.get('host')} "
        f"({holder.get('purpose')} since {holder.get('since')}); wait for it to finish, stop "
        "it, or choose another folder"
    )
