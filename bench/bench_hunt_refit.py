"""Cost of the refitted toys of the per-spectrum global p (core.bumphunt, core.pseudodata).

Run: .venv/bin/python bench/bench_hunt_refit.py [--toys 10000] [--spectra 5] [--repeats 3]

A typical spectrum: 60 bins of 50 GeV (1-4 TeV), 1e4 background-only events from a falling
density (exact bin integrals), fitted by p4 (`core.fit.fit_background`), the fit uncertainty
folded in. Each spectrum is hunted with exactly `--toys` toys (min_toys = max_toys) against
the fixed background (before: integer thresholds per window) and with each toy refitted to
first order (after: `refitted_window_maxima` screened at t_obs), in the same process;
best of `--repeats`. Prints the ratio after / before and writes
bench/results/hunt_refit.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.bumphunt import bump_hunt
from core.fit import fit_background
from core.spectrum import fit_uncertainty
from tests.spectra import FIFTY_GEV_EDGES as EDGES
from tests.spectra import dijet_truth

RESULTS = Path(__file__).resolve().parent / "results" / "hunt_refit.json"


def _best_time(call: Any, repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    """Time fixed and refitted toys on `--spectra` pseudo-data spectra; write the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--toys", type=int, default=10_000)
    parser.add_argument("--spectra", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    truth = dijet_truth(10_000.0)
    rng = np.random.default_rng(0)
    cases = []
    for index in range(args.spectra):
        counts = rng.poisson(truth).astype(np.float64)
        fit = fit_background(EDGES, counts, "p4", (EDGES[0], EDGES[-1]), seed=index)
        uncertainty = fit_uncertainty(fit, EDGES)
        if uncertainty is None:
            continue
        jacobian, covariance = uncertainty
        common: dict[str, Any] = {
            "min_toys": args.toys,
            "max_toys": args.toys,
            "jacobian": jacobian,
            "covariance": covariance,
            "seed": index,
        }
        before, old = _best_time(
            lambda c=counts, f=fit, k=common: bump_hunt(c, f.expected, EDGES, **k),
            args.repeats,
        )
        after, new = _best_time(
            lambda c=counts, f=fit, k=common: bump_hunt(c, f.expected, EDGES, fitted=f.used, **k),
            args.repeats,
        )
        case = {
            "spectrum": index,
            "statistic": old.statistic,
            "n_windows": old.n_windows,
            "n_toys_before": old.n_toys,
            "n_toys_after": new.n_toys,
            "global_p_before": old.global_p,
            "global_p_after": new.global_p,
            "method_after": new.global_p_method,
            "seconds_before": before,
            "seconds_after": after,
            "ratio_after_over_before": after / before,
        }
        cases.append(case)
        print(
            f"spectrum {index}: t_obs {old.statistic:.2f}, toys {old.n_toys}/{new.n_toys}, "
            f"p fixed {old.global_p:.4f} refitted {new.global_p:.4f}, "
            f"{before:.3f} s -> {after:.3f} s (x{after / before:.1f})"
        )
    ratios = [c["ratio_after_over_before"] for c in cases]
    summary = {
        "benchmark": "per-spectrum global p: fixed toys vs refitted toys (floor = t_obs)",
        "command": "PYTHONPATH=. .venv/bin/python bench/bench_hunt_refit.py "
        f"--toys {args.toys} --spectra {args.spectra} --repeats {args.repeats}",
        "bins": int(EDGES.size - 1),
        "events": 10_000,
        "function": "p4",
        "toys": args.toys,
        "machine": platform.platform(),
        "median_seconds_before": float(np.median([c["seconds_before"] for c in cases])),
        "median_seconds_after": float(np.median([c["seconds_after"] for c in cases])),
        "median_ratio": float(np.median(ratios)),
        "cases": cases,
    }
    print(
        f"median {summary['median_seconds_before']:.3f} s -> "
        f"{summary['median_seconds_after']:.3f} s (x{summary['median_ratio']:.1f})"
    )
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
