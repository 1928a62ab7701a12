"""Background-fit tools: `fit_background`, `choose_background`, `robustness_checks`."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from core.background import (
    Candidate,
    CheckOptions,
    Fallback,
    NestedTest,
    choose_background,
    run_checks,
)
from core.fit import FitResult, fit_background
from core.fitrange import FitRange
from core.robustness import CheckResult, RobustnessReport
from core.symbolic import SearchOptions, fitted_formula
from core.symbolic import symbolic_fallback as core_symbolic_fallback
from tools.common import HistogramInput, StrictModel
from tools.registry import Seed, register

FunctionName = Literal["p2", "p3", "p4", "p5", "p6", "ua2", "ua2_5"]
NestedName = Literal["p2", "p3", "p4", "p5", "p6"]
AlternativeName = Literal["ua2", "ua2_5", "p2", "p3", "p4", "p5", "p6"]


def _default_alternatives() -> list[AlternativeName]:
    return ["ua2", "ua2_5"]


def _default_functions() -> list[NestedName]:
    return ["p2", "p3", "p4", "p5", "p6"]


class SymbolicSearchSettings(StrictModel):
    """Settings of the symbolic-regression search (pyoperon, or PySR with a Julia runtime)."""

    backend: Literal["auto", "pyoperon", "pysr"] = Field(
        "auto", description="pysr only when a Julia runtime is on PATH, else pyoperon"
    )
    population_size: int = Field(300, ge=10, le=100_000)
    generations: int = Field(60, ge=1, le=10_000)
    max_length: int = Field(25, ge=3, le=200, description="largest expression (tree nodes)")
    selection: Literal["bic", "aic"] = Field(
        "bic", description="Pareto choice: min deviance + (ln N_bins | 2) x free parameters"
    )

    def to_core(self) -> SearchOptions:
        """The core search options these fields (and a subclass's) describe; core defaults else."""
        names = {field.name for field in dataclasses.fields(SearchOptions)}
        return SearchOptions(**self.model_dump(include=names))


class FallbackSettings(SymbolicSearchSettings):
    """The symbolic fallback of `choose_background`: seeded searches pooled within a budget."""

    n_seeds: int = Field(3, ge=1, le=100, description="searches, seeds derived from `seed`")
    time_budget_s: float | None = Field(
        120.0, gt=0, description="no new search starts after this many seconds; null = none"
    )
    n_alternatives: int = Field(
        2, ge=0, le=10, description="runner-up expressions offered to the spurious-signal test"
    )
    max_passing: int | None = Field(
        3,
        ge=1,
        description="stop refitting front members (simplest first) and searching once this "
        "many pass the goodness of fit; null = refit every member of every search",
    )


def symbolic_fallback(settings: FallbackSettings | None = None) -> Fallback:
    """The symbolic-regression fallback of `choose_background` (core.symbolic)."""
    chosen = settings or FallbackSettings()
    return core_symbolic_fallback(chosen.to_core(), n_alternatives=chosen.n_alternatives)


class SpectrumInput(StrictModel):
    """One mass spectrum, the range [lo, hi] GeV to fit and the collision energy."""

    histogram: HistogramInput
    fit_range: tuple[float, float | None] | None = Field(
        None,
        description="[lo, hi] GeV; hi null = the fixed upper mass 0.65 sqrt_s (empty bins "
        "included); null = from the first edge",
    )
    sqrt_s: float = Field(13000.0, gt=0, description="collision energy in GeV")


class FitBackgroundInput(SpectrumInput):
    """One function fitted to one spectrum by the extended binned Poisson likelihood."""

    function: FunctionName = "p5"
    exclude: tuple[float, float] | None = Field(
        None, description="window [lo, hi] GeV left out of the likelihood"
    )
    starts: list[list[float]] | None = Field(
        None, description="full parameter vectors (ln p1 first, ignored) to start from"
    )
    seed: Seed = 0


def _fit_spectrum(
    arguments: SpectrumInput,
    function: FunctionName,
    seed: int,
    *,
    starts: list[list[float]] | None = None,
    exclude: tuple[float, float] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], FitResult]:
    """The tool's edges (GeV) and counts, and `function` fitted to them over its range."""
    edges, counts, _ = arguments.histogram.arrays()
    result = fit_background(
        edges,
        counts,
        function,
        arguments.fit_range,
        sqrt_s=arguments.sqrt_s,
        starts=starts,
        exclude=exclude,
        seed=seed,
    )
    return edges, counts, result


