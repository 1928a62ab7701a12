"""Extended binned Poisson fits: truth recovery (pulls), fit quality numbers, masks, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from core.errors import FitDidNotConvergeError, InvalidInputError
from core.fit import fit_background, fit_spectrum, prepare_spectrum
from core.fitfunctions import BackgroundFunction, bin_integrals, get_function
from core.fitrange import default_upper_edge, last_non_empty_edge
from tests.spectra import EDGES, FIT_RANGE, SHAPES


def truth(name: str, n_events: float, fit_range=FIT_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (ln p1 set so the fit range expects n_events) and expected counts per bin."""
    function = get_function(name)
    params = np.array([0.0, *SHAPES[name]])
    problem = prepare_spectrum(EDGES, np.ones(EDGES.size - 1), fit_range)
    mu = bin_integrals(function, params, EDGES)
    params[0] = np.log(n_events / mu[problem.first_bin : problem.stop_bin].sum())
    mu = bin_integrals(function, params, EDGES)
    assert mu[problem.first_bin : problem.stop_bin].sum() == pytest.approx(n_events)
    return params, mu


@pytest.mark.parametrize(("name", "n_toys"), [("p4", 200), ("p5", 200)])
def test_pulls_of_known_spectrum_have_zero_mean_and_unit_width(name, n_toys):
    params, mu = truth(name, 1.0e6)
    problem = prepare_spectrum(EDGES, mu, FIT_RANGE)
    rng = np.random.default_rng(2024)
    pulls = []
    for _ in range(n_toys):
        toy = problem.with_range_counts(rng.poisson(problem.range_counts))
        result = fit_spectrum(toy, name, seed=rng)
        assert result.valid and result.accurate_covariance
        # every parameter, ln p1 included (p1 itself, with ~100 % errors, is log-normal)
        pulls.append((np.array(result.parameters) - params) / np.array(result.errors))
    pulls = np.array(pulls)
    # 200 toys: the mean has a standard error of 0.07 and the width of 0.05
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.25), pulls.mean(axis=0)
    assert np.all(np.abs(pulls.std(axis=0, ddof=1) - 1) < 0.2), pulls.std(axis=0, ddof=1)


def test_fit_of_asimov_data_returns_the_truth_exactly():
    params, mu = truth("p5", 5.0e5)
    result = fit_background(EDGES, mu, "p5", FIT_RANGE)
    # Migrad stops at EDM < 2e-4: parameters within a few 1e-2 of their errors
    assert np.all(np.abs(np.array(result.parameters) - params) < 0.03 * np.array(result.errors))
    assert result.deviance < 1e-3
    assert result.p_value > 0.999


def test_ua2_fit_recovers_its_truth():
    params, mu = truth("ua2", 2.0e5)
    counts = np.random.default_rng(5).poisson(mu).astype(float)
    result = fit_background(EDGES, counts, "ua2", FIT_RANGE)
    assert np.all(np.abs(np.array(result.parameters) - params) < 4 * np.array(result.errors))


def test_fit_quality_numbers_follow_their_definitions():
    _, mu = truth("p4", 1.0e5)
    counts = np.random.default_rng(1).poisson(mu).astype(float)
    result = fit_background(EDGES, counts, "p4", FIT_RANGE)
    n = counts[result.first_bin : result.stop_bin]
    expected = result.expected
    # extended likelihood with a free normalisation: the fit reproduces the total count
    assert expected.sum() == pytest.approx(n.sum(), rel=1e-10)
    assert result.deviance == pytest.approx(
        2 * np.sum(expected - n + special.xlogy(n, n) - special.xlogy(n, expected)), rel=1e-10
    )
    assert result.chi2 == pytest.approx(np.sum((n - expected) ** 2 / expected), rel=1e-10)
    assert result.nll == pytest.approx(
        np.sum(expected - special.xlogy(n, expected) + special.gammaln(n + 1)), rel=1e-10
    )
    assert result.ndf == n.size - 4
    assert result.fit_range == (
        pytest.approx(EDGES[result.first_bin]),
        pytest.approx(EDGES[result.stop_bin]),
    )
    # expected counts are the bin integrals of the fitted density
    np.testing.assert_allclose(
        expected,
        bin_integrals(get_function("p4"), result.parameters, EDGES)[
            result.first_bin : result.stop_bin
        ],
        rtol=1e-10,
    )
    np.testing.assert_allclose(result.covariance, result.covariance.T)
    np.testing.assert_allclose(np.sqrt(np.diag(result.covariance)), result.errors)


