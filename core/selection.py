"""Choice of the background function: F-test (or Wilks) along the nested family, then checks.

PHYSICS.md section 5: fit p_n and p_(n+1) and take the smallest n whose extension is not
significant at CL 0.05. The F statistic is
F = (chi2_n - chi2_(n+1)) / (chi2_(n+1) / (N_bins - n - 1)) with chi2 the Baker-Cousins
likelihood chi2 (the Poisson deviance; Pearson's chi2 as an option), compared with the
F(1, N_bins - n - 1) law; Wilks' test compares 2 (NLL_n - NLL_(n+1)) with chi2(1). The
whole procedure (`choose_background`) then runs the robustness checks on the choice,
moves up the family while they fail, and calls a fallback (symbolic regression) last.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from core.errors import FitError, InvalidInputError
from core.fit import FitResult, SpectrumFitProblem, fit_spectrum, prepare_spectrum
from core.fitfunctions import (
    ALTERNATIVE_FUNCTIONS,
    NESTED_FAMILY,
    BackgroundFunction,
    get_function,
    nested_start,
)
from core.robustness import GofMethod, RobustnessReport, SpuriousMethod, robustness_checks

TestMethod = Literal["ftest", "wilks"]
Chi2Kind = Literal["deviance", "pearson"]


@dataclass(frozen=True, eq=False)
class FallbackFit:
    """What a fallback returns: its fit, rival shapes and lines for the decision trail.

    `alternatives` are other functions that describe the same data (e.g. the runner-up
    symbolic expressions); the spurious-signal test of the fallback draws its toys from
    the first one that fits with p > alpha, after the analytic alternatives.
    """

    fit: FitResult
    alternatives: tuple[BackgroundFunction, ...] = ()
    notes: tuple[str, ...] = ()


Fallback = Callable[[SpectrumFitProblem, int], FitResult | FallbackFit]
"""A last-resort background model: given the prepared spectrum and a seed, a converged fit
(e.g. a symbolic-regression expression refitted with the same likelihood), alone or with
its rivals as a `FallbackFit`."""


@dataclass(frozen=True)
class NestedTest:
    """One comparison of a function with its one-parameter extension."""

    lower: str
    higher: str
    method: TestMethod
    chi2_kind: Chi2Kind
    n_bins: int
    chi2_lower: float
    chi2_higher: float
    test_statistic: float
    p_value: float
    significant: bool
    note: str = ""


@dataclass(frozen=True, eq=False)
class FunctionChoice:
    """The function chosen by the nested tests, with every fit and test that led to it."""

    chosen: str | None
    fit: FitResult | None
    tests: tuple[NestedTest, ...]
    fits: Mapping[str, FitResult]
    failures: Mapping[str, str]
    reason: str


def nested_test(
    lower: FitResult,
    higher: FitResult,
    *,
    method: TestMethod = "ftest",
    chi2_kind: Chi2Kind = "deviance",
    alpha: float = 0.05,
) -> NestedTest:
    """Test whether the one-parameter extension `higher` of `lower` is significant."""
    if higher.function.n_params != lower.function.n_params + 1:
        raise InvalidInputError(
            f"a nested test compares n and n+1 parameters; {lower.name} has "
            f"{lower.function.n_params} and {higher.name} {higher.function.n_params}"
        )
    if lower.n_used != higher.n_used or lower.fit_range != higher.fit_range:
        raise InvalidInputError(
            f"{lower.name} and {higher.name} were fitted to different bins "
            f"({lower.fit_range} vs {higher.fit_range} GeV); compare fits of one spectrum"
        )
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must lie in (0, 1), got {alpha}")
    chi2_lower, chi2_higher = (
        (lower.deviance, higher.deviance) if chi2_kind == "deviance" else (lower.chi2, higher.chi2)
    )
    note = ""
    if method == "ftest":
        difference = chi2_lower - chi2_higher
        if difference < 0:
            note = f"chi2 rose by {-difference:.3g} with the extra parameter; F set to 0"
            difference = 0.0
        ndf = higher.ndf
        statistic = difference / (chi2_higher / ndf) if chi2_higher > 0 else np.inf
        p_value = float(stats.f.sf(statistic, 1, ndf))
    else:
        statistic = 2.0 * (lower.nll - higher.nll)
        if statistic < 0:
            note = f"NLL rose by {-statistic / 2:.3g} with the extra parameter; set to 0"
            statistic = 0.0
        p_value = float(stats.chi2.sf(statistic, 1))
    return NestedTest(
        lower=lower.name,
        higher=higher.name,
        method=method,
        chi2_kind=chi2_kind,
        n_bins=higher.n_used,
        chi2_lower=float(chi2_lower),
        chi2_higher=float(chi2_higher),
        test_statistic=float(statistic),
        p_value=p_value,
        significant=p_value < alpha,
        note=note,
    )


def _nested_chain(functions: Sequence[BackgroundFunction | str]) -> list[BackgroundFunction]:
    chain = [get_function(item) if isinstance(item, str) else item for item in functions]
    if len(chain) < 2:
        raise InvalidInputError(
            f"choosing a function needs at least two nested functions, got {len(chain)}"
        )
    for lower, higher in itertools.pairwise(chain):
        if higher.n_params != lower.n_params + 1 or (
            nested_start(lower, np.asarray(lower.start), higher) is None
        ):
            raise InvalidInputError(
                f"{higher.name} is not a one-parameter extension of {lower.name}; give a "
                f"consecutive part of the nested family {NESTED_FAMILY}"
            )
    return chain


def select_function(
    problem: SpectrumFitProblem,
    functions: Sequence[BackgroundFunction | str] = NESTED_FAMILY,
    *,
    method: TestMethod = "ftest",
    chi2_kind: Chi2Kind = "deviance",
    alpha: float = 0.05,
    seed: int = 0,
) -> FunctionChoice:
    """Fit the nested functions in order and stop at the first non-significant extension.

    Each fit starts from the previous one. A function that does not converge is recorded;
    when the extension of the current choice fails, the current choice stands. `chosen` is
    None only when no function converges.
    """
    chain = _nested_chain(functions)
    rng = np.random.default_rng(seed)
    fits: dict[str, FitResult] = {}
    failures: dict[str, str] = {}
    tests: list[NestedTest] = []
    current: FitResult | None = None
    reason = ""
    for function in chain:
        try:
            result = fit_spectrum(problem, function, lower=current, seed=rng)
        except FitError as error:
            failures[function.name] = str(error)
            if current is not None:
                reason = (
                    f"{function.name} did not converge, so {current.name} stands "
                    "(its extension could not be tested)"
                )
                break
            continue
        fits[function.name] = result
        if current is None:
            current = result
            continue
        if current.function.n_params + 1 != function.n_params:
            reason = f"{current.name} kept: the next converged function is {function.name}"
            break
        test = nested_test(current, result, method=method, chi2_kind=chi2_kind, alpha=alpha)
        tests.append(test)
        if not test.significant:
            reason = (
                f"{test.higher} does not improve {test.lower} significantly "
                f"(p = {test.p_value:.3g} >= {alpha})"
            )
            break
        current = result
    else:
        if current is not None:
            reason = (
                f"every extension up to {current.name} is significant; {current.name} is the "
                "largest function tried"
            )
    if current is None:
        reason = "no function converged"
    return FunctionChoice(
        chosen=None if current is None else current.name,
        fit=current,
        tests=tuple(tests),
        fits=fits,
        failures=failures,
        reason=reason,
    )


@dataclass(frozen=True)
class CheckOptions:
    """Settings of the robustness checks run by `choose_background`.

    `fallback_spurious_method` is the spurious-signal method for the fallback's fit (None:
    `spurious_method`).
    """

    alternative: tuple[str | BackgroundFunction, ...] = ALTERNATIVE_FUNCTIONS
    window: tuple[float, float] | None = None
    gof_method: GofMethod = "auto"
    n_gof_toys: int = 100
    spurious_method: SpuriousMethod = "toys"
    fallback_spurious_method: SpuriousMethod | None = None
    n_spurious_toys: int = 50
    spurious_masses: tuple[float, ...] | None = None
    width_fraction: float = 1.0
    alpha: float = 0.05


def run_checks(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    options: CheckOptions,
    *,
    rivals: Sequence[BackgroundFunction] = (),
    spurious_method: SpuriousMethod | None = None,
    seed: int = 0,
) -> RobustnessReport:
    """Run core.robustness.robustness_checks on `fit` (edges in GeV) with these `options`.

    `rivals` are further alternative shapes for the spurious-signal test, after
    `options.alternative`; `spurious_method` replaces `options.spurious_method` when given.
    """
    return robustness_checks(
        edges,
        counts,
        fit,
        alternative=(*options.alternative, *rivals),
        window=options.window,
        gof_method=options.gof_method,
        n_gof_toys=options.n_gof_toys,
        spurious_method=options.spurious_method if spurious_method is None else spurious_method,
        n_spurious_toys=options.n_spurious_toys,
        spurious_masses=options.spurious_masses,
        width_fraction=options.width_fraction,
        alpha=options.alpha,
        seed=seed,
    )


@dataclass(frozen=True, eq=False)
class BackgroundDecision:
    """The accepted background of one spectrum and the trail of decisions behind it.

    `chosen` is None when neither an analytic function nor the fallback passed the checks.
    """

    chosen: str | None
    fit: FitResult | None
    selection: FunctionChoice
    checks: tuple[RobustnessReport, ...]
    fallback: FitResult | None
    trail: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True when a background passed every robustness check."""
        return self.chosen is not None


