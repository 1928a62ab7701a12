"""The background's uncertainty band: `core.fit.expected_errors` against toy refits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.errors import FitError, InvalidInputError
from core.fit import expected_errors, fit_background, fit_spectrum, prepare_spectrum
from core.fitfunctions import BackgroundFunction, bin_integrals, get_function
from tests.spectra import EDGES, FIT_RANGE, SHAPES


def _truth(name: str, n_events: float) -> np.ndarray:
    function = get_function(name)
    params = np.array([0.0, *SHAPES[name]])
    problem = prepare_spectrum(EDGES, np.ones(EDGES.size - 1), FIT_RANGE)
    mu = bin_integrals(function, params, EDGES)
    params[0] = np.log(n_events / mu[problem.first_bin : problem.stop_bin].sum())
    return np.asarray(bin_integrals(function, params, EDGES), dtype=float)


def _custom_p4() -> BackgroundFunction:
    """p4 written as a non-log-linear shape: finite-difference derivatives (symbolic path)."""

    def log_shape(x, theta):
        return theta[0] * np.log1p(-x) + (theta[1] + theta[2] * np.log(x)) * np.log(x)

    return BackgroundFunction(
        name="custom p4",
        parameter_names=("p1", "a", "b", "c"),
        formula="",
        start=(10.0, -5.0, 0.0),
        shape=log_shape,
    )


@pytest.mark.slow
@pytest.mark.parametrize("exclude", [None, (1400.0, 1700.0)])
def test_propagated_error_matches_the_spread_of_refits_on_p4_toys(exclude):
    """200 toys of a known p4 (2e4 events): sigma(mu_i) from the covariance vs the spread.

    The standard deviation of 200 refits has a relative standard error of 1/sqrt(400) = 5 %;
    the tolerance is 15 % in every bin expecting more than 10 events, the bins of an
    excluded window (extrapolated by the masked fit) included.
    """
    mu = _truth("p4", 2.0e4)
    problem = prepare_spectrum(EDGES, mu, FIT_RANGE, exclude=exclude)
    rng = np.random.default_rng(15)
    fitted, propagated = [], []
    for _ in range(200):
        toy = problem.with_range_counts(rng.poisson(problem.range_counts))
        result = fit_spectrum(toy, "p4", seed=rng)
        fitted.append(result.expected)
        propagated.append(expected_errors(result, EDGES))
    spread = np.std(np.array(fitted), axis=0, ddof=1)
    mean_error = np.mean(np.array(propagated), axis=0)
    truth_range = problem.range_counts
    large = truth_range > 10
    assert np.count_nonzero(large) >= 20
    ratio = mean_error[large] / spread[large]
    assert np.all(np.abs(ratio - 1) < 0.15), ratio
    # the band is a real fraction of the Poisson error, not zero, where mu is large
    assert np.all(mean_error[large] > 0)
    if exclude is not None:
        assert np.count_nonzero(large & ~problem.used) >= 3


def test_error_of_a_non_log_linear_shape_equals_its_log_linear_twin():
    mu = _truth("p4", 1.0e5)
    counts = np.random.default_rng(3).poisson(mu).astype(float)
    reference = fit_background(EDGES, counts, "p4", FIT_RANGE)
    custom = fit_background(EDGES, counts, _custom_p4(), FIT_RANGE)
    np.testing.assert_allclose(
        expected_errors(custom, EDGES), expected_errors(reference, EDGES), rtol=0.03
    )


def test_error_of_a_masked_fit_covers_the_window_and_grows_there():
    mu = _truth("p4", 1.0e5)
    counts = np.random.default_rng(4).poisson(mu).astype(float)
    full = fit_background(EDGES, counts, "p4", FIT_RANGE)
    masked = fit_background(EDGES, counts, "p4", FIT_RANGE, exclude=(1400.0, 1700.0))
    full_error, masked_error = expected_errors(full, EDGES), expected_errors(masked, EDGES)
    assert full_error.shape == masked_error.shape == full.expected.shape
    window = ~masked.used
    assert np.any(window)
    # fewer bins constrain the function: the band in the window is wider than unmasked
    assert np.all(masked_error[window] > full_error[window])


def test_errors_are_finite_and_below_each_bins_poisson_error():
    mu = _truth("p4", 1.0e5)
    counts = np.random.default_rng(5).poisson(mu).astype(float)
    result = fit_background(EDGES, counts, "p4", FIT_RANGE)
    errors = expected_errors(result, EDGES)
    assert np.all(np.isfinite(errors)) and np.all(errors >= 0)
    # a single bin's error is below its own Poisson error (the fit pools all bins)
    assert np.all(errors < np.sqrt(result.expected))


def test_bad_inputs_are_refused_not_answered_with_nan():
    mu = _truth("p4", 1.0e4)
    result = fit_background(EDGES, np.round(mu), "p4", FIT_RANGE)
    with pytest.raises(InvalidInputError, match="edges"):
        expected_errors(result, EDGES[:10])
    with pytest.raises(InvalidInputError, match="fit was made over"):
        expected_errors(result, EDGES * 1.01)
    nan_covariance = result.covariance.copy()
    nan_covariance[1, 1] = np.nan
    with pytest.raises(FitError, match="not a finite"):
        expected_errors(replace(result, covariance=nan_covariance), EDGES)
    with pytest.raises(FitError, match="not a finite"):
        expected_errors(replace(result, covariance=np.zeros((2, 2))), EDGES)
    negative = -np.eye(result.covariance.shape[0])
    with pytest.raises(FitError, match="negative"):
        expected_errors(replace(result, covariance=negative), EDGES)
