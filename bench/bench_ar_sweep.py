"""The AR sweep alone on a large synthetic event table: time and peak memory.

    nice -n 10 .venv/bin/python bench/bench_ar_sweep.py          (2M baseline, then 100M)
    BENCH_ROWS=20000000 nice -n 10 .venv/bin/python bench/bench_ar_sweep.py

The sweep is what the scan does between its event pass and its fits: the 63 spectra of
every point of the default cross-section grid (0.001 to 100 pb), the autoencoder's
training events (1 %) left out. The table is synthetic (random stream bits, pair masses
with gaps, float32-rounded scores so that ties occur, unique keys) at 1000 pb^-1 per
million rows, written as a partitioned table of 2M-row parts in a scratch folder.

Two sweeps, each in its own process so that its peak RSS (`ru_maxrss`) is its own:
- the baseline: the whole table read into memory and cut at every point
  (`core.anomaly.stream_regions` + `core.table.region_spectra`, the scan's path until
  issue 24), on the small table only;
- the bounded one: `core.regions` (one ranking pass, one pass for every point), on the
  small table (the ratio to the baseline, and equal spectra) and on the large one.
Goal (issue 24): the large table's sweep under 4 GB peak RSS. Results go to
bench/results/ar_sweep.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.anomaly import log_uniform_xsec_grid, requested_count, stream_regions
from core.autoencoder import training_selection
from core.masses import STREAMS, mass_bin_edges
from core.regions import points_spectra, rank_streams
from core.table import MASS_COLUMNS, commit_table_parts, event_table_schema, read_event_table
from core.table import region_spectra as in_memory_spectra

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results") / "ar_sweep.json"
BASELINE_ROWS = 2_000_000
LARGE_ROWS = int(os.environ.get("BENCH_ROWS", "100000000"))
PART_ROWS = 2_000_000
LUMI_PB_PER_ROW = 1000.0 / 1_000_000
POINTS_PER_DECADE = 5
TRAINING = (0.01, 7)
"""The autoencoder's training fraction and seed of the synthetic run."""
STREAM_FRACTIONS = (0.9, 0.15, 0.05, 0.1, 0.03, 0.2, 0.08)
PAIR_FRACTIONS = (0.9, 0.3, 0.1, 0.2, 0.1, 0.3, 0.1, 0.1, 0.05)


def _part(rng: np.random.Generator, first_row: int, n: int) -> pa.Table:
    """n synthetic rows; keys are a bijective hash of the row number, so unique."""
    rows = np.arange(first_row, first_row + n, dtype=np.uint64)
    keys = (rows * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)
    masses = rng.lognormal(np.log(300.0), 0.8, size=(n, len(MASS_COLUMNS)))
    masses[rng.random((n, len(MASS_COLUMNS))) > PAIR_FRACTIONS] = np.nan
    columns = {
        "event": rows.view(np.int64),
        "run": np.ones(n, dtype=np.int64),
        "weight": np.ones(n),
        "lumi_block": np.zeros(n, dtype=np.int64),
        "source_id": np.zeros(n, dtype=np.int64),
        "key": keys,
        **{s: rng.random(n) < f for s, f in zip(STREAMS, STREAM_FRACTIONS, strict=True)},
        **{name: masses[:, j] for j, name in enumerate(MASS_COLUMNS)},
        "score": rng.normal(-9.0, 1.0, size=n).astype(np.float32).astype(np.float64),
        "training": np.zeros(n, dtype=bool),
    }
    return pa.Table.from_pydict(columns, schema=event_table_schema(with_score=True))


def write_table(folder: Path, n_rows: int, seed: int) -> float:
    """A partitioned synthetic table of `n_rows` at `folder`; returns the seconds taken."""
    start = time.perf_counter()
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = []
    for first in range(0, n_rows, PART_ROWS):
        name = f"part-{len(names):05d}.parquet"
        part = _part(rng, first, min(PART_ROWS, n_rows - first))
        pq.write_table(part, folder / name, row_group_size=200_000)
        names.append(name)
    commit_table_parts(folder, names, {"scored": True})
    return time.perf_counter() - start


