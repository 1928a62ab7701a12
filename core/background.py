"""Choice of the background function: F-test (or Wilks) along the nested family, then checks.

PHYSICS.md section 5: fit p_n and p_(n+1) and take the smallest n whose extension is not
significant at CL 0.05. The F statistic is
F = (chi2_n - chi2_(n+1)) / (chi2_(n+1) / (N_bins - n - 1)) with chi2 the Baker-Cousins
likelihood chi2 (the Poisson deviance; Pearson's chi2 as an option), compared with the
F(1, N_bins - n - 1) law; Wilks' test compares 2 (NLL_n - NLL_(n+1)) with chi2(1). The
whole procedure (`choose_background`) then runs the robustness checks on the choice,
moves up the family while they fail, and calls a fallback (symbolic regression) last.

Rules beyond the plain F-test (measured in bench/validate_ftest.py and
tests/core/test_background.py; the numbers are in docs/physics-notes.md):

- F-test at low counts. The F statistic divides by chi2_(n+1) / ndf, which is ~1 only
  when every bin expects many events; a bin with mu << 1 adds ~2 mu to the deviance and 1
  to ndf, so over many sparse bins the denominator shrinks and F grows, and the F-test
  upgrades far more often than its nominal 5 %. When more than `SMALL_BIN_FRACTION` = 20 %
  of the bins of the lower fit expect fewer than 5 events (the switch the goodness-of-fit
  check uses), the comparison uses Wilks' likelihood ratio, whose chi2(1) law needs no
  per-bin asymptotics, only enough events to determine the extra parameter; the test row
  records the switch. With the range ending at the fixed upper mass the switch applies in
  most spectra: the empty tail is > 20 % of the bins.
- A fit whose density rises with mass inside the range (`falling_background`) is not
  usable: the nested walk treats it as a function that did not converge (recorded in
  `failures` with the reason), and the check fails it.
- Fit range: `choose_background` takes the stream's start (`stream_start_gev`) and
  derives the range with `core.fitrange.fit_range` (start past the turn-on, fixed upper mass),
  or an explicit range; the range is recorded in the decision. The fit-start stability
  check moves the start only within that range (up only, unless the range starts above
  the stream's start).
- `candidates`: one row per function tried (nested fits, those of the walk, the
  fallback), with its fit, its nested tests, its checks (or why it was not checked) and
  `passed`. A policy may choose any candidate with `passed` True.
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
from core.fitrange import FitRange
from core.fitrange import fit_range as derive_fit_range
from core.robustness import (
    AlternativeCache,
    GofMethod,
    RobustnessReport,
    SpuriousMethod,
    falling_background,
    robustness_checks,
)

TestMethod = Literal["ftest", "wilks"]
Chi2Kind = Literal["deviance", "pearson"]

SMALL_BIN_FRACTION = 0.2
"""F-test -> Wilks when more than this fraction of bins expect < `SMALL_COUNT` events."""
SMALL_COUNT = 5.0


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
    requested_method: TestMethod | None = None
    small_bin_fraction: float = 0.0


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
    small_fraction_switch: float | None = None,
) -> NestedTest:
    """Test whether the one-parameter extension `higher` of `lower` is significant.

    With `small_fraction_switch` set, an F-test becomes Wilks' test when more than that
    fraction of the bins of `lower` expect fewer than 5 events (module docstring); the
    row keeps the `requested_method` and the `small_bin_fraction`.
    """
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
    small_fraction = float(np.mean(lower.expected[lower.used] < SMALL_COUNT))
    used_method = method
    notes = []
    if (
        method == "ftest"
        and small_fraction_switch is not None
        and small_fraction > small_fraction_switch
    ):
        used_method = "wilks"
        notes.append(
            f"{small_fraction:.0%} of the bins expect < {SMALL_COUNT:g} events (more than "
            f"{small_fraction_switch:.0%}): Wilks' test instead of the F-test"
        )
    if used_method == "ftest":
        difference = chi2_lower - chi2_higher
        if difference < 0:
            notes.append(f"chi2 rose by {-difference:.3g} with the extra parameter; F set to 0")
            difference = 0.0
        ndf = higher.ndf
        statistic = difference / (chi2_higher / ndf) if chi2_higher > 0 else np.inf
        p_value = float(stats.f.sf(statistic, 1, ndf))
    else:
        statistic = 2.0 * (lower.nll - higher.nll)
        if statistic < 0:
            notes.append(f"NLL rose by {-statistic / 2:.3g} with the extra parameter; set to 0")
            statistic = 0.0
        p_value = float(stats.chi2.sf(statistic, 1))
    return NestedTest(
        lower=lower.name,
        higher=higher.name,
        method=used_method,
        chi2_kind=chi2_kind,
        n_bins=higher.n_used,
        chi2_lower=float(chi2_lower),
        chi2_higher=float(chi2_higher),
        test_statistic=float(statistic),
        p_value=p_value,
        significant=p_value < alpha,
        note="; ".join(notes),
        requested_method=method,
        small_bin_fraction=small_fraction,
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


def _usable_fit(
    problem: SpectrumFitProblem,
    function: BackgroundFunction,
    current: FitResult | None,
    rng: np.random.Generator,
    fits: dict[str, FitResult],
    failures: dict[str, str],
) -> tuple[FitResult | None, str]:
    """The fit of `function` from `current` when it converges and falls with mass.

    A converged fit enters `fits`, a failure `failures`; an unusable fit gives None and the
    reason why `current` stands (empty when there is no current choice).
    """
    try:
        result = fit_spectrum(problem, function, lower=current, seed=rng)
    except FitError as error:
        failures[function.name] = str(error)
        if current is None:
            return None, ""
        return None, (
            f"{function.name} did not converge, so {current.name} stands "
            "(its extension could not be tested)"
        )
    fits[function.name] = result
    rising = falling_background(problem, result)
    if not rising.passed:
        failures[function.name] = rising.message
        if current is None:
            return None, ""
        return None, (
            f"{function.name} rises with mass in the range, so {current.name} stands "
            "(its extension is not usable)"
        )
    return result, ""


def select_function(
    problem: SpectrumFitProblem,
    functions: Sequence[BackgroundFunction | str] = NESTED_FAMILY,
    *,
    method: TestMethod = "ftest",
    chi2_kind: Chi2Kind = "deviance",
    alpha: float = 0.05,
    seed: int = 0,
    small_fraction_switch: float | None = SMALL_BIN_FRACTION,
) -> FunctionChoice:
    """Fit the nested functions in order and stop at the first non-significant extension.

    Each fit starts from the previous one. A function that does not converge, or whose
    density rises with mass in the range, is recorded in `failures` (a rising fit also in
    `fits`); when the extension of the current choice fails, the current choice stands.
    `chosen` is None only when no usable function converges. The F-test becomes Wilks'
    test at low counts (`small_fraction_switch`, module docstring).
    """
    chain = _nested_chain(functions)
    rng = np.random.default_rng(seed)
    fits: dict[str, FitResult] = {}
    failures: dict[str, str] = {}
    tests: list[NestedTest] = []
    current: FitResult | None = None
    reason = ""
    for function in chain:
        result, unusable = _usable_fit(problem, function, current, rng, fits, failures)
        if result is None:
            if current is not None:
                reason = unusable
                break
            continue
        if current is None:
            current = result
            continue
        if current.function.n_params + 1 != function.n_params:
            reason = f"{current.name} kept: the next converged function is {function.name}"
            break
        test = nested_test(
            current,
            result,
            method=method,
            chi2_kind=chi2_kind,
            alpha=alpha,
            small_fraction_switch=small_fraction_switch,
        )
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
        reason = "no usable function converged"
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
    `spurious_method`). The spurious signal runs on the alternative's Asimov data by
    default (its pull is the toys' median without their noise, ~30x cheaper), which keeps
    `choose_background` within the scan's budget (bench/bench_fits.py).
    """

    alternative: tuple[str | BackgroundFunction, ...] = ALTERNATIVE_FUNCTIONS
    window: tuple[float, float] | None = None
    gof_method: GofMethod = "auto"
    n_gof_toys: int = 100
    spurious_method: SpuriousMethod = "asimov"
    fallback_spurious_method: SpuriousMethod | None = None
    n_spurious_toys: int = 50
    spurious_masses: tuple[float, ...] | None = None
    width_fraction: float = 1.0
    alpha: float = 0.05
    n_linear_toys: int = 1000


