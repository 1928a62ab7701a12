"""The whole per-spectrum rule of the scan, and its two halves for an agent's policy.

Half 1 is `core.background.choose_background` (fit range, F-test along the nested family,
robustness checks, symbolic fallback). Half 2 is `search_spectrum`: the bump hunt against
the accepted background over the fit range, and the window exclusion's diagnostic when the
spectrum's global p is below 0.01 (`core.exclusion`).

The rule, in this order (`analyse_spectrum`; the scan's nodes in agent/scan/nodes/ run the same
steps through the tools, with the same seed, check options and hunt options):

1. Choose: the nested family with every check, no fallback, nothing masked. A function that
   passes is the background (unmasked); go to 4.
2. Masked choice, when no function passed: the bump hunt against the F-test's (rejected)
   function flags a window when its global p is below `EXCLUSION_TRIGGER_P` = 0.01; the mask
   is that of `core.exclusion` (grown to 3 w(m), trimmed to 6 w(m)); the choice is made
   again with the mask left out of every fit. A function that passes every check is the
   background, chosen with the mask. A strong resonance makes every smooth function fail its
   goodness of fit (the demo's T3/jm: every unmasked fit at p ~ 1e-20), so its masked fit,
   not a failed unmasked one, is what it is measured against. The rescue stands only when
   the hunt against the masked background is decisive: its best window's Bonferroni bound,
   n_windows x local p, at most `RESCUE_BOUND` = 1e-5 (`rescue_refusal`, about local Z 5.9
   for 4000 windows); otherwise the spectrum has no accepted background. Why (issue 23): the
   rescue masks the data's own largest excess, conditioned on every function failing, which
   no pseudo-experiment replays, and the masked fit no longer absorbs any of it. Without the
   bound it fired on ~1.5 % of the spectrum-points of a background-only scan (8 rescues in
   the validation's background_3) and the masked hunts led the scan: T7/jb, 22 events on
   5.1, local Z 5.2 (bound 5e-4), scan-wide p 0.0014, against 0.24 without the rescues. The
   line cannot be drawn on the probe's p: the signals' unmasked fits absorb them (a
   120-event resonance at local Z 7.5 masked probes at 7e-3 to 5e-5), the misfit's does not
   (T7/jb probes at ~1e-4). With the bound, 7 of the 11 rescues of a 20-event resonance (the
   validation's X(1500) -> jm, local Z 6.6-8.0, bounds below 1e-7) stand and 4 (local Z
   4.1-5.3) do not. The mask is refused before the choice (`knee_refusal`) when the spectrum
   has a knee (`core.fitrange.plateau_knee`, at 2 sigma instead of the 3 that move the fit
   start) above the mask's lower edge minus its width: the mask must lie wholly above the
   fall start by at least its own width. Functions that all fail on a plateau's knee fail
   for its shape; masking the knee made a background-only plateau (issue 23, T7/jb) report Z
   5.3 locally. Such a spectrum has no accepted background; the refusal is in the trail and,
   in the scan, a `provisional` decision row (`rescue_refused` for the bound).
3. Symbolic fallback, when still none passed and `fallback_applies` (every nested function
   failed the goodness of fit, at least `FALLBACK_MIN_EVENTS` = 1000 events above the
   stream's start: a shape the family can not describe, with events enough to learn one).
   The fallback fits the spectrum unmasked. A scan may cap the number of fallbacks (the
   graph: 4 per scan); that budget is the caller's.
4. Search (`search_spectrum`) against the background of 1-3. A background chosen with a mask
   is fitted with the mask and hunted against as it is: no second exclusion, and no
   agreement test against an unmasked fit that failed its checks (that test rejects the mask
   exactly when a real signal pulls the unmasked fit, by 4.3 sigma in the demo's T3/jm). A
   background that passed unmasked stays unmasked: where its hunt's global p is below 0.01
   the window exclusion of `core.exclusion` refits it with the window masked and records the
   masked prediction and whether the two agree, a diagnostic that never replaces it (the
   pseudo-experiments could not replay a mask set on the data's own excess).

Statuses:

- "accepted": a background passed every check; the bump hunt ran against it. Only these
  spectra enter the ranking of excesses and the scan-wide look-elsewhere test.
- "no accepted background": every analytic function, the masked choice and the fallback
  failed a check (or did not run); the failed checks are listed; no bump is hunted (an
  excess against a background that failed its checks was ranked first on a background-only
  sample).
- "too few events": fewer than `MIN_EVENTS_IN_FIT_RANGE` events above the stream's start.
- "fit failed": the range or the fits could not be built (the reason is kept).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from core.background import BackgroundDecision, CheckOptions, Fallback, choose_background
from core.bumphunt import (
    DEFAULT_HUNT,
    MIN_TOYS_SMALL_P,
    BumpHuntResult,
    HuntOptions,
    bonferroni_bound,
    bump_hunt,
)
from core.errors import AnomscanError, FitError, InvalidInputError
from core.exclusion import EXCLUSION_TRIGGER_P, WindowExclusion, window_exclusion
from core.fit import (
    FitResult,
    background_jacobian,
    expected_errors,
    fit_background,
    prepare_spectrum,
)
from core.fitfunctions import FUNCTIONS, BackgroundFunction
from core.fitrange import TURN_ON_Z, plateau_knee
from core.symbolic import lift_constants, symbolic_background

FloatArray = npt.NDArray[np.float64]

SpectrumStatus = Literal["accepted", "no accepted background", "too few events", "fit failed"]
STATUSES: Final = ("accepted", "no accepted background", "too few events", "fit failed")

PROBE_MAX_TOYS: Final = MIN_TOYS_SMALL_P
"""Toys at most of the rescue probe (`flagged_window`): it only decides whether the global p
is below the exclusion trigger (0.01), which 10 000 toys settle; a precise p of a window
that is then masked, or of a spectrum left without a background, is never reported."""

MIN_EVENTS_IN_FIT_RANGE: Final = 40
"""Spectra with fewer events above the stream's start are recorded, not fitted."""

