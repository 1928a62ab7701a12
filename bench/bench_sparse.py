"""Cost of the sparse-tail rule (issue 23): the hunt and the scan-wide toys, before / after.

Run: PYTHONPATH=. .venv/bin/python bench/bench_sparse.py [--toys 10000] [--repeats 3]

One fitted spectrum (p4 over 0.3-6 TeV, 2e4 events, empty above ~4.4 TeV, 107 bins in
range) and one 3-point nested spectrum of it. Three settings, in the same process:
- "before": windows expecting < 1 event not scanned, no minimum count, Poisson tails
  (the old rule, `min_window_background=1, min_window_count=0`);
- "after, exact B": every window with B > 0, at least 5 events, Poisson tails;
- "after, folded": the same with the fit's uncertainty folded in (negative binomial tails).
Timed: `bump_hunt` with a fixed toy count (thresholds + toys), `toy_statistics` (tail tables)
and the scan-wide `spectrum_toy_maxima` with a floor (thresholds + compiled kernel) and
without (tables). Ratios are after / before. Writes bench/results/sparse.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.bumphunt import HuntOptions, bump_hunt, toy_statistics
from core.fit import fit_background
from core.lookelsewhere import NestedSpectrum, nested_spectrum, spectrum_toy_maxima
from core.spectrum import fit_uncertainty
from tests.spectra import EDGES, FIT_RANGE, expected_counts

RESULTS = Path(__file__).resolve().parent / "results" / "sparse.json"
SETTINGS = {
    "before": (HuntOptions(min_window_background=1.0, min_window_count=0), False),
    "after, exact B": (HuntOptions(), False),
    "after, folded": (HuntOptions(), True),
}


def best_of(repeats: int, call: Callable[[], object]) -> float:
    """Smallest wall time of `repeats` calls (s)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def scan_toys(spectrum: NestedSpectrum, n_toys: int, floor: float | None) -> None:
    """The scan-wide toy maxima of one spectrum (seeded)."""
    spectrum_toy_maxima(spectrum, n_toys, np.random.default_rng(4), floor=floor)


def main() -> None:
    """Time every setting and write the ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--toys", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = np.random.default_rng(1).poisson(expected_counts("p4", 2e4)).astype(float)
    fit = fit_background(EDGES, counts, "p4", FIT_RANGE)
    uncertainty = fit_uncertainty(fit, EDGES)
    assert uncertainty is not None
    jacobian, covariance = uncertainty
    first, stop = fit.first_bin, fit.stop_bin
    background, data, edges = fit.expected, counts[first:stop], EDGES[first : stop + 1]
    scales = np.array([1.0, 0.5, 0.25])
    timings: dict[str, dict[str, float]] = {}
    for label, (options, folded) in SETTINGS.items():
        folding = {"jacobian": jacobian, "covariance": covariance} if folded else {}
        windows = options.windows(background, **folding)

        def hunt(options: HuntOptions = options, folding: dict[str, Any] = folding) -> None:
            bump_hunt(
                data,
                background,
                edges,
                min_toys=args.toys,
                max_toys=args.toys,
                min_window_background=options.min_window_background,
                min_window_count=options.min_window_count,
                seed=2,
                **folding,
            )

        spectrum = nested_spectrum(
            "T1/jj",
            edges,
            scales * 10.0,
            scales[:, None] * data[None, :],
            scales[:, None] * background[None, :],
            hunt=options,
            uncertainties=[(jacobian, covariance)] * 3 if folded else None,
        )
        timings[label] = {
            "bump_hunt": best_of(args.repeats, hunt),
            "toy_statistics": best_of(
                args.repeats, functools.partial(toy_statistics, windows, args.toys, 3)
            ),
            "scan toys, floor 8": best_of(
                args.repeats,
                functools.partial(scan_toys, spectrum, args.toys, 8.0),
            ),
            "scan toys, no floor": best_of(
                args.repeats,
                functools.partial(scan_toys, spectrum, args.toys, None),
            ),
        }
    before = timings["before"]
    ratios = {
        label: {key: value / before[key] for key, value in entry.items()}
        for label, entry in timings.items()
    }
    result = {
        "toys": args.toys,
        "bins": int(background.size),
        "machine": platform.processor() or platform.machine(),
        "seconds": timings,
        "ratio_to_before": ratios,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for label, entry in ratios.items():
        cells = ", ".join(
            f"{key} {timings[label][key]:.3f} s (x{value:.2f})" for key, value in entry.items()
        )
        print(f"{label}: {cells}")


if __name__ == "__main__":
    main()
