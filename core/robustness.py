"""Robustness checks of a chosen background fit, each returning its numbers and a verdict.

PHYSICS.md section 5: goodness of fit (deviance p-value, pseudo-experiments when expected
counts are small), stability under moving the fit start by +-1 bin, the spurious-signal
test (signal+background fits to background-only toys drawn from an alternative function)
and the window exclusion (refit with a flagged window masked). Every check returns a
`CheckResult` for the audit log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special

from core.errors import FitError, InvalidInputError
from core.fit import (
    BinnedShape,
    FitResult,
    SpectrumFitProblem,
    fit_spectrum,
    prepare_spectrum,
    shape_directions,
)
from core.fitfunctions import ALTERNATIVE_FUNCTIONS, BackgroundFunction, FloatArray, get_function
from core.masses import mass_resolution
from core.significance import FloatingShape, fit_signal_and_background, gaussian_bin_fractions

GofMethod = Literal["auto", "asymptotic", "toys"]
SpuriousMethod = Literal["toys", "asimov"]


@dataclass(frozen=True)
class CheckResult:
    """One robustness check: its name, verdict, the numbers behind it and a sentence."""

    name: str
    passed: bool
    numbers: Mapping[str, float] = field(hash=False)
    message: str


@dataclass(frozen=True)
class RobustnessReport:
    """All checks run on one fitted function."""

    function: str
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the checks that failed."""
        return tuple(check.name for check in self.checks if not check.passed)


