"""Symbolic-regression fallback: safe parser, Poisson refit, backends and the HL-LHC case."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core import symbolic
from core.background import choose_background
from core.errors import InvalidInputError
from core.fit import fit_background, prepare_spectrum
from core.fitfunctions import bin_integrals
from core.symbolic import (
    FALLBACK_SEARCH,
    SearchOptions,
    fitted_formula,
    lift_constants,
    parse_expression,
    refit_expression,
    resolve_backend,
    substitute_constants,
    symbolic_background,
    symbolic_fallback,
    symbolic_fit,
)
from tests.spectra import EDGES, SQRT_S


def spectrum_from_density(density, n_events: float, fit_from: float, seed: int | None):
    """Poisson counts (or Asimov counts when seed is None) of a per-GeV density above fit_from."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    lower, upper = EDGES[:-1], np.minimum(EDGES[1:], SQRT_S)
    masses = (lower + upper)[:, None] / 2 + (upper - lower)[:, None] / 2 * nodes[None, :]
    shape = np.sum(density(masses / SQRT_S) * weights[None, :], axis=1) * (upper - lower) / 2
    shape[lower < fit_from] = 0.0
    expected = shape / shape.sum() * n_events
    if seed is None:
        return expected
    return np.random.default_rng(seed).poisson(expected).astype(float)


# --------------------------------------------------------------------------- parser


P4_TEXT = "c0 + c1 * ln1mx + (c2 + c3 * lnx) * lnx"


def test_known_analytic_expression_evaluates_exactly() -> None:
    """p4 written as text gives the same ln f as numpy, to 1e-12 (absolute)."""
    expression = parse_expression(P4_TEXT)
    assert expression.parameter_names == ("c0", "c1", "c2", "c3")
    x = np.linspace(0.01, 0.9, 50)
    constants = np.array([-3.0, 9.5, -4.2, -0.3])
    direct = (
        constants[0]
        + constants[1] * np.log1p(-x)
        + (constants[2] + constants[3] * np.log(x)) * np.log(x)
    )
    np.testing.assert_allclose(expression.log_density(x, constants), direct, atol=1e-12)
    np.testing.assert_allclose(
        expression.density(x * SQRT_S, constants, SQRT_S), np.exp(direct), rtol=1e-12
    )


def test_canonical_text_and_numbers_round_trip() -> None:
    """Text -> canonical text -> substituted numbers -> lifted constants keeps every value."""
    expression = parse_expression("c0 + c1*x^2 - exp(c2*lnx) / sqrt(c3 + ln1mx**2)")
    again = parse_expression(expression.text)
    assert again.text == expression.text
    constants = {"c0": 1.25, "c1": -0.1234567890123, "c2": 3.0, "c3": 2.5}
    with_numbers = substitute_constants(expression.text, constants)
    lifted, values = lift_constants(with_numbers)
    assert lifted.parameter_names == ("c0", "c1", "c2", "c3")
    np.testing.assert_array_equal(values, [1.25, -0.1234567890123, 3.0, 2.5])
    x = np.linspace(0.05, 0.5, 7)
    np.testing.assert_allclose(
        lifted.log_density(x, values),
        expression.log_density(x, [constants[name] for name in expression.parameter_names]),
        rtol=1e-14,
    )