FALLBACK_MIN_EVENTS: Final = 1000
"""The symbolic fallback needs at least this many events above the stream's start."""

MaskSource = Literal["choice"]

RESCUE_BOUND: Final = 1e-5
"""A background rescued by rule step 2 is kept only when the hunt against it has a best
window whose Bonferroni bound n_windows x local p is at most this (module docstring)."""


@dataclass(frozen=True, eq=False)
class SpectrumSearch:
    """Half 2 of the rule: the bump hunt against an accepted background, with its exclusion.

    `fit` is the final background (the accepted one; the window exclusion never replaces it);
    `counts`, `background` and `background_error` (the 1-sigma fit uncertainty of the
    background per bin, `core.fit.expected_errors`) cover bins [first_bin, stop_bin) of the
    histogram; `bump` is the hunt against the final background (bins relative to
    `first_bin`); `bump_unmasked` is the same object (kept for readers of both).
    `masked_window_gev` is the window the final fit leaves out (None: none), `mask_from`
    "choice" when the background was chosen with it (rule step 2); the window exclusion
    (`exclusion`) is a diagnostic and never masks the background. `background_jacobian`
    (d mu / d parameters, bins [first_bin, stop_bin)) and `background_covariance` are the
    final fit's, folded into the hunt's windows (None when the hunt took the background as
    exact).
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
    masked_window_gev: tuple[float, float] | None = None
    mask_from: MaskSource | None = None
    background_jacobian: FloatArray | None = field(default=None, repr=False)
    background_covariance: FloatArray | None = field(default=None, repr=False)

    @property
    def function(self) -> str:
        """Name (or symbolic expression) of the final background function."""
        return self.fit.name


def resolve_background_function(
    function: BackgroundFunction | str, parameters: tuple[float, ...] | None
) -> BackgroundFunction:
    """A function by family name, or a symbolic expression with its constants."""
    if isinstance(function, BackgroundFunction):
        return function
    if function in FUNCTIONS:
        return FUNCTIONS[function]
    text = function.removeprefix("symbolic: ").strip()
    if parameters is not None:
        return symbolic_background(text, parameters[1:])
    expression, constants = lift_constants(text)
    return symbolic_background(expression, constants)


def _check_mask(
    edges: FloatArray, counts: FloatArray, fit: FitResult, window: tuple[float, float]
) -> None:
    """Raise unless `fit` left out exactly the bins of `window` (GeV)."""
    expected = prepare_spectrum(
        edges, counts, fit.fit_range, sqrt_s=fit.sqrt_s, exclude=window
    ).used
    if expected.shape != fit.used.shape or not np.array_equal(expected, fit.used):
        raise InvalidInputError(
            f"the background {fit.name} was not fitted with {window[0]:.0f}-{window[1]:.0f} "
            "GeV masked; give the fit made with that window excluded, or the function"
        )


def search_spectrum(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: FitResult | BackgroundFunction | str,
    fit_range: tuple[float, float] | None = None,
    *,
    parameters: tuple[float, ...] | None = None,
    masked_window_gev: tuple[float, float] | None = None,
    sqrt_s: float = 13000.0,
    hunt: HuntOptions = DEFAULT_HUNT,
    exclusion_trigger_p: float = EXCLUSION_TRIGGER_P,
    seed: int = 0,
) -> SpectrumSearch:
    """Bump hunt against an accepted background, window exclusion, final background.

    `background` is an accepted fit (its range is used), or a function (family name,
    BackgroundFunction or symbolic expression; `parameters` (ln p1, ...) start it) fitted
    here over `fit_range` [lo, hi] GeV. Edges in GeV. `masked_window_gev` [lo, hi] GeV: the
    background was chosen with that window masked (rule step 2, module docstring); a function
    is fitted with it left out, a fit must have left it out, and no window exclusion runs.
    Otherwise the window exclusion's diagnostic runs when the global p of the hunt is below
    `exclusion_trigger_p` (module docstring of core.exclusion); the background stays.
    """
    e = np.asarray(edges, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    window = (
        None
        if masked_window_gev is None
        else (
            float(masked_window_gev[0]),
            float(masked_window_gev[1]),
        )
    )
    fit = _searched_background(e, n, background, fit_range, parameters, window, sqrt_s, seed)
    first, stop = fit.first_bin, fit.stop_bin
    if n.shape != (e.size - 1,) or stop > n.size:
        raise InvalidInputError(
            f"the fit covers bins [{first}, {stop}) but the histogram has {n.size} bins"
        )
    bump = _hunt_against(e, n, (first, stop), fit, hunt, seed)
    masked_name = "masked " if window is not None else ""
    trail = [
        f"bump hunt against the {masked_name}{fit.name}: best window {bump.mass_low:.0f}-"
        f"{bump.mass_high:.0f} GeV, {bump.data:.0f} events on {bump.background:.1f}, local Z "
        f"{bump.local_z:.2f}, global p {bump.global_p_text} ({bump.n_toys} toys, "
        f"{bump.global_p_method})"
    ]
    exclusion = None
    mask_from: MaskSource | None = None if window is None else "choice"
    if window is not None:
        trail.append(
            f"no window exclusion: the background was chosen with {window[0]:.0f}-"
            f"{window[1]:.0f} GeV masked (every unmasked function failed its checks)"
        )
    elif bump.global_p < exclusion_trigger_p:
        exclusion = window_exclusion(e, n, fit, bump, seed=seed)
        trail.append("window exclusion: " + exclusion.reason)
    else:
        trail.append(f"no window exclusion: global p {bump.global_p_text} >= {exclusion_trigger_p}")
    uncertainty = fit_uncertainty(fit, e) if bump.background_uncertainty else None
    return SpectrumSearch(
        fit=fit,
        first_bin=first,
        stop_bin=stop,
        edges=e[first : stop + 1].copy(),
        counts=n[first:stop].copy(),
        background=np.asarray(fit.expected, dtype=np.float64).copy(),
        background_error=expected_errors(fit, e),
        bump=bump,
        bump_unmasked=bump,
        exclusion=exclusion,
        hunt=hunt,
        trail=tuple(trail),
        masked_window_gev=window,
        mask_from=mask_from,
        background_jacobian=None if uncertainty is None else uncertainty[0],
        background_covariance=None if uncertainty is None else uncertainty[1],
    )


def _searched_background(
    edges: FloatArray,
    counts: FloatArray,
    background: FitResult | BackgroundFunction | str,
    fit_range: tuple[float, float] | None,
    parameters: tuple[float, ...] | None,
    window: tuple[float, float] | None,
    sqrt_s: float,
    seed: int,
) -> FitResult:
    """The background `search_spectrum` hunts against: the fit given, or `background` fitted.

    A fit given with a masked `window` must have left exactly that window out.
    """
    if isinstance(background, FitResult):
        if window is not None:
            _check_mask(edges, counts, background, window)
        return background
    if fit_range is None:
        raise InvalidInputError(
            "search_spectrum needs a fit_range [lo, hi] GeV when given a function instead of a fit"
        )
    function = resolve_background_function(background, parameters)
    starts = None if parameters is None else [parameters]
    return fit_background(
        edges, counts, function, fit_range, sqrt_s=sqrt_s, starts=starts, exclude=window, seed=seed
    )


def _hunt_against(
    edges: FloatArray,
    counts: FloatArray,
    bins: tuple[int, int],
    fit: FitResult,
    hunt: HuntOptions,
    seed: int,
) -> BumpHuntResult:
    """The bump hunt over the histogram's bins [first, stop) against `fit`'s expected counts.

    The fit's uncertainty is folded into the windows' tails (`core.bumphunt`) when the hunt
    asks for it and the derivatives are finite; with them each toy of the global p is also
    refitted to first order over the bins the fit used (`fit.used`), as the data were.
    The result says both (`background_uncertainty`, `global_p_method`).
    """
    first, stop = bins
    uncertainty = fit_uncertainty(fit, edges) if hunt.fold_background_uncertainty else None
    jacobian, covariance = uncertainty or (None, None)
    fitted = None if uncertainty is None else np.asarray(fit.used, dtype=bool)
    return bump_hunt(
        counts[first:stop],
        np.asarray(fit.expected, dtype=np.float64),
        edges[first : stop + 1],
        width_min=hunt.width_min,
        width_max=hunt.width_max,
        min_toys=hunt.min_toys,
        max_toys=hunt.max_toys,
        target_rel_error=hunt.target_rel_error,
        min_window_background=hunt.min_window_background,
        min_window_count=hunt.min_window_count,
        jacobian=jacobian,
        covariance=covariance,
        fitted=fitted,
        seed=seed,
    )


def fit_uncertainty(fit: FitResult, edges: FloatArray) -> tuple[FloatArray, FloatArray] | None:
    """(d mu / d parameters over the fit range, covariance) of `fit`, None where not finite.

    Without finite derivatives no uncertainty can be propagated: the hunt then takes the
    background as exact (Poisson tails) and says so (`background_uncertainty`).
    """
    if not (fit.accurate_covariance and np.all(np.isfinite(fit.covariance))):
        return None
    try:
        jacobian = background_jacobian(fit, edges)
    except FitError:
        return None
    return jacobian, np.asarray(fit.covariance, dtype=np.float64)


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


def fallback_applies(nested_gof_failed: Sequence[bool], n_in_range: float) -> tuple[bool, str]:
    """Whether the symbolic fallback runs (rule step 3), and why.

    `nested_gof_failed` holds, per nested function tried, whether it failed its goodness
    of fit; `n_in_range` is the number of events above the stream's start. A function that
    describes the shape (goodness of fit passed) but fails another check is not cured by a
    freer function; fewer than `FALLBACK_MIN_EVENTS` events are too few for a shape search.
    """
    if not nested_gof_failed or not all(nested_gof_failed):
        return (
            False,
            "a nested function fits the shape (goodness of fit passed); its failing checks "
            "are not cured by a freer function",
        )
    if n_in_range < FALLBACK_MIN_EVENTS:
        return (
            False,
            f"{n_in_range:.0f} events in the fit range < {FALLBACK_MIN_EVENTS}: too sparse for "
            "a shape search",
        )
    return True, "every nested function failed the goodness of fit"


def _gof_failed(decision: BackgroundDecision) -> list[bool]:
    """Per nested candidate: did it fail its goodness of fit (False when not checked)."""
    return [
        candidate.report is not None
        and any(
            check.name == "goodness_of_fit" and not check.passed
            for check in candidate.report.checks
        )
        for candidate in decision.candidates
        if candidate.source == "nested"
    ]


def knee_refusal(
    edges: FloatArray,
    counts: FloatArray,
    fit_range: tuple[float, float],
    window: tuple[float, float],
) -> str | None:
    """Why rule step 2 refuses the mask `window` (GeV) on a fit over `fit_range`, or None.

    The mask must lie wholly above the fall start by at least its own width: a knee of the
    spectrum (`core.fitrange.plateau_knee`, searched from the fit start at TURN_ON_Z = 2
    sigma, looser than the 3 sigma that moves the start) at or above `low - width` puts the
    window on the misfit of a plateau or turn-on, a shape no function of the family has, not
    on a signal (no rise into a knee). Such a spectrum has no accepted background.
    """
    e = np.asarray(edges, dtype=np.float64)
    first = int(np.searchsorted(e, fit_range[0] * (1 - 1e-9), side="left"))
    stop = int(np.searchsorted(e, fit_range[1] * (1 + 1e-9), side="right")) - 1
    knee = plateau_knee(np.asarray(counts, dtype=np.float64)[first:stop], 0, z=TURN_ON_Z)
    low, high = window
    if knee is None or e[first + knee] < low - (high - low):
        return None
    return (
        f"mask {low:.0f}-{high:.0f} GeV refused: the spectrum has a knee at "
        f"{e[first + knee]:.0f} GeV ({TURN_ON_Z:.0f} sigma), less than the mask's width "
        f"{high - low:.0f} GeV below it; the misfit is the shape of a plateau or turn-on, "
        "not an excess"
    )


def rescue_refusal(statistic: float, n_windows: int, function: str) -> str | None:
    """Why the background rescued by rule step 2 is not kept, or None when it is.

    The hunt against the masked `function` has its best window at t = -ln(local p) =
    `statistic` among `n_windows` windows; the rescue stands only when the Bonferroni bound
    n_windows x local p is at most `RESCUE_BOUND` (module docstring).
    """
    bound = bonferroni_bound(statistic, n_windows)
    if bound <= RESCUE_BOUND:
        return None
    return (
        f"rescue not kept: against the masked {function} the best window's local p times "
        f"{n_windows} windows is {bound:.2g} > {RESCUE_BOUND:g} (a mask set on the data's own "
        "largest excess, which no pseudo-experiment replays, stands only for an excess no "
        "fluctuation of a described spectrum reaches)"
    )


def flagged_window(
    edges: FloatArray,
    counts: FloatArray,
    decision: BackgroundDecision,
    *,
    hunt: HuntOptions,
    exclusion_trigger_p: float,
    seed: int,
) -> tuple[tuple[float, float] | None, str]:
    """Rule step 2's window: the mask to choose again with, or None, and a line for the trail.

    The hunt against the F-test's rejected function (`search_spectrum`, the agent's probe
    too, both with at most `PROBE_MAX_TOYS` toys) flags a window when its global p is below
    `exclusion_trigger_p`; the mask is the window exclusion's (signal width,
    `core.exclusion.masked_window`).
    """
    fit = decision.selection.fit
    if fit is None:
        return None, "no function converged: no window to mask"
    toys = min(hunt.max_toys, PROBE_MAX_TOYS)
    probe_hunt = replace(hunt, min_toys=min(hunt.min_toys, toys), max_toys=toys)
    probe = search_spectrum(
        edges, counts, fit, hunt=probe_hunt, exclusion_trigger_p=exclusion_trigger_p, seed=seed
    )
    bump = probe.bump_unmasked
    if probe.exclusion is None:
        return None, (
            f"no window to mask: global p {bump.global_p_text} >= {exclusion_trigger_p} against "
            f"the rejected {fit.name}"
        )
    low, high = probe.exclusion.window_gev
    refusal = knee_refusal(edges, counts, fit.fit_range, (low, high))
    if refusal is not None:
        return None, (
            f"no function passed; the hunt against the rejected {fit.name} flags "
            f"{bump.mass_low:.0f}-{bump.mass_high:.0f} GeV (global p {bump.global_p_text}), "
            + refusal
        )
    return (low, high), (
        f"no function passed; the hunt against the rejected {fit.name} flags "
        f"{bump.mass_low:.0f}-{bump.mass_high:.0f} GeV (global p {bump.global_p_text}): "
        f"choosing again with {low:.0f}-{high:.0f} GeV masked"
    )


def _rule_choice(
    choose: Callable[..., BackgroundDecision],
    edges: FloatArray,
    counts: FloatArray,
    checks: CheckOptions,
    hunt: HuntOptions,
    fallback: Fallback | None,
    exclusion_trigger_p: float,
    n_in_range: float,
    seed: int,
    notes: list[str],
) -> tuple[BackgroundDecision, tuple[float, float] | None]:
    """Rule steps 1-3 (module docstring): (the background decision, the window it masks).

    `choose(options=..., fallback=...)` is `choose_background` on the spectrum; every step
    taken adds a line to `notes`.
    """
    mask: tuple[float, float] | None = None
    decision = choose(options=checks, fallback=None)
    if not decision.passed:
        window, line = flagged_window(
            edges, counts, decision, hunt=hunt, exclusion_trigger_p=exclusion_trigger_p, seed=seed
        )
        notes.append(line)
        if window is not None:
            masked = choose(options=replace(checks, window=window), fallback=None)
            notes.append(
                f"with the window masked {masked.chosen} passes every check"
                if masked.passed
                else "with the window masked no function passes either"
            )
            if masked.passed:
                decision, mask = masked, window
    if not decision.passed and fallback is not None:
        use, why = fallback_applies(_gof_failed(decision), n_in_range)
        notes.append(("the symbolic fallback runs: " if use else "no fallback: ") + why)
        if use:
            decision = choose(options=checks, fallback=fallback)
    return decision, mask


def analyse_spectrum(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    stream_start_gev: float,
    *,
    checks: CheckOptions,
    hunt: HuntOptions,
    fallback: Fallback | None = None,
    sqrt_s: float = 13000.0,
    upper_gev: float | None = None,
    exclusion_trigger_p: float = EXCLUSION_TRIGGER_P,
    min_events: int = MIN_EVENTS_IN_FIT_RANGE,
    seed: int = 0,
) -> SpectrumAnalysis:
    """The rule of the module docstring on one spectrum: choice, masked choice, fallback, search.

    `stream_start_gev` is the stream's fit start (PHYSICS.md 3); the range follows
    `core.fitrange.fit_range`. `checks` and `hunt` are the scan's settings, given explicitly so
    that a caller states the rule it runs; `fallback` None runs no fallback (a scan whose
    fallback budget is spent); `seed` seeds every step. Errors of the fits become status
    "fit failed" with the reason; bad histograms still raise InvalidInputError.
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
    notes: list[str] = []
    choose = functools.partial(
        choose_background,
        e,
        n,
        stream_start_gev=stream_start_gev,
        upper_gev=upper_gev,
        sqrt_s=sqrt_s,
        seed=seed,
    )
    try:
        decision, mask = _rule_choice(
            choose, e, n, checks, hunt, fallback, exclusion_trigger_p, n_in_range, seed, notes
        )
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
        trail = (*decision.trail, *notes, reason)
        return SpectrumAnalysis(
            "no accepted background",
            reason,
            n_events,
            n_in_range,
            bounds,
            decision,
            None,
            failed,
            trail,
        )
    counted = (n_events, n_in_range)
    search_options = (hunt, exclusion_trigger_p, seed)
    return _searched(e, n, decision, decision.fit, mask, search_options, counted, notes)