class FitBackgroundOutput(StrictModel):
    """A converged fit; `expected` and `used` are per bin of the fit range `bins`.

    `parameters` are (ln p1, p2, ..., pn) as named in `parameter_names`: the normalisation
    is carried as its logarithm, which stays representable when p1 itself would not.
    """

    function: str
    formula: str
    parameter_names: list[str]
    parameters: list[float]
    errors: list[float]
    covariance: list[list[float]]
    nll: float
    chi2: float
    deviance: float
    ndf: int
    p_value: float
    valid: bool
    accurate_covariance: bool
    expected: list[float]
    used: list[bool]
    bins: tuple[int, int]
    fit_range: tuple[float, float]
    start: str
    notes: list[str]


def fit_output(result: FitResult) -> FitBackgroundOutput:
    """The JSON form of a core fit result."""
    return FitBackgroundOutput(
        function=result.name,
        formula=result.function.formula,
        parameter_names=list(result.function.vector_names),
        parameters=list(result.parameters),
        errors=list(result.errors),
        covariance=np.asarray(result.covariance, dtype=float).tolist(),
        nll=result.nll,
        chi2=result.chi2,
        deviance=result.deviance,
        ndf=result.ndf,
        p_value=result.p_value,
        valid=result.valid,
        accurate_covariance=result.accurate_covariance,
        expected=np.asarray(result.expected, dtype=float).tolist(),
        used=[bool(flag) for flag in result.used],
        bins=(result.first_bin, result.stop_bin),
        fit_range=result.fit_range,
        start=result.start,
        notes=list(result.notes),
    )


@register(
    "fit_background",
    "Fit one background function (p2..p6, ua2) to one mass spectrum over a range in GeV.",
    FitBackgroundInput,
    FitBackgroundOutput,
)
def fit_background_tool(arguments: FitBackgroundInput) -> FitBackgroundOutput:
    """Fit the requested function and return parameters, quality and expected counts."""
    _, _, result = _fit_spectrum(
        arguments,
        arguments.function,
        arguments.seed,
        starts=arguments.starts,
        exclude=arguments.exclude,
    )
    return fit_output(result)


class CheckOutput(StrictModel):
    """One robustness check for the audit log (NaN numbers become null)."""

    name: str
    passed: bool
    numbers: dict[str, float | None]
    message: str
    status: Literal["pass", "fail", "not_applicable"] = Field(
        "pass", description="not_applicable: the check could not run (message says why)"
    )


class ReportOutput(StrictModel):
    """Every check run on one function."""

    function: str
    passed: bool
    checks: list[CheckOutput]


def _check_output(check: CheckResult) -> CheckOutput:
    numbers = {
        key: (float(value) if math.isfinite(value) else None)
        for key, value in check.numbers.items()
    }
    return CheckOutput(
        name=check.name,
        passed=check.passed,
        numbers=numbers,
        message=check.message,
        status=check.status,
    )


def report_output(report: RobustnessReport) -> ReportOutput:
    """The JSON form of a robustness report."""
    return ReportOutput(
        function=report.function,
        passed=report.passed,
        checks=[_check_output(check) for check in report.checks],
    )


class CheckSettings(StrictModel):
    """Settings of the robustness checks (masses and windows in GeV)."""

    alternative: list[AlternativeName] = Field(default_factory=_default_alternatives)
    window: tuple[float, float] | None = Field(
        None, description="flagged window [lo, hi] GeV for the window-exclusion check"
    )
    gof_method: Literal["auto", "asymptotic", "toys"] = "auto"
    n_gof_toys: int = Field(100, ge=10)
    spurious_method: Literal["toys", "asimov"] = "asimov"
    fallback_spurious_method: Literal["toys", "asimov"] | None = Field(
        None, description="spurious-signal method for the fallback's fit; null = the same"
    )
    n_spurious_toys: int = Field(50, ge=1)
    spurious_masses: list[float] | None = None
    width_fraction: float = Field(1.0, gt=0, description="Gaussian sigma / resolution w(m)")
    alpha: float = Field(0.05, gt=0, lt=1)
    n_linear_toys: int = Field(
        1000, ge=10, description="toys of the goodness of fit at small counts (refit to 1st order)"
    )

    def to_core(self) -> CheckOptions:
        """The core options these fields describe."""
        return CheckOptions(
            alternative=tuple(self.alternative),
            window=self.window,
            gof_method=self.gof_method,
            n_gof_toys=self.n_gof_toys,
            spurious_method=self.spurious_method,
            fallback_spurious_method=self.fallback_spurious_method,
            n_spurious_toys=self.n_spurious_toys,
            spurious_masses=None if self.spurious_masses is None else tuple(self.spurious_masses),
            width_fraction=self.width_fraction,
            alpha=self.alpha,
            n_linear_toys=self.n_linear_toys,
        )


