"""A Ctrl-C or SIGTERM whose exception a library swallowed still stops the scan.

pydantic-core, building a validator when the signal arrived, printed "Exception ignored"
for the KeyboardInterrupt and the scan ran to the end with exit 0 (seen once in CI).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest

from agent.scan import ScanConfig, run_scan
from agent.stop import (
    Terminated,
    clear_stop,
    on_sigint,
    on_sigterm,
    raise_if_stopped,
    was_terminated,
)
from tests.agent.conftest import LUMI_PB, Sample


def _swallowed(handler: object) -> None:
    """The handler ran, and the code it interrupted ignored the exception."""
    with contextlib.suppress(KeyboardInterrupt):
        handler(signal.SIGINT, None)  # type: ignore[operator]


def test_the_flag_raises_the_stop_that_was_asked_for() -> None:
    clear_stop()
    raise_if_stopped()  # nothing asked: nothing raised
    _swallowed(on_sigint)
    with pytest.raises(KeyboardInterrupt) as stop:
        raise_if_stopped()
    assert not was_terminated(stop.value)
    _swallowed(on_sigterm)
    with pytest.raises(Terminated):
        raise_if_stopped()
    clear_stop()
    raise_if_stopped()


def test_a_swallowed_ctrl_c_stops_the_scan_before_its_next_step(
    signal_sample: Sample, tmp_path: Path
) -> None:
    config = ScanConfig(
        data=list(signal_sample.files),
        lumi_pb=LUMI_PB,
        run_dir=str(tmp_path / "run"),
        model=str(signal_sample.model),
        xsec_range=(0.3, 3.0),
        points_per_decade=1,
        max_points=2,
        executor="serial",
    )
    _swallowed(on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_scan(config, show_progress=False)
    finally:
        clear_stop()
    assert not (tmp_path / "run" / "results.json").exists()