def _searched(
    edges: FloatArray,
    counts: FloatArray,
    decision: BackgroundDecision,
    fit: FitResult,
    mask: tuple[float, float] | None,
    search_options: tuple[HuntOptions, float, int],
    counted: tuple[float, float],
    notes: list[str],
) -> SpectrumAnalysis:
    """Rule step 4 on an accepted background `fit`: "accepted", or "fit failed" with why.

    `search_options` are the hunt options, the exclusion trigger p and the seed; `counted`
    the events in the spectrum and above the stream's start.
    """
    hunt, exclusion_trigger_p, seed = search_options
    n_events, n_in_range = counted
    bounds = None if decision.fit_range is None else decision.fit_range.bounds
    try:
        search = search_spectrum(
            edges,
            counts,
            fit,
            masked_window_gev=mask,
            hunt=hunt,
            exclusion_trigger_p=exclusion_trigger_p,
            seed=seed,
        )
    except AnomscanError as error:
        reason = f"bump hunt failed: {error}".splitlines()[0]
        return SpectrumAnalysis(
            "fit failed", reason, n_events, n_in_range, bounds, decision, None, (), (reason,)
        )
    bump = search.bump
    weak = (
        rescue_refusal(bump.statistic, bump.n_windows, fit.name)
        if search.mask_from == "choice"
        else None
    )
    if weak is not None:
        trail = (*notes, *decision.trail, *search.trail, weak)
        return SpectrumAnalysis(
            "no accepted background", weak, n_events, n_in_range, bounds, decision, None, (), trail
        )
    reason = f"{fit.name} accepted; {search.trail[0]}"
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
