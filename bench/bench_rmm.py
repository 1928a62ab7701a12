"""RMM throughput on one core against the per-event reference, and the end-to-end event pass.

1. `rmm_matrices` events/s on synthetic events (chunks of 50k, best of 5, alternating with
   the reference) against the straightforward per-event Python reference
   `rmm_matrix_reference` measured in the same run. Goals (issue 4): >= 300k events/s per
   core and >= 50x the reference. Also recorded: the share of the reference's time that is
   only its 36x36 list and numpy conversion, and the ratio without it; and both rates on
   busy events (>= 6 objects).
2. End to end on a >= 1M-event synthetic file: read + select + RMM (+ features) + masses +
   event-table write, with the time of each stage.

Run: .venv/bin/python bench/bench_rmm.py  (writes bench/results/rmm.json)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import awkward as ak
import numpy as np

from core.events import concatenate_chunks, iterate_events, load_events
from core.masses import leading_pair_masses, stream_bits
from core.objects import OBJECT_TYPES, EventChunk
from core.rmm import (
    ReferenceEvent,
    reference_events,
    rmm_features,
    rmm_matrices,
    rmm_matrix_reference,
)
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import write_event_table

RESULTS = Path(__file__).with_name("results") / "rmm.json"
N_END_TO_END = 1_000_000
STEP = 100_000
RMM_CHUNK = 50_000
N_REFERENCE = 2_000
SIGNALS = (SignalSpec("jm", 2000.0, 40.0, n_events=1000),)


def best_of(repeats: int, function: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_rates(
    chunk: EventChunk, events: list[ReferenceEvent]
) -> tuple[float, float, float]:
    """Best-of-5 events/s of rmm_matrices, of the reference and of the reference's container.

    The three are measured alternately so that load from other processes hits them alike;
    the container is the reference's 36x36 list of floats and its conversion to numpy.
    """
    rmm_matrices(chunk)  # warm up: first-touch page faults of the output
    vectorised, reference, container = [], [], []
    for _ in range(5):
        vectorised.append(best_of(1, lambda: rmm_matrices(chunk)))
        reference.append(best_of(1, lambda: [rmm_matrix_reference(e) for e in events]))
        container.append(
            best_of(1, lambda: [np.array([[0.0] * 36 for _ in range(36)]) for _ in events])
        )
    return (
        len(chunk) / min(vectorised),
        len(events) / min(reference),
        len(events) / min(container),
    )


def n_objects(chunk: EventChunk) -> np.ndarray:
    return sum(np.asarray(ak.num(chunk.collection(name))) for name in OBJECT_TYPES)


def subset(chunk: EventChunk, mask: np.ndarray) -> EventChunk:
    columns = {name: chunk.collection(name)[mask] for name in OBJECT_TYPES}
    arrays = {name: getattr(chunk, name)[mask] for name in ("met_pt", "met_phi", "run", "event")}
    return replace(chunk, **columns, **arrays, weight=chunk.weight[mask])


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        info = generate_sample(folder, SampleConfig(n_events=N_END_TO_END, seed=7, signals=SIGNALS))
        generate_s = time.perf_counter() - start
        n_total = N_END_TO_END + sum(info.n_signal)

        # 1. RMM alone on one chunk, against the reference
        chunk = load_events(info.files, max_events=RMM_CHUNK)
        small = load_events(info.files, max_events=N_REFERENCE)
        events = reference_events(small)
        agreement = float(
            np.abs(rmm_matrices(small) - np.array([rmm_matrix_reference(e) for e in events])).max()
        )
        rmm_rate, reference_rate, container_rate = interleaved_rates(chunk, events)
        container_fraction = reference_rate / container_rate
        physics_only_rate = reference_rate / max(1.0 - container_fraction, 1e-9)
        features_s = best_of(5, lambda: rmm_features(rmm_matrices(chunk))) - RMM_CHUNK / rmm_rate

        # the same on busy events only (>= 6 objects, ttbar-like), where pairs dominate
        busy = subset(chunk, n_objects(chunk) >= 6)
        busy_events = reference_events(subset(busy, np.arange(len(busy)) < N_REFERENCE))
        busy = concatenate_chunks([busy] * max(1, RMM_CHUNK // len(busy)))
        busy_rate, busy_reference_rate, _ = interleaved_rates(busy, busy_events)

        # 2. end to end: read + select + RMM + features + masses + table write
        def read_only() -> int:
            return sum(len(c) for c in iterate_events(info.files, step_size=STEP))

        read_s = best_of(1, read_only)

        def with_rmm() -> Iterator[EventChunk]:
            for c in iterate_events(info.files, step_size=STEP):
                rmm_features(rmm_matrices(c))
                yield c

        table = Path(folder) / "events.parquet"
        start = time.perf_counter()
        summary = write_event_table(with_rmm(), table)
        end_to_end_s = time.perf_counter() - start
        assert summary.n_events == n_total
        masses_s = best_of(1, lambda: (leading_pair_masses(chunk), stream_bits(chunk)))

        result = {
            "rmm_chunk_events": RMM_CHUNK,
            "objects_per_event": round(float(n_objects(chunk).mean()), 2),
            "rmm_events_per_s_one_core": round(rmm_rate),
            "features_s_per_chunk": round(features_s, 4),
            "reference_events_per_s": round(reference_rate),
            "ratio_vectorised_to_reference": round(rmm_rate / reference_rate, 1),
            "max_abs_difference_to_reference": agreement,
            "reference_container_fraction": round(container_fraction, 2),
            "ratio_vectorised_to_reference_physics_only": round(rmm_rate / physics_only_rate, 1),
            "busy_events_6_or_more_objects_replicated": len(busy),
            "busy_objects_per_event": round(float(n_objects(busy).mean()), 2),
            "busy_rmm_events_per_s_one_core": round(busy_rate),
            "busy_reference_events_per_s": round(busy_reference_rate),
            "busy_ratio_vectorised_to_reference": round(busy_rate / busy_reference_rate, 1),
            "goal_rmm_events_per_s": 300_000,
            "goal_ratio": 50,
            "end_to_end_events": n_total,
            "generate_s": round(generate_s, 2),
            "read_select_s": round(read_s, 2),
            "masses_streams_events_per_s": round(RMM_CHUNK / masses_s),
            "end_to_end_s": round(end_to_end_s, 2),
            "end_to_end_events_per_s": round(n_total / end_to_end_s),
            "table_mb": round(table.stat().st_size / 1e6, 1),
            "step_size": STEP,
        }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