def test_lift_constants_reads_pyoperon_output() -> None:
    """Numbers (with their signs) become c0, c1, ...; integer exponents stay fixed."""
    expression, values = lift_constants("((-8.061242) + (2.313941 * (((-2.597652) * lnx) ^ 2)))")
    assert expression.parameter_names == ("c0", "c1", "c2")
    np.testing.assert_array_equal(values, [-8.061242, 2.313941, -2.597652])
    assert "** 2" in expression.text


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('ls')",
        "__import__('os')",
        "x.__class__",
        "lnx.real",
        "os.system('ls')",
        "open('/etc/passwd')",
        "eval('1')",
        "y + x",
        "c + x",
        "lambda: 1",
        "[x for x in lnx]",
        "x[0]",
        "'text'",
        "True + x",
        "x if x else 1",
        "x < 1",
        "x & 1",
        "exp(x, 2)",
        "exp(x=1)",
        "exp(*x)",
        "x; x",
        "x = 1",
        "",
        "   ",
        "1e999 * x",
        "x" + " + x" * 3000,
    ],
)
def test_parser_rejects_anything_outside_the_whitelist(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_expression(text)


def test_lift_constants_rejects_named_constants_in_search_output() -> None:
    with pytest.raises(InvalidInputError, match="c0"):
        lift_constants("c0 + 1.5 * x")


def test_wrong_number_of_constants_is_an_error() -> None:
    with pytest.raises(InvalidInputError, match="2 values"):
        parse_expression(P4_TEXT).log_density(np.array([0.1]), [1.0, 2.0])


# --------------------------------------------------------------------------- Poisson refit


def test_refit_recovers_injected_constants_on_asimov_data() -> None:
    """Asimov counts of a p4-like law: shape constants recovered to 1e-4, deviance ~ 0."""
    truth = np.array([0.0, 9.0, -4.5, -0.25])
    expression = parse_expression(P4_TEXT)
    counts = spectrum_from_density(
        lambda x: np.exp(expression.log_density(x, truth)), 2e6, 300.0, None
    )
    problem = prepare_spectrum(EDGES, counts, (300.0, 8000.0))
    start = truth * np.array([1.0, 0.9, 1.1, 0.8]) + 0.3
    fit = refit_expression(problem, expression, start)
    # c0 is the normalisation again: redundant with p1, so p1 and three constants are free
    assert fit.n_free == 4
    assert fit.ndf == problem.n_used - 4
    assert fit.valid and fit.accurate_covariance
    assert fit.deviance < 1e-3  # Asimov data: only the quadrature differs (8 vs 6 points)
    np.testing.assert_allclose(fit.parameters[2:], truth[1:], rtol=1e-4)
    # the redundant c0 stays where its start put it: the user start or the least-squares
    # one, whichever reached the (equal, up to rounding) minimum first
    if fit.start.startswith("user start"):
        assert fit.parameters[1] == pytest.approx(start[0], abs=1e-6)
    else:
        assert fit.start.startswith("least squares")
    # ln p1 + c0 carries the normalisation: the fitted law integrates to the observed events
    shape_only = np.array([0.0, *fit.parameters[2:]])
    unit = np.sum(np.exp(expression.log_density(problem.nodes, shape_only)) * problem.weights)
    total = np.exp(fit.parameters[0] + fit.parameters[1]) * unit
    assert total == pytest.approx(problem.range_counts.sum(), rel=1e-6)


def test_redundant_constants_are_not_counted_as_free() -> None:
    """c1 (c2 lnx + c3 ln1mx) has one redundant constant: 3 free of 5, deviance unchanged."""
    truth = np.array([0.0, 9.0, -4.5])
    simple = parse_expression("c0 + c1 * ln1mx + c2 * lnx")
    counts = spectrum_from_density(
        lambda x: np.exp(simple.log_density(x, truth)), 1e6, 300.0, seed=3
    )
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    plain = refit_expression(problem, simple, truth)
    redundant = refit_expression(
        problem, "c0 + c1 * (c2 * ln1mx + c3 * lnx)", [0.0, 2.0, 4.0, -2.0]
    )
    assert (plain.n_free, redundant.n_free) == (3, 3)
    assert redundant.deviance == pytest.approx(plain.deviance, abs=1e-3)
    assert redundant.ndf == plain.ndf
    assert any("not determined by the data" in note for note in redundant.notes)


def test_wrapped_expression_matches_core_fit_integrals() -> None:
    """The BackgroundFunction of an expression gives the expected counts of its fit (1e-9)."""
    truth = np.array([0.0, 9.0, -4.5, -0.25])
    expression = parse_expression(P4_TEXT)
    counts = spectrum_from_density(
        lambda x: np.exp(expression.log_density(x, truth)), 1e6, 300.0, seed=4
    )
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    fit = refit_expression(problem, expression, truth)
    function = symbolic_background(expression, fit.parameters[1:])
    assert function.n_params == 5  # p1 and the four constants
    assert function.expression == expression.text
    wrapped = bin_integrals(function, fit.parameters, problem.range_edges, SQRT_S)
    constants = np.array(fit.parameters[1:])
    direct = np.exp(fit.parameters[0]) * expression.density(
        problem.nodes * SQRT_S, constants, SQRT_S
    )
    np.testing.assert_allclose(wrapped, (direct * problem.weights).sum(axis=1), rtol=1e-9)
    np.testing.assert_allclose(wrapped, fit.expected, rtol=1e-9)


def test_refit_keeps_a_constant_redundant_with_p1_at_its_start() -> None:
    """P4's c0 is redundant with the profiled p1: no step of the fit moves it.

    The least-squares start once walked it (and ln p1 the other way) by ~4482 on a 1e6-event
    spectrum: the same curve, but exp(ln p1) underflowed to 0.
    """
    truth = np.array([0.0, 9.0, -4.5, -0.25])
    expression = parse_expression(P4_TEXT)
    counts = spectrum_from_density(
        lambda x: np.exp(expression.log_density(x, truth)), 1e6, 300.0, seed=4
    )
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    for start in (truth, truth + np.array([2.0, 0.5, -0.3, 0.02])):
        fit = refit_expression(problem, expression, start)
        assert fit.n_free == 4
        assert fit.parameters[1] == pytest.approx(start[0], abs=1e-3)
        norm = np.exp(fit.parameters[0])
        assert np.isfinite(norm) and norm > 0
        # ln p1 + c0 is the fitted level: the law integrates to the observed events
        unit = np.sum(
            np.exp(expression.log_density(problem.nodes, np.array([0.0, *fit.parameters[2:]])))
            * problem.weights
        )
        level = np.exp(fit.parameters[0] + fit.parameters[1]) * unit
        assert level == pytest.approx(problem.range_counts.sum(), rel=1e-6)


# --------------------------------------------------------------------------- backends


def test_pysr_is_not_used_without_julia(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symbolic.shutil, "which", lambda name: None)
    for requested in ("auto", "pysr"):
        backend, message = resolve_backend(requested)
        assert backend == "pyoperon"
        assert "Julia" in message
        assert "falling back to pyoperon" in message


def test_pysr_needs_the_package_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symbolic.shutil, "which", lambda name: "/opt/julia/bin/julia")
    monkeypatch.setattr(symbolic.importlib.util, "find_spec", lambda name: None)
    backend, message = resolve_backend("auto")
    assert backend == "pyoperon"
    assert "not installed" in message


