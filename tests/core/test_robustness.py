"""Robustness checks: goodness of fit, fit-start stability, spurious signal, window exclusion."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import integrate

from core.errors import InvalidInputError
from core.fit import fit_spectrum, prepare_spectrum
from core.fitfunctions import BackgroundFunction, bin_integrals, get_function
from core.masses import mass_resolution
from core.robustness import (
    falling_background,
    fit_signal_plus_background,
    fit_start_stability,
    goodness_of_fit,
    linearised_toy_deviances,
    robustness_checks,
    spurious_signal,
    window_exclusion,
)
from core.significance import gaussian_bin_fractions
from tests.spectra import EDGES, FIT_RANGE, expected_counts


def toy(name: str, n_events: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).poisson(expected_counts(name, n_events)).astype(float)


def test_mass_resolution_is_the_physics_bin_width():
    np.testing.assert_allclose(mass_resolution(EDGES[:-1]), np.diff(EDGES), rtol=1e-12)
    assert mass_resolution(1000.0) == pytest.approx(1000 * math.sqrt(0.84**2 / 1000 + 0.016**2))
    with pytest.raises(InvalidInputError, match="positive"):
        mass_resolution([-5.0])


def test_gaussian_bin_fractions_integrate_the_normal_density():
    fractions = gaussian_bin_fractions(EDGES, 1500.0, 60.0)
    assert fractions.sum() == pytest.approx(1.0, abs=1e-12)
    inside = (EDGES[:-1] >= 1440.0) & (EDGES[1:] <= 1560.0)
    assert fractions[inside].sum() < 0.6827
    with pytest.raises(InvalidInputError, match="positive width"):
        gaussian_bin_fractions(EDGES, 1500.0, 0.0)


def test_goodness_of_fit_passes_the_true_model_and_fails_a_wrong_one():
    counts = toy("p4", 1.0e5, seed=1)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    good = goodness_of_fit(problem, fit_spectrum(problem, "p4"), method="asymptotic")
    bad = goodness_of_fit(problem, fit_spectrum(problem, "p2"), method="asymptotic")
    assert good.passed and good.numbers["p_value"] > 0.05
    assert not bad.passed and bad.numbers["p_value"] < 1e-6
    assert "asymptotic" in good.message


def test_toy_goodness_of_fit_is_used_for_small_counts_and_agrees_with_asymptotics_at_large():
    sparse = prepare_spectrum(EDGES, toy("p3", 1.0e5, seed=4), FIT_RANGE)
    fit = fit_spectrum(sparse, "p3")
    auto = goodness_of_fit(sparse, fit, n_toys=60, seed=3)
    assert auto.numbers["small_bin_fraction"] > 0.2
    assert auto.numbers["n_toys"] >= 48
    assert auto.passed and "toy p" in auto.message
    wrong = goodness_of_fit(sparse, fit_spectrum(sparse, "p2"), n_toys=60, seed=3)
    assert not wrong.passed
    dense = prepare_spectrum(EDGES, toy("p4", 1.0e6, seed=4), FIT_RANGE)
    dense_fit = fit_spectrum(dense, "p4")
    by_toys = goodness_of_fit(dense, dense_fit, method="toys", n_toys=100, seed=5)
    # 100 toys: binomial error <= 0.05 on the p-value
    assert by_toys.numbers["p_value"] == pytest.approx(dense_fit.p_value, abs=0.15)


def test_goodness_of_fit_bad_options():
    problem = prepare_spectrum(EDGES, toy("p4", 1.0e4, seed=1), FIT_RANGE)
    fit = fit_spectrum(problem, "p4")
    with pytest.raises(InvalidInputError, match="10 toys"):
        goodness_of_fit(problem, fit, method="toys", n_toys=5)
    with pytest.raises(InvalidInputError, match="alpha"):
        goodness_of_fit(problem, fit, alpha=0.0)


def test_fit_start_stability_passes_the_true_model_and_fails_a_wrong_one():
    counts = toy("p4", 1.0e5, seed=6)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    stable = fit_start_stability(EDGES, counts, fit_spectrum(problem, "p4"))
    unstable = fit_start_stability(EDGES, counts, fit_spectrum(problem, "p2"))
    # the range starts at its floor: moved up only
    assert stable.passed, stable.message
    assert "converged_minus" not in stable.numbers and "not moved down" in stable.message
    assert stable.numbers["max_shift_plus"] < 1.0
    assert stable.numbers["fit_start_plus_gev"] > FIT_RANGE[0]
    assert not unstable.passed and "unstable" in unstable.message
    # allowed down to a lower floor, where the bin below holds events
    floor = int(np.searchsorted(EDGES, 200.0))
    both = fit_start_stability(EDGES, counts, fit_spectrum(problem, "p4"), floor_bin=floor)
    assert both.passed, both.message
    assert both.numbers["fit_start_minus_gev"] < FIT_RANGE[0] < both.numbers["fit_start_plus_gev"]
    # never below the data: the bins under 300 GeV emptied, as a stream start leaves them
    cut = counts.copy()
    cut[: problem.first_bin] = 0.0
    empty_below = fit_start_stability(
        EDGES, cut, fit_spectrum(prepare_spectrum(EDGES, cut, FIT_RANGE), "p4"), floor_bin=0
    )
    assert empty_below.passed and "holds no events" in empty_below.message
    assert "converged_minus" not in empty_below.numbers


def test_fit_start_stability_passes_a_range_starting_at_the_first_bin():
    counts = toy("p4", 1.0e5, seed=16)
    first = int(np.searchsorted(EDGES, 300.0))
    edges, cut = EDGES[first:], counts[first:]
    fit = fit_spectrum(prepare_spectrum(edges, cut, None), "p4")
    assert fit.first_bin == 0
    check = fit_start_stability(edges, cut, fit)
    assert check.passed and check.status == "pass", check.message
    assert check.numbers["converged_plus"] == 1.0 and check.numbers["max_shift_plus"] < 1.0


def test_signal_plus_background_fit_recovers_an_injected_signal():
    background = expected_counts("p4", 1.0e6)
    width = float(mass_resolution(1500.0))
    signal = 3000.0 * gaussian_bin_fractions(EDGES, 1500.0, width)
    problem = prepare_spectrum(EDGES, background + signal, FIT_RANGE)
    nominal = fit_spectrum(prepare_spectrum(EDGES, background, FIT_RANGE), "p4")
    result = fit_signal_plus_background(problem, nominal, 1500.0, width)
    assert result.valid
    # Asimov data: the fit returns the injected yield up to the part outside the range
    assert result.signal == pytest.approx(3000.0, rel=0.01)
    assert result.pull > 5
    empty = fit_signal_plus_background(
        prepare_spectrum(EDGES, background, FIT_RANGE), nominal, 1500.0, width
    )
    assert abs(empty.pull) < 0.01


def test_signal_plus_background_fit_takes_a_background_that_underflows_in_its_tail():
    """A fitted function can reach exactly 0 far in its tail (seen on injection toys: the
    spurious-signal check then stopped the whole background choice with an input error).
    With the last used bins at 0 the fit at 1500 GeV is unchanged."""
    background = expected_counts("p4", 1.0e4)
    width = float(mass_resolution(1500.0))
    signal = 200.0 * gaussian_bin_fractions(EDGES, 1500.0, width)
    problem = prepare_spectrum(EDGES, background + signal, FIT_RANGE)
    nominal = fit_spectrum(prepare_spectrum(EDGES, background, FIT_RANGE), "p4")
    tail = np.flatnonzero(problem.used)[-3:]
    expected = nominal.expected.copy()
    expected[tail] = 0.0
    underflowed = dataclasses.replace(nominal, expected=expected)
    reference = fit_signal_plus_background(problem, nominal, 1500.0, width)
    result = fit_signal_plus_background(problem, underflowed, 1500.0, width)
    assert result.valid and reference.valid
    assert result.signal == pytest.approx(reference.signal, rel=1e-6)
    assert result.signal_error == pytest.approx(reference.signal_error, rel=1e-4)


def test_spurious_signal_passes_the_true_model_and_fails_a_deliberately_wrong_one():
    counts = toy("p4", 2.0e5, seed=17)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    truth_as_alternative = get_function("p4")
    right = spurious_signal(
        problem, fit_spectrum(problem, "p4"), alternative=truth_as_alternative, method="asimov"
    )
    wrong = spurious_signal(
        problem, fit_spectrum(problem, "p3"), alternative=truth_as_alternative, method="asimov"
    )
    assert right.passed, right.message
    assert right.numbers["max_abs_median_pull"] < 0.1
    assert not wrong.passed
    assert wrong.numbers["max_abs_median_pull"] > 0.5
    assert "median pull" in wrong.message
    # calibrated on its null: the pull exceeds that of each of 19 toys of the p3 fit itself
    assert wrong.numbers["n_null_toys"] == 19
    assert wrong.numbers["null_max_abs_pull"] < wrong.numbers["max_abs_median_pull"]


def test_spurious_signal_toys_agree_with_the_asimov_shortcut():
    counts = toy("ua2", 5.0e4, seed=8)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    fit = fit_spectrum(problem, "p4")
    asimov = spurious_signal(problem, fit, alternative="ua2", n_masses=3, method="asimov")
    toys = spurious_signal(problem, fit, alternative="ua2", n_masses=3, n_toys=40, seed=9)
    masses = [float(key.split("_")[2]) for key in asimov.numbers if key.startswith("median_pull")]
    assert len(masses) == 3
    for mass in masses:
        key = f"median_pull_{mass:.0f}_gev"
        # the median of 40 toy pulls scatters by about 0.2
        assert toys.numbers[key] == pytest.approx(asimov.numbers[key], abs=0.45)
    assert toys.numbers["n_toys"] == 40 and asimov.numbers["n_toys"] == 0


def test_spurious_signal_without_an_adequate_alternative_is_not_applicable():
    counts = toy("p4", 1.0e6, seed=10)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    fit = fit_spectrum(problem, "p4")
    inadequate = spurious_signal(problem, fit, alternative="p2", method="asimov")
    assert inadequate.status == "not_applicable" and inadequate.passed
    assert "no alternative function describes" in inadequate.message
    broken = BackgroundFunction(
        "broken", ("p1", "a"), "", (1.0,), shape=lambda x, t: np.full(np.shape(x), np.nan)
    )
    failed = spurious_signal(problem, fit, alternative=[broken], method="asimov")
    assert failed.status == "not_applicable" and "did not converge" in failed.message
    # a wrong tested function still fails when the alternative is a plausible truth
    wrong = spurious_signal(problem, fit_spectrum(problem, "p3"), alternative="p4")
    assert wrong.status == "fail", wrong.message


def test_spurious_signal_bad_options():
    problem = prepare_spectrum(EDGES, toy("p4", 1.0e4, seed=1), FIT_RANGE)
    fit = fit_spectrum(problem, "p4")
    with pytest.raises(InvalidInputError, match="inside the fit range"):
        spurious_signal(problem, fit, alternative="p4", masses=[100.0])
    with pytest.raises(InvalidInputError, match="at least one toy"):
        spurious_signal(problem, fit, n_toys=0)
    with pytest.raises(InvalidInputError, match="width_fraction"):
        spurious_signal(problem, fit, width_fraction=0.0)
    with pytest.raises(InvalidInputError, match="at least one alternative"):
        spurious_signal(problem, fit, alternative=[])


def test_window_exclusion_refits_without_the_window():
    counts = toy("p4", 2.0e5, seed=11)
    first, stop = np.searchsorted(EDGES, [1400.0, 1700.0])
    counts[first:stop] += 400.0
    window = (float(EDGES[first]), float(EDGES[stop]))
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    nominal = fit_spectrum(problem, "p4")
    check = window_exclusion(EDGES, counts, nominal, window, gof_method="asymptotic")
    assert check.passed, check.message
    assert check.numbers["data_in_window"] == counts[first:stop].sum()
    # the masked background comes from the sidebands and leaves the excess visible
    assert check.numbers["background_masked"] < check.numbers["background_nominal"]
    assert check.numbers["local_p_masked"] < 1e-6
    assert check.numbers["gof_p_value_masked"] > 0.05
    with pytest.raises(InvalidInputError, match="does not overlap"):
        window_exclusion(EDGES, counts, nominal, (8000.0, 9000.0))


def test_robustness_checks_run_every_check():
    counts = toy("ua2", 3.0e4, seed=12)
    problem = prepare_spectrum(EDGES, counts, FIT_RANGE)
    fit = fit_spectrum(problem, "p4")
    report = robustness_checks(EDGES, counts, fit, spurious_method="asimov", seed=3)
    assert [check.name for check in report.checks] == [
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    ]
    assert report.passed == all(check.passed for check in report.checks)
    assert report.function == "p4"
    windowed = robustness_checks(
        EDGES, counts, fit, spurious_method="asimov", window=(1000.0, 1200.0), seed=3
    )
    assert windowed.checks[-2].name == "window_exclusion"
    assert set(windowed.failed) <= {check.name for check in windowed.checks}


def test_spurious_signal_on_a_spectrum_too_sparse_to_test_is_not_applicable_with_the_reason():
    from core.masses import mass_bin_edges

    edges = mass_bin_edges()
    rng = np.random.default_rng(4)
    shape = bin_integrals(get_function("p3"), np.array([0.0, 10.0, -4.0]), edges)
    counts = rng.poisson(shape * 12.0 / shape[edges[:-1] >= 300].sum()).astype(float)
    problem = prepare_spectrum(edges, counts, (300.0, None))
    fit = fit_spectrum(problem, get_function("p2"))
    check = spurious_signal(problem, fit, alternative="p3", method="asimov")
    assert check.status == "not_applicable"
    assert "too sparse" in check.message


def test_toy_goodness_of_fit_agrees_with_the_asymptotic_p_at_high_counts():
    # 1e6 p4 events from 300 GeV to 3 TeV: every bin expects > 5 events
    counts = toy("p4", 1.0e6, seed=21)
    problem = prepare_spectrum(EDGES, counts, (300.0, 3000.0))
    fit = fit_spectrum(problem, "p4")
    assert np.all(fit.expected >= 5)
    linear = goodness_of_fit(problem, fit, method="linear_toys", n_linear_toys=4000, seed=1)
    refit = goodness_of_fit(problem, fit, method="toys", n_toys=200, seed=2)
    # binomial errors: <= 0.008 (4000 toys) and <= 0.036 (200 toys) at p ~ 0.5
    assert linear.numbers["p_value"] == pytest.approx(fit.p_value, abs=0.04)
    assert refit.numbers["p_value"] == pytest.approx(fit.p_value, abs=0.11)
    assert linear.numbers["toy_deviance_mean"] == pytest.approx(fit.ndf, rel=0.05)


def test_linearised_toys_match_refitted_toys_at_small_counts():
    counts = toy("p3", 1000.0, seed=22)
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    fit = fit_spectrum(problem, "p3")
    assert np.mean(fit.expected < 5) > 0.5
    linear = linearised_toy_deviances(problem, fit, 3000, np.random.default_rng(3))
    rng = np.random.default_rng(4)
    refit = np.array(
        [
            fit_spectrum(
                problem.with_range_counts(rng.poisson(fit.expected)), "p3", starts=[fit.parameters]
            ).deviance
            for _ in range(150)
        ]
    )
    # far below ndf (the chi2 law is wrong here) and the same law: mean within 3 % + noise
    assert linear.mean() < 0.6 * fit.ndf
    assert linear.mean() == pytest.approx(refit.mean(), abs=3 * refit.std() / np.sqrt(150))
    assert np.quantile(linear, 0.9) == pytest.approx(np.quantile(refit, 0.9), rel=0.1)


def test_spurious_signal_passes_on_toys_of_the_tested_function_itself():
    counts = toy("p4", 1.0e5, seed=23)
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    fit = fit_spectrum(problem, "p4")
    check = spurious_signal(problem, fit, alternative="p4", method="toys", n_toys=40, seed=5)
    assert check.status == "pass", check.message
    assert check.numbers["max_abs_median_pull"] < 0.5
    median_keys = [key for key in check.numbers if key.startswith("median_signal_error")]
    assert median_keys and all(check.numbers[key] > 0 for key in median_keys)


def test_a_rising_fit_is_rejected():
    counts = toy("p3", 2.0e4, seed=24)
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    fit = fit_spectrum(problem, "p3")
    assert falling_background(problem, fit).passed
    # the same fit times (m / 300 GeV)^6: x^-4.5 becomes a density rising as x^1.5
    centres = 0.5 * (problem.range_edges[:-1] + problem.range_edges[1:])
    rising = dataclasses.replace(fit, expected=fit.expected * (centres / 300.0) ** 6)
    check = falling_background(problem, rising)
    assert not check.passed and "rises with mass" in check.message
    assert check.numbers["first_rising_gev"] > 300.0


P4_TRUTH = (10.0, -4.0, -0.3)
"""(p2, p3, p4) of the independent p4 truth below (tests/spectra.py SHAPES["p4"])."""


def independent_p4_counts(n_events: float) -> np.ndarray:
    """Expected counts of p4 on EDGES by quad, n_events in [300 GeV, 0.65 sqrt_s].

    Written here from the formula, sharing nothing with core.fitfunctions, so that a
    mistake in the fit code's integrals cannot hide in the toys.
    """
    p2, p3, p4 = P4_TRUTH

    def density(mass: float) -> float:
        x = mass / 13000.0
        return float((1.0 - x) ** p2 * x ** (p3 + p4 * math.log(x)))

    mu = np.array([integrate.quad(density, lo, hi)[0] for lo, hi in itertools.pairwise(EDGES)])
    inside = (EDGES[:-1] >= 300.0 - 1e-9) & (EDGES[1:] <= 0.65 * 13000.0 + 1e-9)
    return np.asarray(mu * n_events / mu[inside].sum(), dtype=np.float64)


@pytest.mark.slow
def test_spurious_signal_rejects_the_true_p4_at_most_at_its_nominal_rate() -> None:
    """On 30 independent p4 toys of 1e5 events the truth fails the Asimov spurious signal
    in at most 4 (P(>= 5) = 1.6 % at the nominal 5 %); measured: 2. The uncalibrated
    |pull| < 0.5 rule failed it in 8: a UA2 that describes the data (delta AIC <= 4)
    differs from p4 by a signal-like shape whatever the toy (pulls ~0.5 at ~1 TeV,
    bench/validate_checks.py), so the pull alone is no evidence against p4. 6-30 s."""
    mu = independent_p4_counts(1.0e5)
    rng = np.random.default_rng(2323)
    failures = 0
    for index in range(30):
        problem = prepare_spectrum(EDGES, rng.poisson(mu).astype(float), (300.0, 8450.0))
        fit = fit_spectrum(problem, "p4")
        check = spurious_signal(problem, fit, method="asimov", seed=index)
        failures += check.status == "fail"
    assert failures <= 4
