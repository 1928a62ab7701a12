"""Scan-wide p on background-only pseudo-experiments with shared events: old, new, each half.

Run: nice -n 10 .venv/bin/python bench/lee_calibration.py [--experiments 100] [--seed 11]

The pseudo-experiments of tests/core/test_lee_calibration.py (numpy draws of a density
written there, fitted by the real fit), each scanned four ways: fixed-background toys or
refitted toys (`core.pseudodata`), spectra independent or joined by the Gaussian copula of
their bootstrap correlation. Writes bench/results/lee_calibration.json: per way the median
p, the KS p-value against uniform and P(p < 0.05), P(p < 0.1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from core.lookelsewhere import bootstrap_correlation, spectra_from_points
from tests.core.test_lee_calibration import _experiment, _mass_sampler, _scan_p

RESULTS = Path(__file__).resolve().parent / "results" / "lee_calibration.json"


def main() -> int:
    """Scan every pseudo-experiment four ways and write the uniformity figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    arguments = parser.parse_args()
    rng = np.random.default_rng(arguments.seed)
    sampler = _mass_sampler()
    ways = ("fixed_independent", "fixed_copula", "refitted_independent", "refitted_copula")
    p_values: dict[str, list[float]] = {way: [] for way in ways}
    start = time.perf_counter()
    for index in range(arguments.experiments):
        experiment = _experiment(rng, sampler)
        for kind in ("fixed", "refitted"):
            spectra = spectra_from_points(experiment[kind])
            correlation = bootstrap_correlation(spectra, experiment["replicas"])
            p_values[f"{kind}_independent"].append(_scan_p(spectra, None, index))
            p_values[f"{kind}_copula"].append(_scan_p(spectra, correlation, index))
    result = {
        "command": "nice -n 10 .venv/bin/python bench/lee_calibration.py "
        f"--experiments {arguments.experiments} --seed {arguments.seed}",
        "seconds": round(time.perf_counter() - start, 1),
        "ways": {
            way: {
                "median_p": round(float(np.median(p)), 3),
                "ks_p_uniform": float(f"{stats.kstest(p, 'uniform').pvalue:.3g}"),
                "fraction_below_0.05": float(np.mean(np.array(p) < 0.05)),
                "fraction_below_0.1": float(np.mean(np.array(p) < 0.1)),
            }
            for way, p in p_values.items()
        },
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