def test_next_function_starts_from_the_lower_fit_and_never_fits_worse():
    _, mu = truth("p4", 3.0e5)
    counts = np.random.default_rng(7).poisson(mu).astype(float)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    lower = None
    nlls = []
    for name in ("p2", "p3", "p4", "p5", "p6"):
        lower = fit_spectrum(problem, name, lower=lower)
        nlls.append(lower.nll)
    assert np.all(np.diff(nlls) <= 1e-6)
    user = fit_spectrum(problem, "p4", starts=[[1.0, 10.0, -4.0, -0.3]])
    assert user.valid
    assert "user start 0" in user.start or any("user start 0" in note for note in user.notes)


def test_default_fit_range_ends_at_the_fixed_upper_mass_with_empty_bins():
    counts = np.zeros(EDGES.size - 1)
    counts[40:120] = np.linspace(1000, 10, 80).round()
    result = fit_background(EDGES, counts, "p3", (300.0, None))
    upper = default_upper_edge(EDGES, 13000.0)
    # 0.65 sqrt_s snapped to the first edge at or above it
    assert upper >= 0.65 * 13000.0 > EDGES[np.searchsorted(EDGES, upper) - 1]
    assert result.fit_range[1] == pytest.approx(upper)
    assert result.fit_range[1] > last_non_empty_edge(EDGES, counts)
    assert result.fit_range[0] >= 300.0 > EDGES[result.first_bin - 1]
    whole = prepare_spectrum(EDGES, counts)
    assert whole.first_bin == 0 and EDGES[whole.stop_bin] == pytest.approx(upper)


def test_excluded_window_is_left_out_and_an_injected_bump_does_not_bias_the_fit():
    params, mu = truth("p4", 2.0e5)
    rng = np.random.default_rng(11)
    counts = rng.poisson(mu).astype(float)
    first, stop = np.searchsorted(EDGES, [1400.0, 1700.0])
    bump = np.zeros(counts.size, dtype=bool)
    bump[first:stop] = True
    counts[bump] += 3 * np.sqrt(counts[bump]) + 200
    biased = fit_background(EDGES, counts, "p4", FIT_RANGE)
    window = (float(EDGES[first]), float(EDGES[stop]))
    masked = fit_background(EDGES, counts, "p4", FIT_RANGE, exclude=window)
    assert biased.p_value < 1e-3
    assert masked.p_value > 0.01
    in_range = bump[masked.first_bin : masked.stop_bin]
    np.testing.assert_array_equal(~masked.used, in_range)
    assert masked.ndf == masked.used.sum() - 4
    assert np.all(np.abs(np.array(masked.parameters) - params) < 3 * np.array(masked.errors))
    # the masked fit predicts the window from the sidebands, below the bump
    assert masked.expected[~masked.used].sum() < counts[bump].sum() - 1000


def test_non_log_linear_shape_fits_like_its_log_linear_twin():
    def log_shape(x, theta):
        return theta[0] * np.log1p(-x) + (theta[1] + theta[2] * np.log(x)) * np.log(x)

    custom = BackgroundFunction(
        name="custom p4",
        parameter_names=("p1", "a", "b", "c"),
        formula="",
        start=(10.0, -5.0, 0.0),
        shape=log_shape,
    )
    _, mu = truth("p4", 1.0e5)
    counts = np.random.default_rng(3).poisson(mu).astype(float)
    reference = fit_background(EDGES, counts, "p4", FIT_RANGE)
    result = fit_background(EDGES, counts, custom, FIT_RANGE)
    difference = np.array(result.parameters) - np.array(reference.parameters)
    assert np.all(np.abs(difference) < 0.05 * np.array(reference.errors))
    assert result.nll == pytest.approx(reference.nll, abs=1e-3)
    np.testing.assert_allclose(result.errors, reference.errors, rtol=0.02)


