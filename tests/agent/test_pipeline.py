"""The deterministic scan: an injected resonance is found at its mass, background stays quiet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.pipeline import analyse_spectrum, run_demo
from core.fitfunctions import bin_integrals, get_function
from core.masses import mass_bin_edges
from core.significance import expected_significance

EDGES = mass_bin_edges()
P4 = get_function("p4")
SHAPE = np.array([0.0, 10.0, -4.0, -0.3])  # ln p1, then the p4 shape
N_ABOVE_300_GEV = 50_000.0


def _background() -> np.ndarray:
    """A p4 spectrum with 50k expected events above 300 GeV (the T2 fit start)."""
    shape = bin_integrals(P4, SHAPE, EDGES)
    return shape * N_ABOVE_300_GEV / shape[EDGES[:-1] >= 300.0].sum()


def _gaussian(mass: float, sigma: float, n: float) -> np.ndarray:
    from scipy.stats import norm

    return n * np.diff(norm.cdf(EDGES, mass, sigma))


def test_injected_bump_is_found_at_its_mass_with_its_significance():
    rng = np.random.default_rng(3)
    background = _background()
    signal = _gaussian(1500.0, 45.0, 400.0)
    counts = rng.poisson(background + signal).astype(float)
    result = analyse_spectrum("T2/jm", EDGES, counts, 1.0, seed=1)
    assert result.status == "background accepted", result.trail
    bump = result.bump
    assert bump is not None
    assert bump.mass_low <= 1500.0 <= bump.mass_high
    assert bump.mass_high - bump.mass_low < 400.0
    # the local Z is that of the injected s over b in the window, within Poisson noise
    window = (EDGES[:-1] >= bump.mass_low) & (EDGES[1:] <= bump.mass_high)
    expected_z = expected_significance(signal[window].sum(), background[window].sum())
    assert abs(bump.local_z - expected_z) < 2.0
    assert bump.global_z > 3.0


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_background_only_spectrum_stays_quiet(seed):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(_background()).astype(float)
    result = analyse_spectrum("T2/jm", EDGES, counts, 1.0, seed=seed)
    assert result.bump is not None
    assert result.bump.global_p > 0.01


def test_sparse_spectrum_is_recorded_not_fitted():
    counts = np.zeros(len(EDGES) - 1)
    counts[60:70] = 1.0
    result = analyse_spectrum("T2/jm", EDGES, counts, 0.1)
    assert result.status == "too few events"
    assert result.bump is None


@pytest.mark.slow
def test_demo_finds_the_injected_resonances(tmp_path):
    assert run_demo(tmp_path, n_events=60_000, seed=5) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    found = {}
    for spectrum in results["spectra"]:
        bump = spectrum["bump"]
        if bump is None:
            continue
        best = found.get(spectrum["name"])
        if best is None or bump["local_z"] > best["local_z"]:
            found[spectrum["name"]] = bump
    ranked = sorted(found.items(), key=lambda item: -item[1]["local_z"])
    top_names = [name for name, _ in ranked[:4]]
    assert any(name.endswith("/jm") for name in top_names), ranked[:4]
    jm = max((b for n, b in found.items() if n.endswith("/jm")), key=lambda b: b["local_z"])
    assert jm["window_gev"][0] <= 1500.0 <= jm["window_gev"][1]
    assert jm["local_z"] > 3.0