def choose_background(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    functions: Sequence[BackgroundFunction | str] = NESTED_FAMILY,
    method: TestMethod = "ftest",
    chi2_kind: Chi2Kind = "deviance",
    options: CheckOptions | None = None,
    fallback: Fallback | None = None,
    seed: int = 0,
) -> BackgroundDecision:
    """The whole procedure for one spectrum: nested tests, robustness checks, fallback.

    The function chosen by the nested tests is checked first; while it fails a check the
    next larger function of `functions` is fitted and checked; when none passes and a
    `fallback` is given, its fit goes through the same checks. With `options.window` (a
    window the bump hunt flagged, GeV) every fit leaves that window out (PHYSICS.md 5).
    """
    settings = options or CheckOptions()
    problem = prepare_spectrum(edges, counts, fit_range, sqrt_s=sqrt_s, exclude=settings.window)
    edge_values = np.asarray(edges, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    selection = select_function(
        problem, functions, method=method, chi2_kind=chi2_kind, alpha=settings.alpha, seed=seed
    )
    trail = [f"{method}: {selection.reason}"]
    if settings.window is not None:
        low, high = settings.window
        trail.insert(0, f"fits exclude the flagged window {low:.0f}-{high:.0f} GeV")
    trail += [f"{name} did not converge: {text}" for name, text in selection.failures.items()]
    reports: list[RobustnessReport] = []

    def checked(
        fit: FitResult,
        offset: int,
        rivals: tuple[BackgroundFunction, ...] = (),
        spurious_method: SpuriousMethod = settings.spurious_method,
    ) -> bool:
        report = run_checks(
            edge_values,
            count_values,
            fit,
            settings,
            rivals=rivals,
            spurious_method=spurious_method,
            seed=seed + offset,
        )
        reports.append(report)
        verdict = "passes every check" if report.passed else f"fails {', '.join(report.failed)}"
        trail.append(f"{fit.name} {verdict}")
        return report.passed

    if selection.fit is not None:
        chain = _nested_chain(functions)
        names = [function.name for function in chain]
        current = selection.fit
        index = names.index(current.name)
        while not checked(current, index):
            following: FitResult | None = None
            while following is None and index + 1 < len(chain):
                index += 1
                following = selection.fits.get(names[index])
                if following is None:
                    try:
                        following = fit_spectrum(problem, chain[index], lower=current, seed=seed)
                    except FitError as error:
                        trail.append(f"{names[index]} did not converge: {error}")
            if following is None:
                break
            trail.append(f"trying {following.name} after {current.name} failed its checks")
            current = following
        else:
            return BackgroundDecision(
                current.name, current, selection, tuple(reports), None, tuple(trail)
            )
    if fallback is None:
        trail.append("no analytic function passed and no fallback was given")
        return BackgroundDecision(None, None, selection, tuple(reports), None, tuple(trail))
    trail.append("no analytic function passed; calling the fallback")
    try:
        outcome = fallback(problem, seed)
    except FitError as error:
        trail.append(f"the fallback failed: {error}")
        return BackgroundDecision(None, None, selection, tuple(reports), None, tuple(trail))
    if isinstance(outcome, FitResult):
        outcome = FallbackFit(outcome)
    fallback_fit = outcome.fit
    trail.append(f"fallback fitted {fallback_fit.name}")
    trail.extend(outcome.notes)
    fallback_method = settings.fallback_spurious_method or settings.spurious_method
    if fallback_method != settings.spurious_method:
        trail.append(f"spurious-signal test of the fallback with {fallback_method} data")
    if checked(fallback_fit, 100, outcome.alternatives, fallback_method):
        return BackgroundDecision(
            fallback_fit.name, fallback_fit, selection, tuple(reports), fallback_fit, tuple(trail)
        )
    return BackgroundDecision(None, None, selection, tuple(reports), fallback_fit, tuple(trail))