def test_non_convergence_raises_with_the_reason():
    broken = BackgroundFunction(
        name="nowhere finite",
        parameter_names=("p1", "a"),
        formula="",
        start=(1.0,),
        shape=lambda x, theta: np.full(np.shape(x), np.nan),
    )
    _, mu = truth("p4", 1.0e4)
    with pytest.raises(FitDidNotConvergeError, match="did not converge") as error:
        fit_background(EDGES, mu.round(), broken, FIT_RANGE, max_attempts=2)
    # a shape that is nowhere finite has no information to whiten with: one restart, then stop
    assert "random restart 1" in str(error.value)
    assert "bin integrals or their derivatives are not finite" in str(error.value)


@pytest.mark.parametrize(
    ("edges", "counts", "fit_range", "match"),
    [
        (EDGES[:1], [], None, "empty"),
        (EDGES, np.zeros(EDGES.size - 1), None, "empty"),
        (
            EDGES,
            np.r_[np.ones(10), np.zeros(EDGES.size - 11)],
            (1000.0, 3000.0),
            "are zero",
        ),
        (EDGES, np.ones(EDGES.size - 1), (EDGES[50], EDGES[53]), "more bins than parameters"),
        (EDGES, np.r_[np.nan, np.ones(EDGES.size - 2)], None, "NaN"),
        (EDGES, np.r_[-1.0, np.ones(EDGES.size - 2)], None, "non-negative"),
        (EDGES, np.ones(EDGES.size - 1), (20.0, 3000.0), "outside the histogram"),
        (EDGES, np.ones(EDGES.size - 1), (300.0, 20000.0), "outside the histogram"),
        (EDGES, np.ones(EDGES.size - 1), (3000.0, 300.0), "lo < hi"),
        (EDGES, np.ones(EDGES.size - 1), (300.0, 305.0), "no complete bin"),
        (EDGES, np.ones(EDGES.size), None, "edges"),
        (EDGES[::-1], np.ones(EDGES.size - 1), None, "increase strictly"),
    ],
)
def test_bad_input_raises_invalid_input_error(edges, counts, fit_range, match):
    with pytest.raises(InvalidInputError, match=match):
        fit_background(edges, counts, "p4", fit_range)


def test_bad_fit_options_raise_invalid_input_error():
    _, mu = truth("p4", 1.0e4)
    with pytest.raises(InvalidInputError, match="start 0"):
        fit_background(EDGES, mu.round(), "p4", FIT_RANGE, starts=[[1.0, 2.0]])
    with pytest.raises(InvalidInputError, match="max_attempts"):
        fit_background(EDGES, mu.round(), "p4", FIT_RANGE, max_attempts=0)
    with pytest.raises(InvalidInputError, match="does not overlap"):
        fit_background(EDGES, mu.round(), "p4", FIT_RANGE, exclude=(8000.0, 9000.0))
    with pytest.raises(InvalidInputError, match="lo < hi"):
        fit_background(EDGES, mu.round(), "p4", FIT_RANGE, exclude=(2000.0, 1000.0))
    with pytest.raises(InvalidInputError, match="unknown background function"):
        fit_background(EDGES, mu.round(), "p9", FIT_RANGE)
    with pytest.raises(InvalidInputError, match="sqrt_s"):
        fit_background(EDGES, mu.round(), "p4", FIT_RANGE, sqrt_s=10.0)
    with pytest.raises(InvalidInputError, match="kinematic limit"):
        fit_background(EDGES, np.ones(EDGES.size - 1), "p4", (300.0, 9000.0), sqrt_s=8000.0)
    problem = prepare_spectrum(EDGES, mu.round(), FIT_RANGE)
    with pytest.raises(InvalidInputError, match="expected"):
        problem.with_range_counts([1.0, 2.0])
    with pytest.raises(InvalidInputError, match="zero"):
        problem.with_range_counts(np.zeros(problem.stop_bin - problem.first_bin))


def test_fit_quality_with_an_expectation_that_underflows_to_zero():
    from core.fit import fit_quality

    counts = np.array([4.0, 0.0, 1.0])
    _, chi2, _, _, _ = fit_quality(counts, np.array([4.0, 0.0, 1.0]), 1)
    assert chi2 == 0.0
    _, chi2, _, _, _ = fit_quality(np.array([4.0, 2.0, 1.0]), np.array([4.0, 0.0, 1.0]), 1)
    assert chi2 == np.inf