class ChooseBackgroundInput(SpectrumInput):
    """The whole background procedure for one spectrum.

    Give the stream's start `stream_start_gev` (PHYSICS.md 3) to let the range start past
    the turn-on of the spectrum, or an explicit `fit_range`.
    """

    stream_start_gev: float | None = Field(
        None,
        gt=0,
        description="stream's fit start (GeV); with no fit_range the range starts at the "
        "larger of it and the first bin past the spectrum's turn-on",
    )
    upper_gev: float | None = Field(
        None, gt=0, description="fixed upper end of the range (GeV); null = 0.65 sqrt_s"
    )

    method: Literal["ftest", "wilks"] = "ftest"
    functions: list[NestedName] = Field(default_factory=_default_functions)
    chi2_kind: Literal["deviance", "pearson"] = "deviance"
    checks: CheckSettings = Field(default_factory=CheckSettings)
    use_fallback: bool = True
    fallback_search: FallbackSettings = Field(default_factory=FallbackSettings)
    seed: int = Field(0, ge=0, lt=2**63)


class NestedTestOutput(StrictModel):
    """One F-test or Wilks comparison between n and n+1 parameters."""

    lower: str
    higher: str
    method: str
    requested_method: str | None = None
    small_bin_fraction: float | None = None
    chi2_kind: str
    n_bins: int
    chi2_lower: float
    chi2_higher: float
    test_statistic: float | None
    p_value: float
    significant: bool
    note: str


def _test_output(test: NestedTest) -> NestedTestOutput:
    statistic = test.test_statistic if math.isfinite(test.test_statistic) else None
    return NestedTestOutput(
        lower=test.lower,
        higher=test.higher,
        method=test.method,
        requested_method=test.requested_method,
        small_bin_fraction=test.small_bin_fraction,
        chi2_kind=test.chi2_kind,
        n_bins=test.n_bins,
        chi2_lower=test.chi2_lower,
        chi2_higher=test.chi2_higher,
        test_statistic=statistic,
        p_value=test.p_value,
        significant=test.significant,
        note=test.note,
    )


class SymbolicFallbackOutput(StrictModel):
    """The fallback's symbolic expression: ln f = ln p1 + g(x, lnx, ln1mx; c), f per GeV."""

    expression: str
    constants: dict[str, float]
    formula: str = Field(description="ln f with the fitted numbers, ln p1 included")
    p_value: float = Field(description="goodness of fit: deviance p-value")
    fit: FitBackgroundOutput


def symbolic_output(result: FitResult) -> SymbolicFallbackOutput:
    """The JSON form of a symbolic fallback's fit."""
    names = result.function.parameter_names[1:]
    return SymbolicFallbackOutput(
        expression=result.function.expression or result.function.formula,
        constants=dict(zip(names, result.parameters[1:], strict=True)),
        formula=fitted_formula(result),
        p_value=result.p_value,
        fit=fit_output(result),
    )


class FitRangeOutput(StrictModel):
    """The fit range of a spectrum and why: bins [first_bin, stop_bin), [lo_gev, hi_gev]."""

    first_bin: int
    stop_bin: int
    lo_gev: float
    hi_gev: float
    floor_bin: int = Field(description="lowest bin the fit-start stability check may use")
    turn_on_bin: int | None = Field(description="density peak that moved the start, if any")
    n_above: float = Field(description="events above hi_gev, not fitted")
    reason: str


def range_output(chosen: FitRange) -> FitRangeOutput:
    """The JSON form of a core fit range."""
    return FitRangeOutput(**dataclasses.asdict(chosen))


class CandidateOutput(StrictModel):
    """One function tried: fit, nested tests, checks, verdict (the policy picks among passed)."""

    function: str
    source: Literal["nested", "fallback"]
    expression: str | None = Field(description="ln g of a symbolic expression; null otherwise")
    formula: str
    parameter_names: list[str]
    parameters: list[float]
    errors: list[float]
    nll: float
    deviance: float
    ndf: int
    p_value: float = Field(description="asymptotic deviance p; the GOF check has the toy p")
    bins: tuple[int, int] = Field(description="[first_bin, stop_bin) of the fit range")
    fit_range: tuple[float, float]
    test_from_lower: NestedTestOutput | None
    test_to_higher: NestedTestOutput | None
    checked: bool
    checks: list[CheckOutput]
    passed: bool
    note: str