def test_explicit_pyoperon_and_unknown_backend() -> None:
    assert resolve_backend("pyoperon")[0] == "pyoperon"
    with pytest.raises(InvalidInputError, match="backend"):
        resolve_backend("eureqa")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- search


def two_component_counts(seed: int) -> np.ndarray:
    """HL-LHC-like: a steep (1-x)^10 x^-5 law plus a broad x^2 (1-x)^30 component, 1e7 events."""

    def density(x: np.ndarray) -> np.ndarray:
        return (1 - x) ** 10 * x**-5 + 1e9 * (1 - x) ** 30 * x**2

    return spectrum_from_density(density, 1e7, 300.0, seed)


@pytest.mark.slow
def test_symbolic_fallback_describes_what_no_power_law_does() -> None:
    """p5 and p6 fail GOF (p < 1e-10); the symbolic fit passes (p > 0.05), expression recorded."""
    counts = two_component_counts(seed=1)
    for name in ("p5", "p6"):
        analytic = fit_background(EDGES, counts, name, (300.0, None))
        assert analytic.p_value < 1e-10, name
    result = symbolic_fit(
        EDGES, counts, (300.0, None), seed=1, options=SearchOptions(backend="pyoperon")
    )
    fit = result.fit
    assert fit.valid
    assert fit.accurate_covariance
    assert fit.p_value > 0.05
    assert fit.deviance < analytic.deviance / 10
    # ndf counts p1 and the constant combinations the data determine, no more
    assert fit.ndf == fit.n_used - fit.n_free
    assert fit.n_free < fit.function.n_params
    assert any(result.expression in note for note in fit.notes)
    # the recorded text with its numbers reproduces the expected counts
    lifted, values = lift_constants(result.formula)
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    recomputed = np.sum(
        lifted.density(problem.nodes * SQRT_S, values, SQRT_S) * problem.weights, axis=1
    )
    np.testing.assert_allclose(recomputed, fit.expected, rtol=1e-8)
    chosen = result.candidates[result.chosen_index]
    assert chosen.converged
    assert chosen.criterion == min(c.criterion for c in result.candidates)


def test_search_is_reproducible_with_a_seed() -> None:
    """Same seed, same front and same fit; small budget on a p3-like spectrum."""
    counts = spectrum_from_density(lambda x: (1 - x) ** 8 * x**-4.5, 2e5, 300.0, seed=7)
    options = SearchOptions(population_size=60, generations=8, max_length=12)
    first = symbolic_fit(EDGES, counts, (300.0, None), seed=5, options=options)
    second = symbolic_fit(EDGES, counts, (300.0, None), seed=5, options=options)
    assert first.expression == second.expression
    assert first.constants == second.constants
    assert [c.expression for c in first.candidates] == [c.expression for c in second.candidates]
    assert first.fit.deviance == second.fit.deviance
    assert first.fit.p_value > 0.01  # a simple law is found at once
    assert first.backend == "pyoperon"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("edges", "counts", "fit_range", "message"),
    [
        (np.array([300.0]), np.array([]), None, "empty"),
        (EDGES, np.full(EDGES.size - 1, np.nan), None, "NaN"),
        (EDGES, -np.ones(EDGES.size - 1), None, "negative"),
        (EDGES, np.where(EDGES[:-1] < 1000, 5.0, 0.0), (2000.0, 5000.0), "zero"),
        (EDGES, np.ones(EDGES.size - 1), (20.0, 30.0), "outside"),
        (EDGES, np.ones(EDGES.size - 1), (300.0, 400.0), "non-empty bins"),
    ],
)
def test_bad_spectra_are_rejected(edges, counts, fit_range, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        symbolic_fit(
            edges, counts, fit_range, options=SearchOptions(generations=1, population_size=10)
        )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("population_size", 0),
        ("generations", 0),
        ("max_length", 1),
        ("seed", -1),
        ("selection", "aicc"),
    ],
)
def test_bad_search_options_are_rejected(option: str, value: object) -> None:
    counts = spectrum_from_density(lambda x: (1 - x) ** 8 * x**-4.5, 1e5, 300.0, seed=1)
    arguments = (
        {"seed": value} if option == "seed" else {"options": SearchOptions(**{option: value})}
    )
    with pytest.raises(InvalidInputError, match=option if option != "selection" else "selection"):
        symbolic_fit(EDGES, counts, (300.0, None), **arguments)  # type: ignore[arg-type]