def _generator(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _problem_for(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    *,
    first_bin: int | None = None,
    exclude: tuple[float, float] | None = None,
) -> SpectrumFitProblem:
    edge_values = np.asarray(edges, dtype=np.float64)
    first = fit.first_bin if first_bin is None else first_bin
    return prepare_spectrum(
        edge_values,
        counts,
        (float(edge_values[first]), float(edge_values[fit.stop_bin])),
        sqrt_s=fit.sqrt_s,
        exclude=exclude,
    )


def goodness_of_fit(
    problem: SpectrumFitProblem,
    fit: FitResult,
    *,
    method: GofMethod = "auto",
    n_toys: int = 100,
    alpha: float = 0.05,
    small_count: float = 5.0,
    max_small_fraction: float = 0.2,
    seed: int | np.random.Generator = 0,
) -> CheckResult:
    """Deviance p-value of a fit; passes at p > alpha.

    `auto` uses the asymptotic chi2(ndf) law unless more than `max_small_fraction` of the
    bins expect fewer than `small_count` events; then the p-value is the fraction of
    Poisson pseudo-experiments from the fit, each refitted, whose deviance is at least the
    observed one, (1 + k) / (1 + n_toys_converged).
    """
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must lie in (0, 1), got {alpha}")
    expected = fit.expected[fit.used]
    small_fraction = float(np.mean(expected < small_count))
    use_toys = method == "toys" or (method == "auto" and small_fraction > max_small_fraction)
    numbers: dict[str, float] = {
        "deviance": fit.deviance,
        "chi2": fit.chi2,
        "ndf": float(fit.ndf),
        "small_bin_fraction": small_fraction,
        "asymptotic_p_value": fit.p_value,
    }
    if not use_toys:
        passed = fit.p_value > alpha
        numbers["p_value"] = fit.p_value
        return CheckResult(
            "goodness_of_fit",
            passed,
            numbers,
            f"{fit.name}: deviance {fit.deviance:.1f} for {fit.ndf} degrees of freedom, "
            f"asymptotic p = {fit.p_value:.3g} ({'>' if passed else '<='} {alpha})",
        )
    if n_toys < 10:
        raise InvalidInputError(f"a toy goodness-of-fit test needs >= 10 toys, got {n_toys}")
    rng = _generator(seed)
    toy_deviances = []
    failed = 0
    for _ in range(n_toys):
        toy = problem.counts[problem.first_bin : problem.stop_bin].copy()
        toy[problem.used] = rng.poisson(expected)
        if not np.any(toy[problem.used] > 0):
            failed += 1
            continue
        try:
            toy_fit = fit_spectrum(
                problem.with_range_counts(toy),
                fit.function,
                starts=[fit.parameters],
                seed=rng,
                max_attempts=2,
            )
        except FitError:
            failed += 1
            continue
        toy_deviances.append(toy_fit.deviance)
    converged = len(toy_deviances)
    exceed = int(np.count_nonzero(np.asarray(toy_deviances) >= fit.deviance))
    p_value = (1 + exceed) / (1 + converged)
    numbers |= {"p_value": p_value, "n_toys": float(converged), "n_failed_toys": float(failed)}
    enough = converged >= 0.8 * n_toys
    passed = enough and p_value > alpha
    reason = "" if enough else f"; only {converged} of {n_toys} toy fits converged"
    return CheckResult(
        "goodness_of_fit",
        passed,
        numbers,
        f"{fit.name}: deviance {fit.deviance:.1f}, toy p = {p_value:.3g} from {converged} "
        f"refitted pseudo-experiments ({'>' if passed else '<='} {alpha}){reason}",
    )


def fit_start_stability(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    *,
    max_shift: float = 1.0,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
) -> CheckResult:
    """Refit with the fit range starting one bin lower and one bin higher.

    Passes when both refits converge with deviance p > alpha and the background in the
    common bins moves by less than `max_shift` times its Poisson error sqrt(mu) anywhere.
    """
    edge_values = np.asarray(edges, dtype=np.float64)
    exclude = _excluded(edge_values, fit)
    rng = _generator(seed)
    numbers: dict[str, float] = {}
    problems: list[str] = []
    for label, shift in (("minus", -1), ("plus", 1)):
        first = fit.first_bin + shift
        if first < 0:
            problems.append("no bin below the fit start")
            continue
        try:
            problem = _problem_for(edge_values, counts, fit, first_bin=first, exclude=exclude)
            moved = fit_spectrum(problem, fit.function, starts=[fit.parameters], seed=rng)
        except (FitError, InvalidInputError) as error:
            problems.append(f"fit starting one bin {label}: {error}")
            numbers[f"converged_{label}"] = 0.0
            continue
        common = max(fit.first_bin, first)
        nominal = fit.expected[common - fit.first_bin :]
        shifted = moved.expected[common - first :]
        size = min(nominal.size, shifted.size)
        pull = np.abs(shifted[:size] - nominal[:size]) / np.sqrt(nominal[:size])
        numbers |= {
            f"converged_{label}": 1.0,
            f"fit_start_{label}_gev": float(edge_values[first]),
            f"p_value_{label}": moved.p_value,
            f"max_shift_{label}": float(pull.max()),
        }
        if moved.p_value <= alpha:
            problems.append(f"fit starting one bin {label} has p = {moved.p_value:.3g}")
        if pull.max() >= max_shift:
            problems.append(
                f"fit starting one bin {label} moves the background by {pull.max():.2f} "
                f"sqrt(mu) (limit {max_shift})"
            )
    passed = not problems
    message = (
        f"{fit.name} is stable under moving the fit start by +-1 bin"
        if passed
        else f"{fit.name} is unstable: " + "; ".join(problems)
    )
    return CheckResult("fit_start_stability", passed, numbers, message)


@dataclass(frozen=True)
class SignalFit:
    """A signal+background fit: Gaussian signal yield (events) at `mass` with width `width`.

    `nll` is half the Poisson deviance at the minimum (the NLL up to a data constant).
    """

    mass: float
    width: float
    signal: float
    signal_error: float
    background_total: float
    valid: bool
    nll: float

    @property
    def pull(self) -> float:
        """Fitted signal over its error."""
        return self.signal / self.signal_error


def fit_signal_plus_background(
    problem: SpectrumFitProblem,
    background: FitResult,
    mass: float,
    width: float,
) -> SignalFit:
    """Fit background (the function of `background`) plus a Gaussian of free yield at `mass`.

    The normalisation and the shape parameters float, whitened by the information at the
    background fit (`shape_directions`, as many directions as the background fit had free);
    the yield may be negative. Masses in GeV. For a non-log-linear shape whose fit is not
    accurate, up to two more of its sloppiest directions are held, as core.fit does. One
    engine: core.significance.fit_signal_and_background.
    """
    shape = BinnedShape(problem, background.function)
    used = problem.used
    template = gaussian_bin_fractions(problem.range_edges, mass, width)[used]
    n_directions = background.n_free - 1
    smallest = n_directions if shape.features is not None else max(n_directions - 2, 1)
    result = None
    for kept in range(n_directions, smallest - 1, -1):
        try:
            directions = shape_directions(shape, background.theta, max_directions=kept)
        except FitError:
            break
        result = fit_signal_and_background(
            problem.range_counts[used],
            background.expected[used],
            template,
            floating_shape=FloatingShape(shape, background.theta, directions),
        )
        if result.valid:
            break
    if result is None:
        return SignalFit(float(mass), float(width), math.nan, math.nan, math.nan, False, math.nan)
    return SignalFit(
        mass=float(mass),
        width=float(width),
        signal=result.signal,
        signal_error=result.signal_error,
        background_total=result.background_total,
        valid=result.valid,
        nll=result.nll,
    )


def _test_masses(
    alternative: FitResult, problem: SpectrumFitProblem, width_fraction: float, n_masses: int
) -> FloatArray | None:
    """Log-spaced masses inside the range, 2 widths from its ends, where mu >= 1 per bin.

    None when no such mass exists (a narrow range, or a spectrum too sparse to test).
    """
    edges = problem.range_edges
    centres = 0.5 * (edges[:-1] + edges[1:])
    populated = centres[alternative.expected >= 1.0]
    if populated.size == 0:
        return None
    low = edges[0] + 2 * width_fraction * float(mass_resolution(edges[0]))
    high = min(float(populated.max()), float(edges[-1]))
    high -= 2 * width_fraction * float(mass_resolution(high))
    if high <= low:
        return None
    return np.geomspace(low, high, n_masses)


def spurious_signal(
    problem: SpectrumFitProblem,
    fit: FitResult,
    *,
    alternative: BackgroundFunction | str | Sequence[BackgroundFunction | str] = (
        ALTERNATIVE_FUNCTIONS
    ),
    masses: Sequence[float] | None = None,
    n_masses: int = 6,
    method: SpuriousMethod = "toys",
    alpha: float = 0.05,
    n_toys: int = 50,
    width_fraction: float = 1.0,
    max_median_pull: float = 0.5,
    seed: int | np.random.Generator = 0,
) -> CheckResult:
    """Spurious-signal test of `fit`'s function on toys drawn from an alternative function.

    The first alternative that fits the data with deviance p > alpha is used (the check
    fails when none does); background-only Poisson toys from it are fitted
    with `fit`'s function plus a Gaussian of sigma = `width_fraction` x w(m) (w the mass
    resolution and bin width of PHYSICS.md) at each tested mass (GeV). Passes when
    |median(s / sigma_s)| < `max_median_pull` at every mass. `asimov` replaces the toys
    by the one expected data set of the alternative, whose pull estimates the median
    without toy noise (the median of 50 toy pulls scatters by about 0.18).
    """
    if n_toys < 1 or n_masses < 1:
        raise InvalidInputError(
            f"need at least one toy and one mass, got n_toys={n_toys}, n_masses={n_masses}"
        )
    if not width_fraction > 0:
        raise InvalidInputError(f"width_fraction must be positive, got {width_fraction}")
    rng = _generator(seed)
    names = [alternative] if isinstance(alternative, str | BackgroundFunction) else alternative
    candidates = [get_function(name) if isinstance(name, str) else name for name in names]
    if not candidates:
        raise InvalidInputError("give at least one alternative function")
    alternative_fits: list[FitResult] = []
    failures: list[str] = []
    for candidate in candidates:
        try:
            alternative_fits.append(fit_spectrum(problem, candidate, seed=rng))
        except FitError as error:
            failures.append(f"{candidate.name}: {error}")
            continue
        if alternative_fits[-1].p_value > alpha:
            break
    if not alternative_fits:
        return CheckResult(
            "spurious_signal",
            False,
            {},
            "no alternative function could be fitted to the data, so no toys could be "
            "drawn: " + "; ".join(failures),
        )
    alternative_fit = alternative_fits[-1]
    if alternative_fit.p_value <= alpha:
        summary = ", ".join(f"{item.name} p = {item.p_value:.3g}" for item in alternative_fits)
        return CheckResult(
            "spurious_signal",
            False,
            {"alternative_p_value": max(item.p_value for item in alternative_fits)},
            f"no alternative function describes the data ({summary}; "
            + "; ".join(failures)
            + "), so toys drawn from one would test the wrong shape; give an adequate "
            "alternative",
        )
    alternative_function = alternative_fit.function
    if masses is None:
        found = _test_masses(alternative_fit, problem, width_fraction, n_masses)
        if found is None:
            return CheckResult(
                "spurious_signal",
                False,
                {"alternative_p_value": alternative_fit.p_value},
                f"no mass lies two resolutions inside the fit range {problem.fit_range} GeV "
                "where a bin expects one event or more: the spectrum is too sparse or the "
                "range too narrow for a spurious-signal test",
            )
        tested = found
    else:
        tested = np.asarray(masses, dtype=np.float64)
        low, high = problem.fit_range
        if tested.size == 0 or np.any((tested <= low) | (tested >= high)):
            raise InvalidInputError(
                f"spurious-signal masses must lie inside the fit range ({low}, {high}) GeV, "
                f"got {list(tested)}"
            )
    widths = width_fraction * mass_resolution(tested)
    n_sets = 1 if method == "asimov" else n_toys
    pulls = np.full((n_sets, tested.size), np.nan)
    for toy_index in range(n_sets):
        toy = problem.range_counts.copy()
        if method == "asimov":
            toy[problem.used] = alternative_fit.expected[problem.used]
        else:
            toy[problem.used] = rng.poisson(alternative_fit.expected[problem.used])
        if not np.any(toy[problem.used] > 0):
            continue
        toy_problem = problem.with_range_counts(toy)
        for mass_index, (mass, width) in enumerate(zip(tested, widths, strict=True)):
            result = fit_signal_plus_background(toy_problem, fit, float(mass), float(width))
            if result.valid:
                pulls[toy_index, mass_index] = result.pull
    converged = np.sum(np.isfinite(pulls), axis=0)
    numbers: dict[str, float] = {
        "alternative_p_value": alternative_fit.p_value,
        "alternative_n_params": float(alternative_function.n_params),
        "n_toys": float(n_sets if method == "toys" else 0),
        "width_fraction": width_fraction,
    }
    problems = []
    worst = 0.0
    for index, mass in enumerate(tested):
        column = pulls[:, index][np.isfinite(pulls[:, index])]
        median = float(np.median(column)) if column.size else float("nan")
        numbers[f"median_pull_{mass:.0f}_gev"] = median
        numbers[f"converged_{mass:.0f}_gev"] = float(converged[index])
        if converged[index] < 0.8 * n_sets:
            problems.append(f"only {converged[index]}/{n_sets} fits converged at {mass:.0f} GeV")
        elif abs(median) >= max_median_pull:
            problems.append(f"median pull {median:+.2f} at {mass:.0f} GeV")
        if column.size:
            worst = max(worst, abs(median))
    numbers["max_abs_median_pull"] = worst
    passed = not problems
    source = f"{alternative_function.name} {'Asimov data' if method == 'asimov' else 'toys'}"
    message = (
        f"{fit.name} on {source}: |median pull| <= {worst:.2f} < {max_median_pull} at "
        f"{tested.size} masses"
        if passed
        else f"{fit.name} on {source} fails: " + "; ".join(problems)
    )
    return CheckResult("spurious_signal", passed, numbers, message)


def window_exclusion(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    window: tuple[float, float],
    *,
    gof_method: GofMethod = "auto",
    n_gof_toys: int = 100,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
) -> CheckResult:
    """Refit with the window [lo, hi] GeV masked and re-check the goodness of fit.

    Records data and background (nominal and masked fit) in the window and the local
    Poisson p-value of the data against the masked background. Passes when the masked
    fit converges and its goodness of fit passes.
    """
    rng = _generator(seed)
    problem = _problem_for(edges, counts, fit, exclude=window)
    try:
        masked = fit_spectrum(problem, fit.function, starts=[fit.parameters], seed=rng)
    except FitError as error:
        return CheckResult(
            "window_exclusion",
            False,
            {"window_lo_gev": window[0], "window_hi_gev": window[1]},
            f"{fit.name} did not converge with the window {window} GeV masked: {error}",
        )
    in_window = ~problem.used
    data = float(problem.range_counts[in_window].sum())
    masked_background = float(masked.expected[in_window].sum())
    nominal_background = float(fit.expected[in_window].sum())
    local_p = float(special.gammainc(data, masked_background)) if data > 0 else 1.0
    gof = goodness_of_fit(
        problem, masked, method=gof_method, n_toys=n_gof_toys, alpha=alpha, seed=rng
    )
    numbers = {
        "window_lo_gev": float(window[0]),
        "window_hi_gev": float(window[1]),
        "data_in_window": data,
        "background_nominal": nominal_background,
        "background_masked": masked_background,
        "local_p_masked": local_p,
        "gof_p_value_masked": gof.numbers["p_value"],
    }
    return CheckResult(
        "window_exclusion",
        gof.passed,
        numbers,
        f"{fit.name} with {window} GeV masked: background {masked_background:.1f} "
        f"(nominal {nominal_background:.1f}) for {data:.0f} events, local p = {local_p:.3g}; "
        + gof.message,
    )


def robustness_checks(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit: FitResult,
    *,
    alternative: BackgroundFunction | str | Sequence[BackgroundFunction | str] = (
        ALTERNATIVE_FUNCTIONS
    ),
    window: tuple[float, float] | None = None,
    gof_method: GofMethod = "auto",
    n_gof_toys: int = 100,
    spurious_method: SpuriousMethod = "toys",
    n_spurious_toys: int = 50,
    spurious_masses: Sequence[float] | None = None,
    width_fraction: float = 1.0,
    alpha: float = 0.05,
    seed: int = 0,
) -> RobustnessReport:
    """Run every robustness check on `fit` (window exclusion only when a window is given)."""
    gof_seed, stability_seed, spurious_seed, window_seed = np.random.SeedSequence(seed).spawn(4)
    problem = _problem_for(edges, counts, fit, exclude=_excluded(edges, fit))
    checks = [
        goodness_of_fit(
            problem,
            fit,
            method=gof_method,
            n_toys=n_gof_toys,
            alpha=alpha,
            seed=np.random.default_rng(gof_seed),
        ),
        fit_start_stability(
            edges, counts, fit, alpha=alpha, seed=np.random.default_rng(stability_seed)
        ),
        spurious_signal(
            problem,
            fit,
            alternative=alternative,
            masses=spurious_masses,
            method=spurious_method,
            n_toys=n_spurious_toys,
            alpha=alpha,
            width_fraction=width_fraction,
            seed=np.random.default_rng(spurious_seed),
        ),
    ]
    if window is not None:
        checks.append(
            window_exclusion(
                edges,
                counts,
                fit,
                window,
                gof_method=gof_method,
                n_gof_toys=n_gof_toys,
                alpha=alpha,
                seed=np.random.default_rng(window_seed),
            )
        )
    return RobustnessReport(fit.name, tuple(checks))


def _excluded(edges: npt.ArrayLike, fit: FitResult) -> tuple[float, float] | None:
    if fit.used.all():
        return None
    edge_values = np.asarray(edges, dtype=np.float64)
    masked = np.flatnonzero(~fit.used) + fit.first_bin
    return float(edge_values[masked[0]]), float(edge_values[masked[-1] + 1])
