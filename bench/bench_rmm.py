"""RMM throughput on one core against the per-event reference, and the end-to-end event pass.

1. `rmm_matrices` events/s on synthetic events (chunks of 50k, best of 5) with each backend
   (numba per-event loop, numpy whole-chunk operations), alternating with the
   straightforward per-event Python reference `rmm_matrix_reference` (math module, one
   np.zeros((36, 36)) per event) measured in the same run. Goals (issue 4): >= 300k
   events/s per core and >= 50x the reference. Also recorded: the share of the reference's
   time that is only its np.zeros((36, 36)); the time per chunk of the input checks and of
   the output allocation (zeros + first touch), which bound the rate from above; and all
   rates on busy events (>= 6 objects).
2. numba's one-off costs in fresh processes: import, first call compiling (empty cache) and
   first call loading the on-disk cache.
3. End to end on a >= 1M-event synthetic file: read + select + RMM (+ features) + masses +
   event-table write, with the time of each stage (default backend).

Run on one core: taskset -c 0 .venv/bin/python bench/bench_rmm.py  (writes
bench/results/rmm.json)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    DEFAULT_LAYOUT,
    ReferenceEvent,
    RMMBackend,
    check_kinematics,
    numba_available,
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
    chunk: EventChunk, events: list[ReferenceEvent], backends: tuple[RMMBackend, ...]
) -> dict[str, float]:
    """Best-of-5 events/s of rmm_matrices per backend, of the reference and of its container.

    All are measured alternately so that load from other processes hits them alike; the
    container is the reference's np.zeros((36, 36)) per event.
    """
    size = DEFAULT_LAYOUT.size
    for backend in backends:
        rmm_matrices(chunk, backend=backend)  # warm up: compile or load numba, first touch
    calls: dict[str, tuple[int, Callable[[], object]]] = {
        **{
            backend: (len(chunk), lambda backend=backend: rmm_matrices(chunk, backend=backend))
            for backend in backends
        },
        "reference": (len(events), lambda: [rmm_matrix_reference(e) for e in events]),
        "container": (len(events), lambda: [np.zeros((size, size)) for _ in events]),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(5):
        for name, (_, call) in calls.items():
            times[name].append(best_of(1, call))
    return {name: calls[name][0] / min(values) for name, values in times.items()}


def allocate_output(n: int) -> np.ndarray:
    """The zeroed float32 (n, 36, 36) output with one cell per event written, as rmm_matrices."""
    matrices = np.zeros((n, DEFAULT_LAYOUT.size, DEFAULT_LAYOUT.size), dtype=np.float32)
    matrices[:, 0, 0] = 1.0  # touches every page: 5184 bytes per event
    return matrices


FIRST_CALL = """
import json, time
start = time.perf_counter()
from core.rmm import numba_available, rmm_matrices
from core.objects import chunk_from_lists
imported = time.perf_counter()
assert numba_available()
numba_imported = time.perf_counter()
jets = [[(100.0, 0.1, 0.2, 5.0), (50.0, -1.0, 2.0, 4.0)]]
chunk = chunk_from_lists({"jets": jets}, [60.0], [1.0])
before = time.perf_counter()
rmm_matrices(chunk, backend="numba")
first = time.perf_counter()
rmm_matrices(chunk, backend="numba")
second = time.perf_counter()
print(json.dumps({"import_core_s": imported - start, "import_numba_s": numba_imported - imported,
                  "first_call_s": first - before, "second_call_s": second - first}))
"""


def numba_one_off_costs() -> dict[str, float]:
    """Seconds of numba's import and first calls in fresh processes, cache empty then filled."""
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = []
        for _ in range(2):  # the first compiles and fills the cache, the second loads it
            output = subprocess.run(
                [sys.executable, "-c", FIRST_CALL],
                env=environment,
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout
            runs.append(json.loads(output))
    return {
        "numba_import_s": round(runs[1]["import_numba_s"], 3),
        "numba_first_call_compiling_s": round(runs[0]["first_call_s"], 3),
        "numba_first_call_from_cache_s": round(runs[1]["first_call_s"], 3),
        "numba_second_call_s": round(runs[1]["second_call_s"], 5),
    }


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
        backends: tuple[RMMBackend, ...] = ("numba", "numpy") if numba_available() else ("numpy",)
        chunk = load_events(info.files, max_events=RMM_CHUNK)
        small = load_events(info.files, max_events=N_REFERENCE)
        events = reference_events(small)
        reference = np.array([rmm_matrix_reference(e) for e in events])
        agreement = {
            backend: float(np.abs(rmm_matrices(small, backend=backend) - reference).max())
            for backend in backends
        }
        rates = interleaved_rates(chunk, events, backends)
        check_s = best_of(5, lambda: check_kinematics(chunk))
        allocation_s = best_of(5, lambda: allocate_output(RMM_CHUNK))
        default = backends[0]
        features_s = (
            best_of(5, lambda: rmm_features(rmm_matrices(chunk))) - RMM_CHUNK / rates[default]
        )

        # the same on busy events only (>= 6 objects, ttbar-like), where pairs dominate
        busy = subset(chunk, n_objects(chunk) >= 6)
        busy_events = reference_events(subset(busy, np.arange(len(busy)) < N_REFERENCE))
        busy = concatenate_chunks([busy] * max(1, RMM_CHUNK // len(busy)))
        busy_rates = interleaved_rates(busy, busy_events, backends)
        one_off = numba_one_off_costs() if "numba" in backends else {}

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

        result: dict[str, object] = {
            "command": "taskset -c 0 .venv/bin/python bench/bench_rmm.py",
            "default_backend": default,
            "rmm_chunk_events": RMM_CHUNK,
            "objects_per_event": round(float(n_objects(chunk).mean()), 2),
            "rmm_events_per_s_one_core": round(rates[default]),
            **{f"rmm_{b}_events_per_s_one_core": round(rates[b]) for b in backends},
            "reference_events_per_s": round(rates["reference"]),
            "ratio_default_to_reference": round(rates[default] / rates["reference"], 1),
            **{
                f"ratio_{b}_to_reference": round(rates[b] / rates["reference"], 1) for b in backends
            },
            "ratio_numba_to_numpy": (
                round(rates["numba"] / rates["numpy"], 2) if "numba" in rates else None
            ),
            **{f"max_abs_difference_{b}_to_reference": agreement[b] for b in backends},
            "reference_container_fraction": round(rates["reference"] / rates["container"], 3),
            "check_kinematics_s_per_chunk": round(check_s, 4),
            "output_allocation_s_per_chunk": round(allocation_s, 4),
            "features_s_per_chunk": round(features_s, 4),
            "busy_events_6_or_more_objects_replicated": len(busy),
            "busy_objects_per_event": round(float(n_objects(busy).mean()), 2),
            **{f"busy_rmm_{b}_events_per_s_one_core": round(busy_rates[b]) for b in backends},
            "busy_reference_events_per_s": round(busy_rates["reference"]),
            **{
                f"busy_ratio_{b}_to_reference": round(busy_rates[b] / busy_rates["reference"], 1)
                for b in backends
            },
            **one_off,
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