def candidate_output(candidate: Candidate) -> CandidateOutput:
    """The JSON form of one candidate row."""
    fit = candidate.fit
    report = candidate.report
    return CandidateOutput(
        function=fit.name,
        source=candidate.source,
        expression=fit.function.expression,
        formula=fit.function.formula,
        parameter_names=list(fit.function.vector_names),
        parameters=list(fit.parameters),
        errors=list(fit.errors),
        nll=fit.nll,
        deviance=fit.deviance,
        ndf=fit.ndf,
        p_value=fit.p_value,
        bins=(fit.first_bin, fit.stop_bin),
        fit_range=fit.fit_range,
        test_from_lower=None
        if candidate.test_from_lower is None
        else _test_output(candidate.test_from_lower),
        test_to_higher=None
        if candidate.test_to_higher is None
        else _test_output(candidate.test_to_higher),
        checked=report is not None,
        checks=[] if report is None else [_check_output(check) for check in report.checks],
        passed=candidate.passed,
        note=candidate.note,
    )


class ChooseBackgroundOutput(StrictModel):
    """The accepted background (or null) and the decision trail that led to it."""

    chosen: str | None
    passed: bool
    fit: FitBackgroundOutput | None
    tests: list[NestedTestOutput]
    checks: list[ReportOutput]
    fallback: SymbolicFallbackOutput | None
    failures: dict[str, str]
    trail: list[str]
    fit_range: FitRangeOutput | None = Field(None, description="the range every fit used")
    candidates: list[CandidateOutput] = Field(
        default_factory=list, description="one row per function tried"
    )


@register(
    "choose_background",
    "Choose the background function of a spectrum: F-test/Wilks, robustness checks, fallback.",
    ChooseBackgroundInput,
    ChooseBackgroundOutput,
)
def choose_background_tool(arguments: ChooseBackgroundInput) -> ChooseBackgroundOutput:
    """Run the nested tests, check the choice and fall back when no function passes."""
    edges, counts, _ = arguments.histogram.arrays()
    decision = choose_background(
        edges,
        counts,
        arguments.fit_range,
        stream_start_gev=arguments.stream_start_gev,
        upper_gev=arguments.upper_gev,
        sqrt_s=arguments.sqrt_s,
        functions=arguments.functions,
        method=arguments.method,
        chi2_kind=arguments.chi2_kind,
        options=arguments.checks.to_core(),
        fallback=symbolic_fallback(arguments.fallback_search) if arguments.use_fallback else None,
        seed=arguments.seed,
    )
    return ChooseBackgroundOutput(
        chosen=decision.chosen,
        passed=decision.passed,
        fit=None if decision.fit is None else fit_output(decision.fit),
        tests=[_test_output(test) for test in decision.selection.tests],
        checks=[report_output(report) for report in decision.checks],
        fallback=None if decision.fallback is None else symbolic_output(decision.fallback),
        failures=dict(decision.selection.failures),
        trail=list(decision.trail),
        fit_range=None if decision.fit_range is None else range_output(decision.fit_range),
        candidates=[candidate_output(candidate) for candidate in decision.candidates],
    )


class RobustnessChecksInput(SpectrumInput):
    """Fit one function to one spectrum and run every robustness check on it."""

    function: FunctionName
    checks: CheckSettings = Field(default_factory=CheckSettings)
    seed: Seed = 0


class RobustnessChecksOutput(StrictModel):
    """The fit that was checked and the checks."""

    fit: FitBackgroundOutput
    report: ReportOutput


@register(
    "robustness_checks",
    "Goodness of fit, fit-start stability, spurious signal and window exclusion of one fit.",
    RobustnessChecksInput,
    RobustnessChecksOutput,
)
def robustness_checks_tool(arguments: RobustnessChecksInput) -> RobustnessChecksOutput:
    """Fit the function, then run the checks with the requested settings."""
    edges, counts, result = _fit_spectrum(arguments, arguments.function, arguments.seed)
    report = run_checks(edges, counts, result, arguments.checks.to_core(), seed=arguments.seed)
    return RobustnessChecksOutput(fit=fit_output(result), report=report_output(report))
