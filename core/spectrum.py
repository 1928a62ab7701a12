"""The whole per-spectrum rule of the scan, and its two halves for an agent's policy.

Half 1 is `core.selection.choose_background` (fit range, F-test along the nested family,
robustness checks, symbolic fallback). Half 2 is `search_spectrum`: the bump hunt against
the accepted background over the fit range, window exclusion when the spectrum's global p
is below 0.01 (`core.exclusion`), and the final background. `analyse_spectrum` runs both and
gives the spectrum one status:

- "accepted": a background passed every check; the bump hunt ran against it. Only these
  spectra enter the ranking of excesses and the scan-wide look-elsewhere test.
- "no accepted background": every analytic function and the fallback failed a check; the
  failed checks are listed; no bump is hunted (issue 11: an excess against a background that
  failed its checks was ranked first on a background-only sample).
- "too few events": fewer than `MIN_EVENTS_IN_FIT_RANGE` events above the stream's start.
- "fit failed": the range or the fits could not be built (the reason is kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from core.bumphunt import DEFAULT_HUNT, BumpHuntResult, HuntOptions, bump_hunt
from core.errors import AnomscanError, InvalidInputError
from core.exclusion import EXCLUSION_TRIGGER_P, WindowExclusion, masked_window, window_exclusion
from core.fit import FitResult, expected_errors, fit_background
from core.fitfunctions import FUNCTIONS, BackgroundFunction
from core.selection import BackgroundDecision, CheckOptions, Fallback, choose_background

FloatArray = npt.NDArray[np.float64]

SpectrumStatus = Literal["accepted", "no accepted background", "too few events", "fit failed"]
STATUSES: Final = ("accepted", "no accepted background", "too few events", "fit failed")

MIN_EVENTS_IN_FIT_RANGE: Final = 40
"""Spectra with fewer events above the stream's start are recorded, not fitted."""


@dataclass(frozen=True, eq=False)
class SpectrumSearch:
    """Half 2 of the rule: the bump hunt against an accepted background, with its exclusion.

    `fit` is the final background (the masked refit when the exclusion was accepted);
    `counts`, `background` and `background_error` (the 1-sigma fit uncertainty of the
    background per bin, `core.fit.expected_errors`) cover bins [first_bin, stop_bin) of the
    histogram; `bump`
    is the hunt against the final background (bins relative to `first_bin`);
    `bump_unmasked` the hunt against the unmasked one (the same object without exclusion).
    """

    fit: FitResult
    first_bin: int
    stop_bin: int
    edges: FloatArray = field(repr=False)
    counts: FloatArray = field(repr=False)
    background: FloatArray = field(repr=False)
    background_error: FloatArray = field(repr=False)
    bump: BumpHuntResult
    bump_unmasked: BumpHuntResult
    exclusion: WindowExclusion | None
    hunt: HuntOptions
    trail: tuple[str, ...]

    @property
    def function(self) -> str:
        """Name (or symbolic expression) of the final background function."""
        return self.fit.name


def _resolve_function(
    function: BackgroundFunction | str, parameters: tuple[float, ...] | None
) -> BackgroundFunction:
    """A function by family name, or a symbolic expression with its constants."""
    if isinstance(function, BackgroundFunction):
        return function
    if function in FUNCTIONS:
        return FUNCTIONS[function]
    from core.symbolic import lift_constants, symbolic_background

    text = function.removeprefix("symbolic: ").strip()
    if parameters is not None:
        return symbolic_background(text, parameters[1:])
    expression, constants = lift_constants(text)
    return symbolic_background(expression, constants)


