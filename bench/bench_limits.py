"""Limits benchmark: the vectorised CLs of core.limits at full scan size, and pyhf.

Run: nice -n 10 .venv/bin/python bench/bench_limits.py [--workers 2] [--pyhf-limits 24]

Size: 63 spectra x 21 AR points (log-uniform 0.001..100 pb at L = 140 fb^-1) x 4 widths
(resolution, 5, 10, 15 %) x 30 masses per fit range, as `set_limits` does it for a run.
The accepted backgrounds are synthetic (documented here, not a scan's): per spectrum a p4
truth (shape varied per pair) over the PHYSICS.md binning from the stream's fit start to
0.65 sqrt(s), N = min(sigma L, 2e6 x stream share) events; data Poisson(b); the background
uncertainty per bin sigma_i = b_i r_i sqrt(N_ref / N), r_i the relative band
(`core.fit.expected_errors`) of a real p4 fit to a reference spectrum of N_ref = 1e5
events of the same shape (the fit uncertainty scales as 1 / sqrt(N)).

Timed in one run: (1) `core.limits.spectrum_limits` on everything in one process (default
method: exact CLs of the count below 5 background events, asymptotic above; also timed with
the asymptotic formulae everywhere), (2) the
same split over `--workers` processes (spectra in contiguous halves), (3) the pyhf path
(`method="pyhf"`: the same asymptotic model, pyhf's toms748 upper-limit scan per limit,
against `method="asymptotic"`) on
`--pyhf-limits` limits drawn at random from the full set; the pyhf time for the whole set
is its mean per limit times the number of limits, and the speed-up is that over (1) and
(2). The agreement of both paths on the pyhf subset is recorded. Writes
bench/results/limits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from core.anomaly import log_uniform_xsec_grid
from core.fit import expected_errors, fit_background, prepare_spectrum
from core.fitfunctions import bin_integrals, get_function
from core.limits import (
    DEFAULT_WIDTHS,
    LimitInputs,
    LimitMethod,
    SpectrumBackground,
    cls_upper_limits,
    limit_masses,
    signal_windows,
    spectrum_limits,
)
from core.masses import PAIRS, STREAM_FIT_FROM_GEV, STREAMS, mass_bin_edges

RESULTS = Path(__file__).resolve().parent / "results" / "limits.json"
LUMI_PB = 140_000.0
N_REF = 1e5
UPPER_GEV = 0.65 * 13000.0


def _shape(pair_index: int) -> list[float]:
    """p4 shape parameters (all but ln p1), varied a little per pair."""
    return [10.0 + 0.5 * (pair_index % 3), -4.0 - 0.1 * pair_index, -0.3 + 0.02 * pair_index]


def _range(stream: str) -> tuple[np.ndarray, int, int]:
    edges = mass_bin_edges()
    problem = prepare_spectrum(
        edges, np.ones(edges.size - 1), (STREAM_FIT_FROM_GEV[stream], UPPER_GEV)
    )
    return edges, problem.first_bin, problem.stop_bin


def _truth(stream: str, pair_index: int, n_events: float) -> tuple[np.ndarray, np.ndarray]:
    edges, first, stop = _range(stream)
    params = np.array([0.0, *_shape(pair_index)])
    mu = bin_integrals(get_function("p4"), params, edges)[first:stop]
    return edges[first : stop + 1], np.asarray(mu * n_events / mu.sum(), dtype=float)


def synthetic_backgrounds(seed: int = 1) -> list[SpectrumBackground]:
    """63 spectra x 21 AR points of synthetic accepted backgrounds (module docstring)."""
    rng = np.random.default_rng(seed)
    points = log_uniform_xsec_grid(4, 0.001, 100.0)
    assert len(points) == 21, points
    spectra = []
    for s_index, stream in enumerate(STREAMS):
        for p_index, pair in enumerate(PAIRS):
            edges, reference = _truth(stream, p_index, N_REF)
            fit = fit_background(edges, reference, "p4", (edges[0], edges[-1]))
            relative = expected_errors(fit, edges) / reference
            share = 1.0 / (1 + s_index + p_index)
            for point in points:
                n_events = min(point * LUMI_PB, 2e6 * share)
                _, b = _truth(stream, p_index, n_events)
                sigma = b * relative * np.sqrt(N_REF / n_events)
                counts = rng.poisson(b).astype(float)
                spectra.append(
                    SpectrumBackground(f"{stream}/{pair}", float(point), edges, counts, b, sigma)
                )
    return spectra


def _limits_of(
    spectra: list[SpectrumBackground], method: LimitMethod = "auto"
) -> tuple[int, float, int]:
    """Number of limits, seconds, and how many were solved as exact counts."""
    start = time.perf_counter()
    curves, _ = spectrum_limits(spectra, LUMI_PB, widths=DEFAULT_WIDTHS, n_masses=30, method=method)
    counting = sum(int(c.counting.sum()) for c in curves)
    return sum(c.masses.size for c in curves), time.perf_counter() - start, counting


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pyhf-limits", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()

    start = time.perf_counter()
    spectra = synthetic_backgrounds(arguments.seed)
    build_seconds = time.perf_counter() - start
    n_limits, serial_seconds, n_counting = _limits_of(spectra)
    print(
        f"{len(spectra)} spectra, {n_limits} limits ({n_counting} exact counts): one process "
        f"{serial_seconds:.1f} s"
    )
    _, asymptotic_seconds, _ = _limits_of(spectra, "asymptotic")
    print(f"asymptotic everywhere, one process: {asymptotic_seconds:.1f} s")

    halves = np.array_split(np.arange(len(spectra)), arguments.workers)
    start = time.perf_counter()
    with ProcessPoolExecutor(arguments.workers) as pool:
        parts = list(pool.map(_limits_of, [[spectra[i] for i in h] for h in halves]))
    parallel_seconds = time.perf_counter() - start
    assert sum(p[0] for p in parts) == n_limits
    assert sum(p[2] for p in parts) == n_counting
    print(f"{arguments.workers} processes: {parallel_seconds:.1f} s")

    # the pyhf baseline on a random subset of the same limits
    rng = np.random.default_rng(arguments.seed + 7)
    rows = []
    for index in rng.choice(len(spectra), size=arguments.pyhf_limits, replace=False):
        item = spectra[int(index)]
        masses = limit_masses(float(item.edges[0]), float(item.edges[-1]), 30)
        width = float(rng.choice(DEFAULT_WIDTHS))
        packed, _ = signal_windows(
            item.edges, item.counts, item.background, item.background_error, masses, [width]
        )
        row = int(rng.integers(packed.inputs.size))
        rows.append(packed.inputs.take(np.array([row])))
    subset = LimitInputs(
        *(
            np.concatenate(
                [
                    np.pad(
                        getattr(r, name),
                        ((0, 0), (0, max(x.counts.shape[1] for x in rows) - r.counts.shape[1])),
                        constant_values=1.0 if name == "background" else 0.0,
                    )
                    for r in rows
                ]
            )
            for name in ("counts", "background", "delta", "signal")
        )
    )
    start = time.perf_counter()
    vectorised = cls_upper_limits(subset, method="asymptotic")  # what pyhf computes
    subset_vectorised_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = cls_upper_limits(subset, method="pyhf")
    pyhf_seconds = time.perf_counter() - start
    per_limit = pyhf_seconds / subset.size
    pyhf_full = per_limit * n_limits
    relative = np.abs(
        np.column_stack([vectorised.observed, vectorised.expected])
        / np.column_stack([reference.observed, reference.expected])
        - 1.0
    )
    print(
        f"pyhf: {per_limit:.2f} s per limit -> {pyhf_full / 3600:.1f} h for all; "
        f"speed-up {pyhf_full / serial_seconds:.0f}x (one process), "
        f"{pyhf_full / parallel_seconds:.0f}x ({arguments.workers} processes); "
        f"max relative difference {relative.max():.2e}"
    )
    results: dict[str, Any] = {
        "command": "nice -n 10 .venv/bin/python bench/bench_limits.py "
        f"--workers {arguments.workers} --pyhf-limits {arguments.pyhf_limits}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "size": {
            "spectra": 63,
            "points": 21,
            "widths": list(DEFAULT_WIDTHS),
            "masses_per_range": 30,
            "spectrum_points": len(spectra),
            "limits": n_limits,
            "left_out_window_outside_range": len(spectra) * 4 * 30 - n_limits,
        },
        "backgrounds": "synthetic p4 truths with scaled real-fit bands (module docstring)",
        "build_seconds": build_seconds,
        "vectorised_one_process_seconds": serial_seconds,
        "exact_count_limits": n_counting,
        "asymptotic_everywhere_one_process_seconds": asymptotic_seconds,
        "vectorised_parallel_seconds": parallel_seconds,
        "workers": arguments.workers,
        "pyhf_subset_limits": int(subset.size),
        "pyhf_seconds_per_limit": per_limit,
        "pyhf_full_estimate_seconds": pyhf_full,
        "vectorised_subset_seconds": subset_vectorised_seconds,
        "speedup_one_process": pyhf_full / serial_seconds,
        "speedup_parallel": pyhf_full / parallel_seconds,
        "subset_max_relative_difference": float(relative.max()),
        "subset_median_relative_difference": float(np.median(relative)),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
