"""False-upgrade rate of the nested test (F-test with its Wilks switch, and Wilks alone).

Background-only toys drawn from p3 (tests/spectra.py shape, fit range from 300 GeV to the
fixed upper mass 0.65 sqrt_s, empty bins included) at 80, 1000 and 100 000 events; for each
toy `select_function` over (p3, p4) and the rate at which p4 is chosen over the true p3,
with its binomial error. Nominal: 5 %. Writes bench/results/validation_ftest.json.

    PYTHONPATH=$PWD .venv/bin/python bench/validate_ftest.py [n_toys]

`false_upgrade_rates(...)` is the function bench/validate_scan.py imports.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.background import TestMethod, nested_test, select_function
from core.fit import prepare_spectrum
from tests.spectra import EDGES, expected_counts

RESULTS = Path(__file__).parent / "results" / "validation_ftest.json"


def false_upgrade_rates(
    sizes: tuple[float, ...] = (80.0, 1000.0, 1.0e5),
    n_toys: int = 400,
    *,
    methods: tuple[TestMethod, ...] = ("ftest", "wilks"),
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Rate of choosing p4 on p3 toys, per size and method, with binomial errors.

    "ftest" is the default procedure (the F-test, switched to Wilks when more than 20 % of
    the bins expect < 5 events); "ftest_no_switch" the plain F-test for comparison.
    """
    results: dict[str, Any] = {"alpha": alpha, "n_toys": n_toys, "truth": "p3", "sizes": {}}
    for size in sizes:
        mu = expected_counts("p3", size)
        template = prepare_spectrum(EDGES, mu, (300.0, None))
        rng = np.random.default_rng([seed, int(size)])
        upgrades: dict[str, int] = dict.fromkeys((*methods, "ftest_no_switch"), 0)
        switched = 0
        used = 0
        start = time.perf_counter()
        for _ in range(n_toys):
            counts = rng.poisson(template.range_counts).astype(float)
            if counts.sum() < 10:
                continue
            toy = template.with_range_counts(counts)
            used += 1
            for method in methods:
                choice = select_function(toy, ("p3", "p4"), method=method, alpha=alpha)
                if choice.chosen == "p4":
                    upgrades[method] += 1
                if method == "ftest" and choice.tests and choice.tests[0].method == "wilks":
                    switched += 1
            choice = select_function(toy, ("p3", "p4"), method="ftest", alpha=alpha)
            if "p4" in choice.fits and "p3" in choice.fits:
                plain = nested_test(choice.fits["p3"], choice.fits["p4"], alpha=alpha)
                upgrades["ftest_no_switch"] += int(plain.significant)
        elapsed = time.perf_counter() - start
        row: dict[str, Any] = {"n_toys": used, "seconds": elapsed, "wilks_switch": switched / used}
        for name, count in upgrades.items():
            rate = count / used
            error = math.sqrt(alpha * (1 - alpha) / used)
            row[name] = {
                "rate": rate,
                "binomial_sigma_at_nominal": error,
                "pull_from_nominal": (rate - alpha) / error,
            }
        results["sizes"][f"{size:g}"] = row
    return results


def main() -> None:
    """Run the study and record it."""
    n_toys = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    results = false_upgrade_rates(n_toys=n_toys)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    for size, row in results["sizes"].items():
        cells = ", ".join(
            f"{name} {row[name]['rate']:.3f} ({row[name]['pull_from_nominal']:+.1f} sigma)"
            for name in ("ftest", "wilks", "ftest_no_switch")
        )
        print(f"{size:>8} events: {cells}; Wilks switch in {row['wilks_switch']:.0%}")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
