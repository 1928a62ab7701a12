"""Benchmark the symbolic-regression fallback against an analytic p5 fit on one spectrum.

Run: .venv/bin/python bench/bench_symbolic.py   (writes bench/results/symbolic.json)
The spectrum is the 178-bin resolution binning (PHYSICS.md) of a two-shape law that no
power law describes (2e6 events from 250 GeV, fit from 300 GeV). The baseline is the p5
fit of the same prepared spectrum in the same process (median of repeats); the fallback is
core.symbolic.symbolic_fallback with its defaults (3 seeded pyoperon searches, every
Pareto member refitted by core.fit), timed once per data seed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from core.background import FallbackFit
from core.fit import fit_spectrum, prepare_spectrum
from core.masses import mass_bin_edges
from core.symbolic import FALLBACK_SEARCH, symbolic_fallback

RESULTS = Path(__file__).resolve().parent / "results" / "symbolic.json"
SQRT_S = 13000.0
N_EVENTS = 2.0e6
DATA_SEEDS = (1, 2)
P5_REPEATS = 20


def two_shape_counts(edges: np.ndarray, seed: int) -> np.ndarray:
    """Poisson counts of (1-x)^10 x^-5 + 1e9 (1-x)^30 x^2 above 250 GeV, N_EVENTS in all."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    lower, upper = edges[:-1], np.minimum(edges[1:], SQRT_S)
    x = ((lower + upper)[:, None] / 2 + (upper - lower)[:, None] / 2 * nodes) / SQRT_S
    density = (1 - x) ** 10 * x**-5 + 1e9 * (1 - x) ** 30 * x**2
    expected = np.sum(density * weights, axis=1) * (upper - lower) / 2
    expected[lower < 250.0] = 0.0
    expected *= N_EVENTS / expected.sum()
    return np.random.default_rng(seed).poisson(expected).astype(float)


def main() -> None:
    edges = mass_bin_edges()
    fallback = symbolic_fallback(replace(FALLBACK_SEARCH, backend="pyoperon"))
    rows = []
    for data_seed in DATA_SEEDS:
        problem = prepare_spectrum(edges, two_shape_counts(edges, data_seed), (300.0, None))
        p5_times = []
        for _ in range(P5_REPEATS):
            started = time.perf_counter()
            p5 = fit_spectrum(problem, "p5")
            p5_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        outcome = fallback(problem, 0)
        symbolic_s = time.perf_counter() - started
        assert isinstance(outcome, FallbackFit)
        p5_s = statistics.median(p5_times)
        rows.append(
            {
                "data_seed": data_seed,
                "n_bins": int(problem.n_used),
                "p5_fit_s": p5_s,
                "p5_p_value": p5.p_value,
                "symbolic_fallback_s": symbolic_s,
                "ratio_symbolic_over_p5": symbolic_s / p5_s,
                "symbolic_expression": outcome.fit.function.expression,
                "symbolic_n_free": outcome.fit.n_free,
                "symbolic_p_value": outcome.fit.p_value,
                "search": outcome.notes[0],
            }
        )
        print(
            f"data seed {data_seed}: p5 {p5_s * 1e3:.1f} ms (p = {p5.p_value:.2g}), "
            f"symbolic fallback {symbolic_s:.1f} s (p = {outcome.fit.p_value:.3g}), "
            f"ratio {symbolic_s / p5_s:.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "symbolic fallback (3 pyoperon searches + core.fit refits) vs p5",
                "spectrum": "178 resolution bins, 2e6 two-shape events, fit from 300 GeV",
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "runs": rows,
                "median_ratio": statistics.median(row["ratio_symbolic_over_p5"] for row in rows),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
