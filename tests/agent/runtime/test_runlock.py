"""The run-folder lock: one writer at a time, a dead holder's lock taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.runtime.runlock import LOCK_NAME, lock_holder, run_folder_lock
from core.errors import FolderInUseError

_HOLD = textwrap.dedent(
    """
    import sys, time
    from agent.runtime.runlock import run_folder_lock
    with run_folder_lock(sys.argv[1], "test holder"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _start_holder(folder):
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    process.stdout.close()
    return process


def test_second_writer_is_told_the_pid(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError, match=f"in use by PID {holder.pid}"):  # noqa: SIM117
            with run_folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_killed_holder_is_taken_over(tmp_path):
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_holder(tmp_path)["pid"] == holder.pid  # the stale record is still there
    with run_folder_lock(tmp_path, "second"):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
        assert lock_holder(tmp_path)["purpose"] == "second"


def test_reentrant_in_one_process_and_released_after(tmp_path):
    with run_folder_lock(tmp_path), run_folder_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).is_file()
    start = time.perf_counter()
    holder = _start_holder(tmp_path)  # would block forever if the lock were still held
    holder.kill()
    holder.wait()
    assert time.perf_counter() - start < 30