def search_spectrum(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: FitResult | BackgroundFunction | str,
    fit_range: tuple[float, float] | None = None,
    *,
    parameters: tuple[float, ...] | None = None,
    sqrt_s: float = 13000.0,
    hunt: HuntOptions = DEFAULT_HUNT,
    exclusion_trigger_p: float = EXCLUSION_TRIGGER_P,
    seed: int = 0,
) -> SpectrumSearch:
    """Bump hunt against an accepted background, window exclusion, final background.

    `background` is an accepted fit (its range is used), or a function (family name,
    BackgroundFunction or symbolic expression; `parameters` (ln p1, ...) start it) fitted
    here over `fit_range` [lo, hi] GeV. Edges in GeV. Window exclusion runs when the global
    p of the hunt is below `exclusion_trigger_p` (module docstring of core.exclusion).
    """
    e = np.asarray(edges, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if isinstance(background, FitResult):
        fit = background
    else:
        if fit_range is None:
            raise InvalidInputError(
                "search_spectrum needs a fit_range [lo, hi] GeV when given a function instead "
                "of a fit"
            )
        function = _resolve_function(background, parameters)
        starts = None if parameters is None else [parameters]
        fit = fit_background(e, n, function, fit_range, sqrt_s=sqrt_s, starts=starts, seed=seed)
    first, stop = fit.first_bin, fit.stop_bin
    if n.shape != (e.size - 1,) or stop > n.size:
        raise InvalidInputError(
            f"the fit covers bins [{first}, {stop}) but the histogram has {n.size} bins"
        )

    def hunt_against(expected: FloatArray) -> BumpHuntResult:
        return bump_hunt(
            n[first:stop],
            expected,
            e[first : stop + 1],
            width_min=hunt.width_min,
            width_max=hunt.width_max,
            min_toys=hunt.min_toys,
            max_toys=hunt.max_toys,
            target_rel_error=hunt.target_rel_error,
            min_window_background=hunt.min_window_background,
            seed=seed,
        )

    bump = hunt_against(np.asarray(fit.expected, dtype=np.float64))
    trail = [
        f"bump hunt against {fit.name}: best window {bump.mass_low:.0f}-{bump.mass_high:.0f} "
        f"GeV, {bump.data:.0f} events on {bump.background:.1f}, local Z {bump.local_z:.2f}, "
        f"global p {bump.global_p:.3g} ({bump.n_toys} toys, {bump.global_p_method})"
    ]
    exclusion = None
    final_fit, final_bump = fit, bump
    if bump.global_p < exclusion_trigger_p:
        exclusion = window_exclusion(e, n, fit, bump, seed=seed)
        trail.append("window exclusion: " + exclusion.reason)
        if exclusion.accepted and exclusion.masked is not None:
            final_fit = exclusion.masked
            final_bump = hunt_against(np.asarray(final_fit.expected, dtype=np.float64))
            trail.append(
                f"bump hunt against the masked {final_fit.name}: local Z {final_bump.local_z:.2f}"
                f", global p {final_bump.global_p:.3g}"
            )
    else:
        trail.append(f"no window exclusion: global p {bump.global_p:.3g} >= {exclusion_trigger_p}")
    return SpectrumSearch(
        fit=final_fit,
        first_bin=first,
        stop_bin=stop,
        edges=e[first : stop + 1].copy(),
        counts=n[first:stop].copy(),
        background=np.asarray(final_fit.expected, dtype=np.float64).copy(),
        background_error=expected_errors(final_fit, e),
        bump=final_bump,
        bump_unmasked=bump,
        exclusion=exclusion,
        hunt=hunt,
        trail=tuple(trail),
    )


@dataclass(frozen=True, eq=False)
class SpectrumAnalysis:
    """The whole rule on one spectrum: status, reason, background decision and search.

    `failed_checks` lists every check that failed, per function tried ("p4: spurious_signal:
    ..."), for "no accepted background". `search` is set only for "accepted".
    """

    status: SpectrumStatus
    reason: str
    n_events: float
    n_in_range: float
    fit_range: tuple[float, float] | None
    decision: BackgroundDecision | None
    search: SpectrumSearch | None
    failed_checks: tuple[str, ...]
    trail: tuple[str, ...]


def _failed_checks(decision: BackgroundDecision) -> tuple[str, ...]:
    return tuple(
        f"{report.function}: {check.name}: {check.message}"
        for report in decision.checks
        for check in report.checks
        if not check.passed
    )


def _masked_choice(
    edges: FloatArray,
    counts: FloatArray,
    decision: BackgroundDecision,
    settings: CheckOptions,
    choose: Callable[[CheckOptions, Fallback | None], BackgroundDecision],
    hunt: HuntOptions,
    notes: list[str],
    seed: int,
) -> BackgroundDecision:
    """Retry the choice with a significant window masked when no function passed.

    A strong resonance makes every smooth function fail its goodness of fit. The hunt
    against the F-test's (rejected) choice locates the window; when its global p is below
    the exclusion trigger, the window (capped at the signal width, `core.exclusion`) is
    left out of every fit and the choice is made again (PHYSICS.md 5, flagged window).
    """
    fit = decision.selection.fit
    if fit is None:
        return decision
    first, stop = fit.first_bin, fit.stop_bin
    probe = bump_hunt(
        counts[first:stop],
        np.asarray(fit.expected, dtype=np.float64),
        edges[first : stop + 1],
        width_min=hunt.width_min,
        width_max=hunt.width_max,
        min_toys=hunt.min_toys,
        max_toys=hunt.max_toys,
        min_window_background=hunt.min_window_background,
        seed=seed,
    )
    if probe.global_p >= EXCLUSION_TRIGGER_P:
        return decision
    background = np.zeros_like(counts)
    background[first:stop] = fit.expected
    low, high, _ = masked_window(
        edges,
        counts,
        background,
        first + probe.first_bin,
        first + probe.stop_bin,
        within=(first, stop),
    )
    window = (float(edges[low]), float(edges[high]))
    notes.append(
        f"no function passed; the hunt against the rejected {fit.name} flags "
        f"{probe.mass_low:.0f}-{probe.mass_high:.0f} GeV (global p {probe.global_p:.3g}): "
        f"choosing again with {window[0]:.0f}-{window[1]:.0f} GeV masked"
    )
    masked = choose(replace(settings, window=window), None)
    notes.append(
        f"with the window masked {masked.chosen} passes every check"
        if masked.passed
        else "with the window masked no function passes either"
    )
    return masked if masked.passed else decision


def analyse_spectrum(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    stream_start_gev: float,
    *,
    sqrt_s: float = 13000.0,
    upper_gev: float | None = None,
    checks: CheckOptions | None = None,
    fallback: Fallback | None = None,
    hunt: HuntOptions = DEFAULT_HUNT,
    exclusion_trigger_p: float = EXCLUSION_TRIGGER_P,
    min_events: int = MIN_EVENTS_IN_FIT_RANGE,
    seed: int = 0,
) -> SpectrumAnalysis:
    """Fit range, background choice (with `fallback`), bump hunt and window exclusion.

    `stream_start_gev` is the stream's fit start (PHYSICS.md 3); the range follows
    `core.fit.fit_range`. Errors of the fits become status "fit failed" with the reason; bad
    histograms still raise InvalidInputError.
    """
    e = np.asarray(edges, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or e.shape != (n.size + 1,):
        raise InvalidInputError(
            f"analyse_spectrum needs N counts and N + 1 edges; found {n.shape}, {e.shape}"
        )
    n_events = float(n.sum())
    n_in_range = float(n[e[:-1] >= stream_start_gev - 1e-9].sum())
    if n_in_range < min_events:
        reason = (
            f"{n_in_range:.0f} events above the stream start {stream_start_gev:.0f} GeV, "
            f"fewer than {min_events}: recorded, not fitted"
        )
        return SpectrumAnalysis(
            "too few events", reason, n_events, n_in_range, None, None, None, (), (reason,)
        )
    settings = checks or CheckOptions()
    notes: list[str] = []

    def choose(options: CheckOptions, with_fallback: Fallback | None) -> BackgroundDecision:
        return choose_background(
            e,
            n,
            stream_start_gev=stream_start_gev,
            upper_gev=upper_gev,
            sqrt_s=sqrt_s,
            options=options,
            fallback=with_fallback,
            seed=seed,
        )

    try:
        decision = choose(settings, None)
        if not decision.passed:
            decision = _masked_choice(e, n, decision, settings, choose, hunt, notes, seed)
        if not decision.passed and fallback is not None:
            notes.append("no analytic function passed; the symbolic fallback runs")
            decision = choose(settings, fallback)
    except AnomscanError as error:
        reason = f"background choice failed: {error}".splitlines()[0]
        return SpectrumAnalysis(
            "fit failed", reason, n_events, n_in_range, None, None, None, (), (reason,)
        )
    bounds = None if decision.fit_range is None else decision.fit_range.bounds
    if not decision.passed or decision.fit is None:
        failed = _failed_checks(decision)
        reason = (
            "no background passed every check"
            + (" (symbolic fallback included)" if fallback is not None else "")
            + f": {len(failed)} failed checks"
        )
        return SpectrumAnalysis(
            "no accepted background",
            reason,
            n_events,
            n_in_range,
            bounds,
            decision,
            None,
            failed,
            (*decision.trail, *notes, reason),
        )
    try:
        search = search_spectrum(
            e,
            n,
            decision.fit,
            hunt=hunt,
            exclusion_trigger_p=exclusion_trigger_p,
            seed=seed,
        )
    except AnomscanError as error:
        reason = f"bump hunt failed: {error}".splitlines()[0]
        return SpectrumAnalysis(
            "fit failed", reason, n_events, n_in_range, bounds, decision, None, (), (reason,)
        )
    reason = f"{decision.fit.name} accepted; {search.trail[0]}"
    return SpectrumAnalysis(
        "accepted",
        reason,
        n_events,
        n_in_range,
        bounds,
        decision,
        search,
        (),
        (*notes, *decision.trail, *search.trail),
    )