def test_refit_rejects_wrong_start_values() -> None:
    counts = spectrum_from_density(lambda x: (1 - x) ** 8 * x**-4.5, 1e5, 300.0, seed=1)
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    with pytest.raises(InvalidInputError, match="start values"):
        refit_expression(problem, P4_TEXT, [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="start values"):
        refit_expression(problem, P4_TEXT, [1.0, 2.0, np.nan, 0.0])


# --------------------------------------------------------------------------- end to end


def two_component_density(x: np.ndarray) -> np.ndarray:
    return (1 - x) ** 10 * x**-5 + 1e9 * (1 - x) ** 30 * x**2


@pytest.mark.slow
def test_choose_background_falls_back_to_a_symbolic_expression_that_passes_every_check() -> None:
    """No p2..p6 passes GOF on 2e6 two-shape events; the symbolic fallback is chosen.

    Data exist down to 250 GeV but the range asked for starts at 300 GeV, so the fit-start
    check moves the start up only. Every robustness check runs on the expression; the
    spurious-signal test is offered the runner-up expressions, since ua2 / ua2_5 do not
    describe these data either.
    """
    counts = spectrum_from_density(two_component_density, 2e6, 250.0, seed=1)
    decision = choose_background(
        EDGES,
        counts,
        (300.0, None),
        fallback=symbolic_fallback(replace(FALLBACK_SEARCH, backend="pyoperon")),
        seed=1,
    )
    analytic = {row.name: row for row in decision.candidates if row.source == "nested"}
    assert set(analytic) == {"p2", "p3", "p4", "p5", "p6"}
    assert all(row.fit.p_value < 0.05 and not row.passed for row in analytic.values())
    assert decision.candidates[-1].source == "fallback" and decision.candidates[-1].passed
    fit = decision.fit
    assert decision.passed and fit is not None
    assert decision.fallback is fit
    assert decision.chosen == fit.name and fit.name.startswith("symbolic: ")
    expression = fit.function.expression
    assert expression is not None and fit.name == f"symbolic: {expression}"
    assert fit.valid and fit.accurate_covariance
    assert fit.p_value > 0.05
    # the expression, its numbers and its checks are in the decision trail
    trail = "\n".join(decision.trail)
    assert f"fallback fitted symbolic: {expression}" in trail
    assert f"symbolic: {expression} passes every check" in trail
    assert "fitted: ln f = " in trail
    report = decision.checks[-1]
    assert report.function == fit.name and report.passed
    checks = {check.name: check for check in report.checks}
    assert list(checks) == [
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    ]
    # the range asked for starts at 300 GeV: the start moves up only, never below it
    assert checks["fit_start_stability"].numbers["converged_plus"] == 1.0
    assert "converged_minus" not in checks["fit_start_stability"].numbers
    spurious = checks["spurious_signal"]
    # ua2 / ua2_5 do not describe these data; the runner-up expressions are offered, and
    # are used when they fit about as well (delta AIC <= 4), else the check says why not
    assert "symbolic: " in spurious.message
    if spurious.status == "pass":
        assert spurious.numbers["alternative_p_value"] > 0.05
    else:
        assert spurious.status == "not_applicable" and "delta AIC" in spurious.message
    # the recorded text with its numbers reproduces the expected counts
    lifted, values = lift_constants(fitted_formula(fit))
    problem = prepare_spectrum(EDGES, counts, (300.0, None))
    recomputed = np.sum(
        lifted.density(problem.nodes * SQRT_S, values, SQRT_S) * problem.weights, axis=1
    )
    np.testing.assert_allclose(recomputed, fit.expected, rtol=1e-8)