def _exclude(keys: np.ndarray) -> np.ndarray:
    return training_selection(keys, *TRAINING)


def _grid() -> list[float]:
    return [float(p) for p in log_uniform_xsec_grid(POINTS_PER_DECADE, 0.001, 100.0)]


def sweep(folder: Path, n_rows: int, how: str, output: Path) -> None:
    """One sweep (`how`: "bounded" or "in-memory") in this process; writes its figures."""
    lumi_pb = n_rows * LUMI_PB_PER_ROW
    points = _grid()
    start = time.perf_counter()
    if how == "bounded":
        ranking = rank_streams(folder, requested_count(max(points), lumi_pb), _exclude)
        ranked = time.perf_counter()
        regions = [ranking.regions(p, lumi_pb) for p in points]
        spectra = points_spectra(folder, ranking, regions, _exclude)
        stages = {"rank_s": ranked - start, "spectra_s": time.perf_counter() - ranked}
    else:
        table = read_event_table(folder)
        read = time.perf_counter()
        exclude = _exclude(table.keys())
        spectra = [
            in_memory_spectra(table, stream_regions(table, p, lumi_pb, exclude)[0])[1]
            for p in points
        ]
        stages = {"read_s": read - start, "spectra_s": time.perf_counter() - read}
    seconds = time.perf_counter() - start
    np.save(output.with_suffix(".npy"), np.stack(spectra))
    figures = {
        "how": how,
        "rows": n_rows,
        "points": len(points),
        "seconds": round(seconds, 1),
        **{k: round(v, 1) for k, v in stages.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "events_in_spectra_at_100pb": int(np.stack(spectra)[-1].sum()),
    }
    output.write_text(json.dumps(figures))


def _sweep_in_child(folder: Path, n_rows: int, how: str, scratch: Path) -> tuple[dict, np.ndarray]:
    output = scratch / f"{how}-{n_rows}.json"
    command = [sys.executable, __file__, "--sweep", str(folder), str(n_rows), how, str(output)]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(output.read_text()), np.load(output.with_suffix(".npy"))


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-ar-sweep-"))
    try:
        cases = []
        small = scratch / "small"
        write_table(small, BASELINE_ROWS, seed=1)
        baseline, expected = _sweep_in_child(small, BASELINE_ROWS, "in-memory", scratch)
        bounded, found = _sweep_in_child(small, BASELINE_ROWS, "bounded", scratch)
        if not np.array_equal(found, expected):
            raise SystemExit("the bounded sweep's spectra differ from the in-memory sweep's")
        cases += [baseline, bounded]
        print(json.dumps(cases[-2:]), flush=True)
        shutil.rmtree(small)
        large = scratch / "large"
        generate_s = write_table(large, LARGE_ROWS, seed=2)
        figures, _ = _sweep_in_child(large, LARGE_ROWS, "bounded", scratch)
        figures["generate_s"] = round(generate_s, 1)
        figures["table_gb_on_disk"] = round(sum(p.stat().st_size for p in large.iterdir()) / 1e9, 2)
        cases.append(figures)
        print(json.dumps(figures), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "ar_sweep",
        "command": "nice -n 10 .venv/bin/python bench/bench_ar_sweep.py",
        "cpus": os.cpu_count(),
        "grid": f"{POINTS_PER_DECADE} points per decade, 0.001 to 100 pb",
        "lumi": "1000 pb^-1 per million rows",
        "bins": int(mass_bin_edges().size - 1),
        "cases": cases,
        "speedup_bounded_vs_in_memory": round(cases[0]["seconds"] / cases[1]["seconds"], 2),
        "memory_ratio_in_memory_vs_bounded": round(
            cases[0]["peak_rss_mb"] / cases[1]["peak_rss_mb"], 2
        ),
        "goal": "AR sweep on 100M rows under 4 GB peak RSS (issue 24)",
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sweep":
        sweep(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        main()
