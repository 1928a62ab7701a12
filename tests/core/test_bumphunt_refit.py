"""The per-spectrum global p with refitted toys (core.bumphunt, core.pseudodata)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core.bumphunt import bump_hunt, refitted_window_maxima, scan_windows
from core.errors import InvalidInputError
from core.fit import fit_background
from core.pseudodata import refit_projection
from core.spectrum import fit_uncertainty
from tests.spectra import FIFTY_GEV_EDGES as EDGES
from tests.spectra import dijet_truth


@pytest.mark.slow
def test_refitted_global_p_is_uniform_and_the_fixed_one_piles_towards_one() -> None:
    """200 background-only pseudo-experiments (1e4 events, p4 fits, 300 toys each, seeded):
    the refitted global p is uniform (KS p > 0.01; measured 0.42, mean 0.52), the fixed one
    is not (KS p < 0.01, mean > 0.54; measured 1e-4, mean 0.58, 63 % above 0.5): its toys
    keep the fluctuations the data's fit absorbed. ~30 s."""
    truth = dijet_truth(10_000.0)
    rng = np.random.default_rng(1)
    fixed, refitted = [], []
    for experiment in range(200):
        counts = rng.poisson(truth).astype(np.float64)
        fit = fit_background(EDGES, counts, "p4", (EDGES[0], EDGES[-1]), seed=experiment)
        uncertainty = fit_uncertainty(fit, EDGES)
        assert uncertainty is not None
        jacobian, covariance = uncertainty
        options = {
            "min_toys": 300,
            "max_toys": 300,
            "jacobian": jacobian,
            "covariance": covariance,
            "seed": experiment,
        }
        old = bump_hunt(counts, fit.expected, EDGES, **options)  # type: ignore[arg-type]
        new = bump_hunt(counts, fit.expected, EDGES, fitted=fit.used, **options)  # type: ignore[arg-type]
        assert old.global_p_method in ("toys", "no excess")
        assert new.global_p_method in ("toys (refitted)", "no excess")
        fixed.append(old.global_p)
        refitted.append(new.global_p)
    assert stats.kstest(refitted, "uniform").pvalue > 0.01
    assert stats.kstest(fixed, "uniform").pvalue < 0.01
    assert np.mean(fixed) > 0.54
    assert np.mean(fixed) > np.mean(refitted)


def test_refitted_hunt_says_so_and_keeps_the_observed_window() -> None:
    """The refit changes only the global p: the best window and local p are the data's."""
    truth = dijet_truth(10_000.0)
    counts = np.random.default_rng(3).poisson(truth).astype(np.float64)
    fit = fit_background(EDGES, counts, "p3", (EDGES[0], EDGES[-1]))
    uncertainty = fit_uncertainty(fit, EDGES)
    assert uncertainty is not None
    jacobian, covariance = uncertainty
    common = {"jacobian": jacobian, "covariance": covariance, "min_toys": 500, "max_toys": 500}
    old = bump_hunt(counts, fit.expected, EDGES, **common)  # type: ignore[arg-type]
    new = bump_hunt(counts, fit.expected, EDGES, fitted=fit.used, **common)  # type: ignore[arg-type]
    assert old.global_p_method == "toys"
    assert new.global_p_method == "toys (refitted)"
    assert (new.first_bin, new.stop_bin, new.local_p) == (old.first_bin, old.stop_bin, old.local_p)
    assert new.n_toys >= 500


def test_the_floor_screen_is_exact_above_t_obs() -> None:
    """With floor = t the refitted maxima equal the unscreened ones wherever they reach t."""
    truth = dijet_truth(10_000.0)
    fit = fit_background(EDGES, truth, "p3", (EDGES[0], EDGES[-1]))
    uncertainty = fit_uncertainty(fit, EDGES)
    assert uncertainty is not None
    jacobian, covariance = uncertainty
    windows = scan_windows(fit.expected, jacobian=jacobian, covariance=covariance)
    refit = refit_projection(jacobian, fit.expected, fit.used)
    toys = np.random.default_rng(5).poisson(fit.expected, size=(2000, fit.expected.size))
    full = refitted_window_maxima(windows, toys, fit.expected, refit)
    floor = float(np.quantile(full, 0.8))
    screened = refitted_window_maxima(windows, toys, fit.expected, refit, floor)
    reaching = full >= floor
    np.testing.assert_allclose(screened[reaching], full[reaching], rtol=1e-12)
    assert np.all(screened[~reaching] == 0.0)


def test_a_fitted_mask_without_a_jacobian_is_refused() -> None:
    """The toys can only be refitted with the jacobian: a mask alone is an error, not ignored."""
    truth = dijet_truth(10_000.0)
    with pytest.raises(InvalidInputError, match="without its jacobian"):
        bump_hunt(truth, truth, EDGES, fitted=np.ones(truth.size, dtype=bool))
