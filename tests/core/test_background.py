"""Function choice: F-test / Wilks order recovery, the test formulas, the whole procedure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core.background import CheckOptions, choose_background, nested_test, select_function
from core.errors import FitDidNotConvergeError, InvalidInputError
from core.fit import FitResult, SpectrumFitProblem, fit_spectrum, prepare_spectrum
from core.fitfunctions import BackgroundFunction, bin_integrals, get_function
from tests.spectra import EDGES, FIT_RANGE, expected_counts


@pytest.mark.parametrize("truth", ["p3", "p4"])
def test_ftest_recovers_the_generating_order_in_90_percent_of_toys(truth):
    problem = prepare_spectrum(EDGES, expected_counts(truth, 1.0e5), FIT_RANGE)
    rng = np.random.default_rng(99)
    n_toys = 100
    chosen = []
    for seed in range(n_toys):
        toy = problem.with_range_counts(rng.poisson(problem.range_counts))
        chosen.append(select_function(toy, seed=seed).chosen)
    fraction = chosen.count(truth) / n_toys
    # the 5 % false extensions of the F-test leave ~95 %; 90 % is 2.3 binomial sigma below
    assert fraction >= 0.90, {name: chosen.count(name) for name in set(chosen)}


def test_wilks_recovers_the_generating_order():
    problem = prepare_spectrum(EDGES, expected_counts("p4", 1.0e5), FIT_RANGE)
    rng = np.random.default_rng(5)
    chosen = [
        select_function(
            problem.with_range_counts(rng.poisson(problem.range_counts)), method="wilks"
        ).chosen
        for _ in range(30)
    ]
    assert chosen.count("p4") >= 26


def test_ftest_statistic_follows_the_physics_formula():
    problem = prepare_spectrum(EDGES, expected_counts("p4", 1.0e4).round(), FIT_RANGE)
    lower = fit_spectrum(problem, "p3")
    higher = fit_spectrum(problem, "p4", lower=lower)
    test = nested_test(lower, higher)
    n_bins, n = higher.n_used, 3
    expected_f = (lower.deviance - higher.deviance) / (higher.deviance / (n_bins - n - 1))
    assert test.test_statistic == pytest.approx(expected_f, rel=1e-12)
    assert test.p_value == pytest.approx(stats.f.sf(expected_f, 1, n_bins - n - 1), rel=1e-10)
    assert test.n_bins == n_bins
    pearson = nested_test(lower, higher, chi2_kind="pearson")
    assert pearson.test_statistic == pytest.approx(
        (lower.chi2 - higher.chi2) / (higher.chi2 / (n_bins - n - 1)), rel=1e-12
    )
    wilks = nested_test(lower, higher, method="wilks")
    assert wilks.test_statistic == pytest.approx(2 * (lower.nll - higher.nll), rel=1e-9)
    assert wilks.p_value == pytest.approx(stats.chi2.sf(wilks.test_statistic, 1), rel=1e-10)
    assert test.significant == (test.p_value < 0.05)


def test_selection_records_every_fit_and_test_and_stops_at_the_first_insignificant_one():
    problem = prepare_spectrum(EDGES, expected_counts("p4", 1.0e5).round(), FIT_RANGE)
    choice = select_function(problem)
    assert choice.chosen == "p4"
    assert [(t.lower, t.higher) for t in choice.tests] == [("p2", "p3"), ("p3", "p4"), ("p4", "p5")]
    assert [t.significant for t in choice.tests] == [True, True, False]
    assert set(choice.fits) == {"p2", "p3", "p4", "p5"}
    assert choice.fit is choice.fits["p4"]
    assert "p5 does not improve p4" in choice.reason


def test_nested_chain_and_test_inputs_are_validated():
    problem = prepare_spectrum(EDGES, expected_counts("p4", 1.0e4).round(), FIT_RANGE)
    with pytest.raises(InvalidInputError, match="not a one-parameter extension"):
        select_function(problem, ["p2", "p4"])
    with pytest.raises(InvalidInputError, match="not a one-parameter extension"):
        select_function(problem, ["p3", "ua2"])
    with pytest.raises(InvalidInputError, match="at least two"):
        select_function(problem, ["p3"])
    p3 = fit_spectrum(problem, "p3")
    p5 = fit_spectrum(problem, "p5")
    with pytest.raises(InvalidInputError, match="n and n\\+1"):
        nested_test(p3, p5)
    other = fit_spectrum(
        prepare_spectrum(EDGES, expected_counts("p4", 1.0e4).round(), (400.0, 6000.0)), "p4"
    )
    with pytest.raises(InvalidInputError, match="different bins"):
        nested_test(p3, other)
    with pytest.raises(InvalidInputError, match="alpha"):
        nested_test(p3, fit_spectrum(problem, "p4"), alpha=1.5)


def _failing_shape(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return np.full(np.shape(x), np.nan)


def test_a_function_that_does_not_converge_is_recorded_and_the_lower_choice_stands(monkeypatch):
    import core.background

    original = core.background.fit_spectrum

    def failing_p4(problem, function, **kwargs):
        if getattr(function, "name", function) == "p4":
            raise FitDidNotConvergeError("p4 did not converge (forced by the test)")
        return original(problem, function, **kwargs)

    monkeypatch.setattr(core.background, "fit_spectrum", failing_p4)
    problem = prepare_spectrum(EDGES, expected_counts("p4", 1.0e5).round(), FIT_RANGE)
    choice = select_function(problem)
    assert choice.chosen == "p3"
    assert "p4" in choice.failures and "forced by the test" in choice.failures["p4"]
    assert "p4 did not converge, so p3 stands" in choice.reason
    assert [(t.lower, t.higher) for t in choice.tests] == [("p2", "p3")]


def _two_shape_log(x, theta):
    """ln of p3-like + p4-like: theta = (a, b, ln r, c, d, e)."""
    first = theta[0] * np.log1p(-x) + theta[1] * np.log(x)
    second = theta[2] + theta[3] * np.log1p(-x) + (theta[4] + theta[5] * np.log(x)) * np.log(x)
    return np.logaddexp(first, second)


TWO_SHAPES = BackgroundFunction(
    name="(1-x)^a x^b + r (1-x)^c x^(d + e ln x)",
    parameter_names=("p1", "a", "b", "ln r", "c", "d", "e"),
    formula="p1 ((1-x)^a x^b + r (1-x)^c x^(d + e ln x))",
    start=(25.0, -2.0, -9.0, 4.0, -6.0, -0.5),
    shape=_two_shape_log,
)
TWO_SHAPES_TRUTH = np.array([1.0, 80.0, -4.0, -13.0, 2.0, -6.0, 0.0])


def test_a_spectrum_no_analytic_function_describes_goes_to_the_fallback():
    edges = EDGES
    mu = bin_integrals(TWO_SHAPES, TWO_SHAPES_TRUTH, edges)
    problem = prepare_spectrum(edges, mu, FIT_RANGE)
    mu *= 2.0e7 / problem.range_counts.sum()
    counts = np.random.default_rng(8).poisson(mu).astype(float)
    calls = []

    def fallback(prepared: SpectrumFitProblem, seed: int) -> FitResult:
        calls.append(seed)
        return fit_spectrum(prepared, TWO_SHAPES, starts=[TWO_SHAPES_TRUTH], seed=seed)

    options = CheckOptions(
        gof_method="asymptotic", spurious_method="asimov", alternative=("ua2", "ua2_5", TWO_SHAPES)
    )
    without = choose_background(edges, counts, FIT_RANGE, options=options)
    assert without.chosen is None and not without.passed
    gof = {report.function: report.checks[0] for report in without.checks}
    assert gof and all(not check.passed for check in gof.values())
    assert without.trail[-1].startswith("no analytic function passed")

    decision = choose_background(edges, counts, FIT_RANGE, options=options, fallback=fallback)
    assert calls == [0]
    assert decision.fallback is not None
    assert decision.fallback.name == TWO_SHAPES.name
    fallback_report = decision.checks[-1]
    assert fallback_report.function == TWO_SHAPES.name
    assert fallback_report.checks[0].name == "goodness_of_fit"
    assert [check.name for check in fallback_report.checks] == [
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    ]
    assert fallback_report.checks[0].passed  # the analytic functions all failed it
    assert fallback_report.checks[1].passed
    assert "fallback fitted" in " ".join(decision.trail)
    assert decision.chosen in {None, TWO_SHAPES.name}
    assert decision.passed == fallback_report.passed


def test_whole_procedure_accepts_a_good_function_with_its_trail():
    counts = np.random.default_rng(21).poisson(expected_counts("ua2", 2.0e4)).astype(float)
    options = CheckOptions(spurious_method="asimov")
    decision = choose_background(EDGES, counts, FIT_RANGE, options=options, seed=4)
    assert decision.passed
    assert decision.chosen in {"p3", "p4", "p5", "p6"}
    assert decision.fit is not None and decision.fit.name == decision.chosen
    assert decision.checks[-1].passed and decision.checks[-1].function == decision.chosen
    assert {check.name for check in decision.checks[-1].checks} == {
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    }
    assert decision.trail[0].startswith("explicit fit range")
    assert decision.trail[1].startswith("ftest:")
    assert decision.fallback is None


def test_a_failing_fallback_is_recorded_and_nothing_is_chosen():
    counts = np.random.default_rng(22).poisson(expected_counts("p4", 1.0e5)).astype(float)
    # p4 data offered only p2 and p3: both fail the goodness of fit
    options = CheckOptions(spurious_method="asimov")

    def fallback(prepared: SpectrumFitProblem, seed: int) -> FitResult:
        raise FitDidNotConvergeError("symbolic regression found no expression")

    decision = choose_background(
        EDGES, counts, FIT_RANGE, functions=("p2", "p3"), options=options, fallback=fallback
    )
    assert decision.chosen is None and decision.fit is None and decision.fallback is None
    assert all(not report.passed for report in decision.checks)
    assert [report.function for report in decision.checks] == ["p3"]
    assert [row.name for row in decision.candidates] == ["p2", "p3"]
    assert not any(row.passed for row in decision.candidates)
    assert decision.trail[-1] == "the fallback failed: symbolic regression found no expression"


TRUTHS = {
    "p3": [10.0, -4.5],
    "p4": [10.0, -5.0, -0.7],
    "p5": [10.0, -5.0, -1.2, -0.2],
}
"""Falling truths over 300-8535 GeV whose highest term is measurable: the Asimov
2 delta NLL of the top parameter is 36 (p4 vs p3) at 1e4 events, 49 (p5 vs p4) at 1e6."""


def truth_toy(name: str, n_events: float, seed: int) -> np.ndarray:
    """Poisson toy of TRUTHS[name] with n_events above 300 GeV (nothing below)."""
    mu = bin_integrals(get_function(name), np.array([0.0, *TRUTHS[name]]), EDGES)
    first = int(np.searchsorted(EDGES, 300.0))
    mu[:first] = 0.0
    mu *= n_events / mu.sum()
    return np.random.default_rng(seed).poisson(mu).astype(float)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("truth", "n_events"),
    [
        ("p3", 1e4),
        ("p3", 1e5),
        ("p3", 1e6),
        ("p4", 1e4),
        ("p4", 1e5),
        ("p4", 1e6),
        ("p5", 1e6),
    ],
)
def test_choose_background_accepts_the_generating_function(truth, n_events):
    """The true function is chosen and passes every applicable check, no fallback needed.

    p5 only at 1e6 events: no falling p5 found whose ln^2 x term the data measure at 1e4
    or 1e5 events over 300-8535 GeV (the F-test then rightly stops at p4).
    """
    n_toys, accepted, fallbacks = 10, 0, 0
    rows = []
    for k in range(n_toys):
        seed = 1000 * int(np.log10(n_events)) + 10 * int(truth[1]) + k
        counts = truth_toy(truth, n_events, seed)

        def fallback(prepared: SpectrumFitProblem, seed: int) -> FitResult:
            raise FitDidNotConvergeError("counted, not run")

        decision = choose_background(
            EDGES, counts, stream_start_gev=300.0, fallback=fallback, seed=seed
        )
        fallbacks += int(any("calling the fallback" in line for line in decision.trail))
        row = next((row for row in decision.candidates if row.name == truth), None)
        ok = decision.chosen == truth and row is not None and row.passed
        ok = ok and all(check.status != "fail" for check in row.report.checks)
        accepted += int(ok)
        rows.append((decision.chosen, decision.trail[1:]))
    # >= 80 % of the toys (fixed seeds). The misses measured: the goodness of fit's own
    # 5 %, and at 1e5 p4 events a UA2+cubic that fits as well as p4 (delta AIC 2.6-3.2)
    # whose Asimov data give p4 spurious pulls of 1.1-1.5 at the lowest tested mass, so
    # the walk moves on to p5/p6: the check doing its job, about 1 toy in 6 there.
    assert accepted >= 8, rows
    assert fallbacks <= n_toys - accepted


@pytest.mark.slow
@pytest.mark.parametrize("n_events", [80.0, 1000.0, 1.0e5])
def test_false_upgrade_rate_of_the_nested_test_is_nominal(n_events):
    from bench.validate_ftest import false_upgrade_rates

    n_toys = 300
    result = false_upgrade_rates((n_events,), n_toys, methods=("ftest",), seed=7)
    row = result["sizes"][f"{n_events:g}"]["ftest"]
    # nominal 5 % within 3 binomial sigma (1.3 % for 300 toys)
    assert abs(row["rate"] - 0.05) <= 3 * row["binomial_sigma_at_nominal"], row
