"""Synthetic generator throughput: events/s on one core, generation alone and with writing.

Baseline in the same run: the time to draw the same number of raw standard-normal numbers
as the sample holds floats (a lower bound of any generator), so the ratio is stable on a
noisy machine. Goal (issue 3): >= 200k events/s including the ROOT write.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import awkward as ak
import numpy as np

from core.synth import SampleConfig, SignalSpec, generate_events, generate_sample

RESULTS = Path(__file__).with_name("results") / "generate.json"
N_EVENTS = 1_000_000
SIGNALS = (
    SignalSpec("jm", 2000.0, 40.0, n_events=1000),
    SignalSpec("bg", 1200.0, 20.0, n_events=500),
)


def _best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    branches, _ = generate_events(10_000, tuple((s, s.n_events or 0) for s in SIGNALS), rng)
    n_block = 10_000 + sum(s.n_events or 0 for s in SIGNALS)
    floats_per_event = (
        sum(
            len(ak.fields(v)) * int(ak.sum(ak.num(v))) if isinstance(v, ak.Array) else len(v)
            for v in branches.values()
        )
        / n_block
    )
    baseline = _best_of(
        3, lambda: np.random.default_rng(1).standard_normal(int(N_EVENTS * floats_per_event))
    )
    draw_only = _best_of(
        2,
        lambda: generate_events(
            N_EVENTS, tuple((s, s.n_events or 0) for s in SIGNALS), np.random.default_rng(2)
        ),
    )
    with tempfile.TemporaryDirectory() as folder:
        with_write = _best_of(
            2,
            lambda: generate_sample(
                folder, SampleConfig(n_events=N_EVENTS, seed=3, signals=SIGNALS)
            ),
        )
        size = sum(p.stat().st_size for p in Path(folder).glob("*.root"))
    result = {
        "n_events": N_EVENTS,
        "floats_per_event": round(floats_per_event, 2),
        "baseline_normals_s": round(baseline, 3),
        "generate_s": round(draw_only, 3),
        "generate_and_write_s": round(with_write, 3),
        "events_per_s_generate": round(N_EVENTS / draw_only),
        "events_per_s_generate_and_write": round(N_EVENTS / with_write),
        "ratio_to_baseline": round(with_write / baseline, 2),
        "file_mb": round(size / 1e6, 1),
        "goal_events_per_s": 200_000,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
