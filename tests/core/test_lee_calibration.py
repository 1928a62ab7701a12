"""The scan-wide p is uniform on background-only pseudo-experiments whose spectra share events.

Each pseudo-experiment is an event list drawn here with numpy from a density written here
(not from `core.lookelsewhere`'s sampler): every event has two masses m1, m2, independent
draws from f(m) ~ (1 - x)^10 x^-4 (x = m / 13 TeV) over 1-3 TeV, and an anomaly score u.
Three spectra share events: A = m1, C = m2, B = m1 or m2 (a coin per event), so B holds half
of A's events and half of C's, and each spectrum is exactly f-distributed. Two AR points:
all events, and u > 0.7 (nested). Every spectrum at every point is fitted by the real fit
(`core.fit.fit_background`, p3, which contains f) and the scan-wide p is computed with the
refitted pseudo-scans and the Gaussian copula of Poisson-bootstrap replicas (the new method)
and with neither (the old one). Measured in docs/physics-notes.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import sparse, stats

from core.fit import background_jacobian, fit_background
from core.lookelsewhere import (
    NestedSpectrum,
    ScanPoint,
    bootstrap_correlation,
    scan_significance,
    spectra_from_points,
)

EDGES = np.linspace(1000.0, 3000.0, 21)
POINTS_PB = (1.0, 0.3)
"""AR points: all events (1 pb) and the 30 % with u > 0.7 (0.3 pb)."""
N_EVENTS = 20_000
N_REPLICAS = 200
N_EXPERIMENTS = 100


def _mass_sampler() -> tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF grid of f(m) ~ (1 - x)^10 x^-4 on [1, 3] TeV (trapezoid integral)."""
    grid = np.linspace(EDGES[0], EDGES[-1], 40_001)
    x = grid / 13000.0
    density = (1.0 - x) ** 10 * x**-4.0
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
    return cdf / cdf[-1], grid


def _experiment(rng: np.random.Generator, sampler: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Scan points (with and without fit jacobians) and bootstrap replicas of one experiment."""
    cdf, grid = sampler
    n = rng.poisson(N_EVENTS)
    m1 = np.interp(rng.random(n), cdf, grid)
    m2 = np.interp(rng.random(n), cdf, grid)
    coin = rng.random(n) < 0.5
    score = rng.random(n)
    masses = {"A": m1, "B": np.where(coin, m1, m2), "C": m2}
    selections = {POINTS_PB[0]: np.ones(n, dtype=bool), POINTS_PB[1]: score > 0.7}
    weights = rng.poisson(1.0, size=(N_REPLICAS, n)).astype(np.float64)
    refitted, fixed, replicas = [], [], []
    for name, mass in masses.items():
        bins = np.clip(np.digitize(mass, EDGES) - 1, 0, EDGES.size - 2)
        per_point = []
        for sigma in POINTS_PB:  # loosest first, the order of the scan's spectra
            selected = np.flatnonzero(selections[sigma])
            onehot = sparse.csr_array(
                (np.ones(selected.size), (selected, bins[selected])), shape=(n, EDGES.size - 1)
            )
            counts = np.bincount(bins[selected], minlength=EDGES.size - 1).astype(np.float64)
            fit = fit_background(EDGES, counts, "p3", (EDGES[0], EDGES[-1]))
            common = (name, sigma, 0, EDGES, counts, fit.expected)
            refitted.append(
                ScanPoint(
                    *common,
                    jacobian=background_jacobian(fit, EDGES),
                    covariance=fit.covariance,
                    fitted=np.asarray(fit.used, dtype=bool),
                )
            )
            fixed.append(ScanPoint(*common))
            per_point.append(weights @ onehot)
        replicas.append(np.stack(per_point, axis=1))
    return {"refitted": refitted, "fixed": fixed, "replicas": replicas}


def _scan_p(spectra: list[NestedSpectrum], correlation: np.ndarray | None, seed: int) -> float:
    """The scan-wide p with 300 pseudo-scans per spectrum (more where p < 0.01)."""
    result = scan_significance(
        spectra, min_pseudo_scans=300, max_pseudo_scans=300, seed=seed, correlation=correlation
    )
    return result.global_p


def _scan_p_values(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scan-wide p of N_EXPERIMENTS background-only experiments: (new method, old method)."""
    rng = np.random.default_rng(seed)
    sampler = _mass_sampler()
    new, old = [], []
    for index in range(N_EXPERIMENTS):
        experiment = _experiment(rng, sampler)
        spectra = spectra_from_points(experiment["refitted"])
        correlation = bootstrap_correlation(spectra, experiment["replicas"])
        new.append(_scan_p(spectra, correlation, index))
        old.append(_scan_p(spectra_from_points(experiment["fixed"]), None, index))
    return np.array(new), np.array(old)


@pytest.mark.slow
def test_scan_wide_p_is_uniform_with_refit_and_copula_and_not_without() -> None:
    """New method: KS p > 0.01 and P(p < 0.05) within 2.5 binomial sigma of 5 %; old: not."""
    new, old = _scan_p_values(seed=7)
    tolerance = 2.5 * np.sqrt(0.05 * 0.95 / N_EXPERIMENTS)
    assert stats.kstest(new, "uniform").pvalue > 0.01
    assert abs(np.mean(new < 0.05) - 0.05) < tolerance
    assert stats.kstest(old, "uniform").pvalue < 0.01
    assert np.median(old) > 0.7