def run_checks(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    options: CheckOptions,
    *,
    rivals: Sequence[BackgroundFunction] = (),
    spurious_method: SpuriousMethod | None = None,
    seed: int = 0,
    floor_bin: int | None = None,
    alternative_cache: AlternativeCache | None = None,
) -> RobustnessReport:
    """Run core.robustness.robustness_checks on `fit` (edges in GeV) with these `options`.

    `rivals` are further alternative shapes for the spurious-signal test, after
    `options.alternative`; `spurious_method` replaces `options.spurious_method` when given;
    `floor_bin` is the lowest bin the fit-start stability check may start at.
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
        floor_bin=floor_bin,
        n_linear_toys=options.n_linear_toys,
        alternative_cache=alternative_cache,
    )


CandidateSource = Literal["nested", "fallback"]


@dataclass(frozen=True, eq=False)
class Candidate:
    """One function tried for a spectrum: its fit, nested tests, checks and verdict.

    `test_from_lower` compares it with the next smaller function, `test_to_higher` with the
    next larger one (None when that was not fitted). `report` is None when the function was
    not checked (`note` says why); `passed` is True only for a checked function that passed
    every applicable check.
    """

    fit: FitResult
    source: CandidateSource
    test_from_lower: NestedTest | None
    test_to_higher: NestedTest | None
    report: RobustnessReport | None
    note: str = ""

    @property
    def name(self) -> str:
        """Name of the function (or its symbolic expression's name)."""
        return self.fit.name

    @property
    def passed(self) -> bool:
        """True when the function was checked and passed every applicable check."""
        return self.report is not None and self.report.passed


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
    candidates: tuple[Candidate, ...] = field(default=())
    fit_range: FitRange | None = None

    @property
    def passed(self) -> bool:
        """True when a background passed every robustness check."""
        return self.chosen is not None


def _resolve_range(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None,
    stream_start_gev: float | None,
    upper_gev: float | None,
    sqrt_s: float,
) -> FitRange:
    """The fit range of `choose_background`: derived from the stream start, or explicit."""
    edge_values = np.asarray(edges, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    if fit_range is None and stream_start_gev is not None:
        return derive_fit_range(
            edge_values, count_values, stream_start_gev, upper_gev=upper_gev, sqrt_s=sqrt_s
        )
    low, high = (None, None) if fit_range is None else fit_range
    if high is None and upper_gev is not None:
        high = upper_gev
    problem = prepare_spectrum(
        edge_values, count_values, None if low is None else (low, high), sqrt_s=sqrt_s
    )
    floor = problem.first_bin
    if stream_start_gev is not None:
        floor = min(floor, int(np.searchsorted(edge_values, stream_start_gev * (1 - 1e-12))))
    lo, hi = problem.fit_range
    return FitRange(
        first_bin=problem.first_bin,
        stop_bin=problem.stop_bin,
        lo_gev=lo,
        hi_gev=hi,
        floor_bin=floor,
        turn_on_bin=None,
        n_above=float(count_values[problem.stop_bin :].sum()),
        reason=f"explicit fit range [{lo:.0f}, {hi:.0f}] GeV"
        + (" (upper end: the fixed default 0.65 sqrt_s)" if high is None else ""),
    )


def choose_background(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    stream_start_gev: float | None = None,
    upper_gev: float | None = None,
    sqrt_s: float = 13000.0,
    functions: Sequence[BackgroundFunction | str] = NESTED_FAMILY,
    method: TestMethod = "ftest",
    chi2_kind: Chi2Kind = "deviance",
    options: CheckOptions | None = None,
    fallback: Fallback | None = None,
    seed: int = 0,
) -> BackgroundDecision:
    """The whole procedure for one spectrum: fit range, nested tests, checks, fallback.

    The range: with `stream_start_gev` and no `fit_range`, `core.fitrange.fit_range` (start past
    the turn-on, fixed upper mass `upper_gev`, default 0.65 sqrt_s); otherwise the explicit
    `fit_range` [lo, hi] GeV (hi None: `upper_gev` or the default upper mass). The function
    chosen by the nested tests is checked first; while it fails a check the next larger
    function of `functions` is fitted and checked; when none passes and a `fallback` is
    given, its fit goes through the same checks. With `options.window` (a window the bump
    hunt flagged, GeV) every fit leaves that window out (PHYSICS.md 5). Every function
    tried is a row of `candidates`.
    """
    settings = options or CheckOptions()
    chosen_range = _resolve_range(edges, counts, fit_range, stream_start_gev, upper_gev, sqrt_s)
    problem = prepare_spectrum(
        edges, counts, chosen_range.bounds, sqrt_s=sqrt_s, exclude=settings.window
    )
    selection = select_function(
        problem, functions, method=method, chi2_kind=chi2_kind, alpha=settings.alpha, seed=seed
    )
    trail = [chosen_range.reason, f"{method}: {selection.reason}"]
    if settings.window is not None:
        low, high = settings.window
        trail.insert(0, f"fits exclude the flagged window {low:.0f}-{high:.0f} GeV")
    trail += [f"{name} not usable: {text}" for name, text in selection.failures.items()]
    nested_fits: dict[str, FitResult] = dict(selection.fits)
    checks = _Checks(
        np.asarray(edges, dtype=np.float64),
        np.asarray(counts, dtype=np.float64),
        settings,
        seed,
        chosen_range.floor_bin,
        trail,
    )
    chain = _nested_chain(functions)
    accepted: FitResult | None = None
    if selection.fit is not None:
        accepted = _accepted_nested_fit(problem, chain, selection.fit, nested_fits, checks, seed)
    fallback_fit: FitResult | None = None
    if accepted is None and fallback is None:
        trail.append("no analytic function passed and no fallback was given")
    elif accepted is None and fallback is not None:
        accepted, fallback_fit = _fallback_choice(problem, fallback, checks, seed)
    candidates = _candidates(
        [function.name for function in chain],
        nested_fits,
        selection,
        checks.report_of,
        fallback_fit,
        method,
        chi2_kind,
        settings.alpha,
    )
    return BackgroundDecision(
        chosen=None if accepted is None else accepted.name,
        fit=accepted,
        selection=selection,
        checks=tuple(checks.reports),
        fallback=fallback_fit,
        trail=tuple(trail),
        candidates=candidates,
        fit_range=chosen_range,
    )


@dataclass
class _Checks:
    """The robustness checks of one `choose_background` call and what they found.

    Every report is kept in order, by function name, and as a line of `trail`; the
    alternative fits are shared between the checks through `alternative_cache`.
    """

    edges: npt.NDArray[np.float64]
    counts: npt.NDArray[np.float64]
    settings: CheckOptions
    seed: int
    floor_bin: int
    trail: list[str]
    reports: list[RobustnessReport] = field(default_factory=list)
    report_of: dict[str, RobustnessReport] = field(default_factory=dict)
    alternative_cache: AlternativeCache = field(default_factory=dict)

    def passes(
        self,
        fit: FitResult,
        offset: int,
        rivals: tuple[BackgroundFunction, ...] = (),
        spurious_method: SpuriousMethod | None = None,
    ) -> bool:
        """Check `fit` (seed + `offset`); True when it passes every applicable check."""
        report = run_checks(
            self.edges,
            self.counts,
            fit,
            self.settings,
            rivals=rivals,
            spurious_method=spurious_method or self.settings.spurious_method,
            seed=self.seed + offset,
            floor_bin=self.floor_bin,
            alternative_cache=self.alternative_cache,
        )
        self.reports.append(report)
        self.report_of[fit.name] = report
        verdict = "passes every check" if report.passed else f"fails {', '.join(report.failed)}"
        skipped = [check.name for check in report.checks if check.status == "not_applicable"]
        if skipped:
            verdict += f" ({', '.join(skipped)} not applicable)"
        self.trail.append(f"{fit.name} {verdict}")
        return report.passed


def _accepted_nested_fit(
    problem: SpectrumFitProblem,
    chain: Sequence[BackgroundFunction],
    chosen: FitResult,
    nested_fits: dict[str, FitResult],
    checks: _Checks,
    seed: int,
) -> FitResult | None:
    """The first function from the nested tests' choice up that passes every check.

    A larger function not fitted yet is fitted from the one below (and added to
    `nested_fits`); one that does not converge is skipped. None when none passes.
    """
    names = [function.name for function in chain]
    current = chosen
    index = names.index(current.name)
    while not checks.passes(current, index):
        following: FitResult | None = None
        while following is None and index + 1 < len(chain):
            index += 1
            following = nested_fits.get(names[index])
            if following is None:
                try:
                    following = fit_spectrum(problem, chain[index], lower=current, seed=seed)
                except FitError as error:
                    checks.trail.append(f"{names[index]} did not converge: {error}")
                else:
                    nested_fits[names[index]] = following
        if following is None:
            return None
        checks.trail.append(f"trying {following.name} after {current.name} failed its checks")
        current = following
    return current


def _fallback_choice(
    problem: SpectrumFitProblem, fallback: Fallback, checks: _Checks, seed: int
) -> tuple[FitResult | None, FitResult | None]:
    """(accepted fit, fallback fit): the fallback's fit, accepted when it passes every check."""
    trail = checks.trail
    trail.append("no analytic function passed; calling the fallback")
    try:
        outcome = fallback(problem, seed)
    except FitError as error:
        trail.append(f"the fallback failed: {error}")
        return None, None
    if isinstance(outcome, FitResult):
        outcome = FallbackFit(outcome)
    fallback_fit = outcome.fit
    trail.append(f"fallback fitted {fallback_fit.name}")
    trail.extend(outcome.notes)
    settings = checks.settings
    fallback_method = settings.fallback_spurious_method or settings.spurious_method
    if fallback_method != settings.spurious_method:
        trail.append(f"spurious-signal test of the fallback with {fallback_method} data")
    if checks.passes(fallback_fit, 100, outcome.alternatives, fallback_method):
        return fallback_fit, fallback_fit
    return None, fallback_fit


def _candidates(
    names: Sequence[str],
    nested_fits: Mapping[str, FitResult],
    selection: FunctionChoice,
    report_of: Mapping[str, RobustnessReport],
    fallback_fit: FitResult | None,
    method: TestMethod,
    chi2_kind: Chi2Kind,
    alpha: float,
) -> tuple[Candidate, ...]:
    """One row per function tried, in the order of the family, the fallback last."""
    tests = {(test.lower, test.higher): test for test in selection.tests}

    def test_between(lower: str, higher: str) -> NestedTest | None:
        if (lower, higher) in tests:
            return tests[(lower, higher)]
        if lower in nested_fits and higher in nested_fits:
            tests[(lower, higher)] = nested_test(
                nested_fits[lower],
                nested_fits[higher],
                method=method,
                chi2_kind=chi2_kind,
                alpha=alpha,
                small_fraction_switch=SMALL_BIN_FRACTION,
            )
            return tests[(lower, higher)]
        return None

    rows = []
    for position, name in enumerate(names):
        if name not in nested_fits:
            continue
        lower = test_between(names[position - 1], name) if position > 0 else None
        higher = test_between(name, names[position + 1]) if position + 1 < len(names) else None
        report = report_of.get(name)
        note = ""
        if report is None:
            note = selection.failures.get(
                name,
                f"not checked: the nested tests chose {selection.chosen}, and the checks ran "
                "on the choice and upwards only while they failed",
            )
        rows.append(Candidate(nested_fits[name], "nested", lower, higher, report, note))
    if fallback_fit is not None:
        rows.append(
            Candidate(fallback_fit, "fallback", None, None, report_of.get(fallback_fit.name))
        )
    return tuple(rows)
