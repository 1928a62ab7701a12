"""The scan's fan-out: processes and Ray return the serial results in order; a Ray worker
that dies is retried, and a batch that keeps killing its workers runs in the driver, logged."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from agent.runtime.executor import FanOut


def test_process_pool_returns_the_serial_results_in_order() -> None:
    items = list(range(17))
    with FanOut("process", workers=2) as fan_out:
        assert fan_out.map(math.factorial, items) == [math.factorial(i) for i in items]
        assert fan_out.used == {"process"}


def test_auto_keeps_small_jobs_serial() -> None:
    with FanOut("auto") as fan_out:
        assert fan_out.map(math.sqrt, [4.0, 9.0]) == [2.0, 3.0]
        assert fan_out.used == {"serial"}


@pytest.mark.slow
def test_a_dead_ray_worker_is_retried_then_its_batch_runs_serially(tmp_path: Path) -> None:
    events: list[str] = []
    pid = os.getpid()

    def _square_or_die(item: tuple[int, int, str]) -> int:
        """x^2, killing any worker process that is not the driver `pid` (first try only if a
        marker path is given); nested, so Ray pickles it by value."""
        pid, x, marker = item
        if os.getpid() != pid:
            if not marker:
                os._exit(1)
            flag = Path(marker)
            if not flag.exists():
                flag.touch()
                os._exit(1)
        return x * x

    with FanOut("ray", workers=2, on_event=events.append) as fan_out:
        once = [(pid, x, str(tmp_path / f"flag-{x}")) for x in range(4)]
        assert fan_out.map(_square_or_die, once) == [x * x for x in range(4)]
        assert events == [], "a worker that died once was not retried by Ray"
        always = [(pid, x, "") for x in range(4)]
        assert fan_out.map(_square_or_die, always) == [x * x for x in range(4)]
    assert events, "the serial rerun of a lost batch was not reported"
    assert all("ran it serially" in event for event in events)
    import ray

    assert not ray.is_initialized(), "the fan-out did not shut its Ray session down"
