"""The fit range of a spectrum: the bins a background fit sees, and why (PHYSICS.md 5).

The range is set by the spectrum's physics, never by where its last event happens to fall:

- Start: the larger of the stream's start (PHYSICS.md 3) and the first bin past the turn-on
  of the selected spectrum (`turn_on_peak`), the low-mass sculpting of the selection. The
  turn-on is the rise of the density n_i / w_i (events per GeV) from the stream's start:
  windows of `TURN_ON_WINDOW` = 3 bins (about 3 mass resolutions) are walked upward keeping
  the densest so far; the walk ends at the first window, wholly past that one, that is
  `TURN_ON_FALL_Z` = 3 Poisson sigma less dense, and in any case at the bin below which
  `TURN_ON_QUANTILE` = half of the range's events lie. The densest bin before that end is
  the top when it is not the first bin, beats the first window by more than `TURN_ON_Z` = 2
  sigma, and the bins on its way up are denser than the first window; the fit then starts
  one bin past it (the top bin still sits on the rounded top). A peak after a falling
  stretch, or above the events' median, is never a turn-on: a narrow signal must not move
  the start past itself. The limit: a signal within about two windows of the start of a
  falling low-count spectrum, or on the rising edge of a turn-on, can still set the start.
- Plateau (issue 23): multi-jet thresholds sculpt a plateau, counts about flat per bin (the
  bins are about one resolution wide) with dips, that only starts to fall hundreds of GeV
  above the stream's start; a fit begun inside it fails, and its knee became a false excess.
  The start is then the plateau's knee (`plateau_knee`): on windows of 3 bins, the last bin
  k, past the turn-on start and below the bin under which `KNEE_QUANTILE` = 90 % of the
  events lie, before which the spectrum is a plateau over at least three windows (each of
  the last two holds more than `PLATEAU_FALL` = 0.7 of the one before, by `TURN_ON_Z` = 2
  sigma; a dijet-like spectrum keeps 0.5-0.6) and after which its fall steepens: the ratio
  of consecutive windows drops by more than a factor `KNEE_FACTOR` = 0.75 (3 sigma). No
  rise and no upturn (2 sigma) may lead into k: the edges of a narrow signal, even on a
  steep fall, are an upturn and a steepening, never a plateau's knee. A dip in the plateau
  is no knee (the fall does not steepen past it), so the start is past the last knee, not
  at the first dip. Smoothly falling spectra (p3-p5, UA2) steepen by a few % over 12 bins
  and never have a knee. The limits: at a few hundred events per window a plateau is not
  significantly flat and the start stays (rule step 2 of core.spectrum then refuses a rescue
  mask on a 2 sigma knee); a plateau holding more than 90 % of the events keeps its start.
- End: a fixed upper mass, by default `DEFAULT_UPPER_FRACTION` = 0.65 sqrt_s (8.45 TeV at
  13 TeV, snapped to the first bin edge at or above it), empty bins included. The
  highest-mass pairs of Run 2 sit near 8 TeV, so the range holds every populated bin of a
  Standard Model spectrum; an end at the last non-empty bin would be chosen by the data (that
  bin is non-empty by construction, which no toy reproduces). Events above the end are
  counted in the range's reason, not fitted; a function that rises in the empty tail is
  caught by the falling-background check.

The measurements behind both rules: docs/physics-notes.md and tests/core/test_fitrange.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError
from core.fitfunctions import FloatArray

BoolArray = npt.NDArray[np.bool_]

EDGE_TOLERANCE = 1e-9
"""Relative tolerance when a mass (GeV) is compared with a bin edge."""


DEFAULT_UPPER_FRACTION = 0.65
"""Default upper end of a fit range as a fraction of sqrt_s (see the module docstring)."""

TURN_ON_Z = 2.0
"""Significance (Poisson sigma) of the turn-on top above the first window that moves the start."""

TURN_ON_WINDOW = 3
"""Bins per density window of the turn-on search (about three mass resolutions)."""

TURN_ON_FALL_Z = 3.0
"""Significance of a window below the densest one before it that ends the turn-on search."""

TURN_ON_QUANTILE = 0.5
"""Fraction of the range's events below which the turn-on top must lie."""

KNEE_FACTOR = 0.75
"""A plateau ends at a knee: the fall per window steepens by more than this factor."""

PLATEAU_FALL = 0.7
"""A plateau falls by less than 30 % per window (a dijet-like spectrum: 40-45 %)."""

KNEE_QUANTILE = 0.9
"""Fraction of the range's events below which a plateau's knee must lie."""


def default_upper_edge(edges: npt.ArrayLike, sqrt_s: float) -> float:
    """The fixed upper end (GeV) of a fit range: the first edge at or above 0.65 sqrt_s.

    The last edge of the histogram when it ends below that mass, and never above sqrt_s.
    """
    edge_values = np.asarray(edges, dtype=np.float64)
    target = DEFAULT_UPPER_FRACTION * sqrt_s
    below_limit = edge_values[edge_values <= sqrt_s * (1 + EDGE_TOLERANCE)]
    if below_limit.size == 0:
        raise InvalidInputError(
            f"no bin edge lies below sqrt_s = {sqrt_s} GeV; check sqrt_s and the edges"
        )
    index = int(np.searchsorted(below_limit, target * (1 - EDGE_TOLERANCE), side="left"))
    return float(below_limit[min(index, below_limit.size - 1)])


@dataclass(frozen=True)
class FitRange:
    """The fit range of one spectrum: bins `first_bin` .. `stop_bin - 1`, [lo_gev, hi_gev].

    `floor_bin` is the first bin the range may start at (the stream's start, or the lower
    end of an explicit range): checks that move the start (fit-start stability) stay at or
    above it. `turn_on_bin` is the turn-on top (`turn_on_peak`) that moved the start,
    None when there is none; a plateau's knee (`plateau_knee`) can move it further, which
    `reason` says ("plateau from X up to Y GeV (its knee), fit starts at Y GeV").
    `n_above` counts events above `hi_gev` (not fitted). `reason` says in a sentence why the
    range is what it is, for the decision trail.
    """

    first_bin: int
    stop_bin: int
    lo_gev: float
    hi_gev: float
    floor_bin: int
    turn_on_bin: int | None
    n_above: float
    reason: str

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) in GeV, the form `core.fit.prepare_spectrum` and the tools take."""
        return self.lo_gev, self.hi_gev


def turn_on_peak(counts: FloatArray, widths: FloatArray) -> int | None:
    """Index of the turn-on top of a range's density, or None (module docstring, TURN_ON_*).

    Walks windows of TURN_ON_WINDOW bins upward, keeping the densest; the search ends at
    the first window wholly past it that is TURN_ON_FALL_Z sigma less dense, and at the bin
    below which TURN_ON_QUANTILE of the events lie. The densest bin before that end is the
    top when it beats the first window by TURN_ON_Z sigma and the bins on its way up are
    denser than the first window. Errors are Poisson, a count of zero taken as one.
    """
    size = min(TURN_ON_WINDOW, counts.size)
    kernel = np.ones(size)
    window_counts = np.convolve(counts, kernel, mode="valid")
    window_widths = np.convolve(widths, kernel, mode="valid")
    window_density = window_counts / window_widths
    window_variance = np.maximum(window_counts, 1.0) / window_widths**2
    events_below = np.cumsum(counts) - counts
    end = int(np.count_nonzero(events_below < TURN_ON_QUANTILE * counts.sum()))
    densest = 0
    for index in range(1, window_density.size):
        if window_density[index] > window_density[densest]:
            densest = index
            continue
        fall = window_density[densest] - window_density[index]
        error = np.sqrt(window_variance[densest] + window_variance[index])
        if index >= densest + size and fall > TURN_ON_FALL_Z * error:
            end = min(end, index)
            break
    if end <= 1:
        return None
    density = counts / widths
    top = int(np.argmax(density[:end]))
    if top == 0:
        return None
    error = np.sqrt(max(counts[top], 1.0) / widths[top] ** 2 + window_variance[0])
    if (density[top] - window_density[0]) / error <= TURN_ON_Z:
        return None
    # a turn-on rises on its way up: the bins between the first window and the top's left
    # neighbour are denser than the first window (a falling stretch before a peak is not)
    gap = slice(size, top - 1)
    if top - 1 > size and counts[gap].sum() / widths[gap].sum() <= window_density[0]:
        return None
    return top


def plateau_knee(counts: FloatArray, first: int, z: float = TURN_ON_FALL_Z) -> int | None:
    """The last knee at or above bin `first`, where a plateau ends, or None (module docstring).

    Windows of TURN_ON_WINDOW bins, five in a row P, A, B, C, D with C starting at bin k.
    k is a knee when the spectrum before it is a plateau, A / P and B / A (its fall per
    window) more than TURN_ON_Z sigma above PLATEAU_FALL, and its fall then steepens by more
    than KNEE_FACTOR, ln(B / A) - ln(D / C) > -ln KNEE_FACTOR by `z` Poisson sigma
    (TURN_ON_FALL_Z for the fit start, TURN_ON_Z for `core.spectrum.knee_refusal`). The
    plateau must not rise (B, C no more than TURN_ON_Z sigma above the window before) nor
    turn up into the knee (ln(B / A) - ln(A / P) and ln(C / B) - ln(B / A) no more than
    TURN_ON_Z sigma above zero): the rising edge of a signal, even on a steep fall, is an
    upturn, and its falling edge no knee. k lies below the bin under which KNEE_QUANTILE of
    the events lie.
    """
    size = min(TURN_ON_WINDOW, counts.size)
    window = np.convolve(counts, np.ones(size), mode="valid")
    events_below = np.cumsum(counts) - counts
    limit = int(np.count_nonzero(events_below < KNEE_QUANTILE * counts.sum()))
    knees = np.arange(first + 3 * size, min(limit, window.size - size))
    if knees.size == 0:
        return None
    p, a, b, c, d = (window[knees + shift * size] for shift in (-3, -2, -1, 0, 1))
    filled = np.min([p, a, b, c, d], axis=0) > 0
    p, a, b, c, d = (np.maximum(values, 1.0) for values in (p, a, b, c, d))
    ln_fall = np.log([a / p, b / a, c / b, d / c])
    flat = np.all(
        ln_fall[:2] - np.log(PLATEAU_FALL) > TURN_ON_Z * np.sqrt([1 / a + 1 / p, 1 / b + 1 / a]),
        axis=0,
    )
    no_rise = (b - a <= TURN_ON_Z * np.sqrt(a + b)) & (c - b <= TURN_ON_Z * np.sqrt(b + c))
    no_upturn = (ln_fall[1] - ln_fall[0] <= TURN_ON_Z * np.sqrt(1 / p + 4 / a + 1 / b)) & (
        ln_fall[2] - ln_fall[1] <= TURN_ON_Z * np.sqrt(1 / a + 4 / b + 1 / c)
    )
    steepening = ln_fall[1] - ln_fall[3] + np.log(KNEE_FACTOR)
    error = np.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    found = knees[filled & flat & no_rise & no_upturn & (steepening > z * error)]
    return None if found.size == 0 else int(found[-1])


def fit_range(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    stream_start_gev: float,
    *,
    upper_gev: float | None = None,
    sqrt_s: float = 13000.0,
    min_bins: int = 8,
) -> FitRange:
    """The fit range of a spectrum (edges in GeV) whose stream starts at `stream_start_gev`.

    Starts at the larger of the stream's start and the first bin past the turn-on of the
    spectrum, ends at `upper_gev` (default: `default_upper_edge`, 0.65 sqrt_s) with empty
    bins included; the module docstring gives the rules and their reasons. Raises
    InvalidInputError when the range holds no events or fewer than `min_bins` bins.
    """
    edge_values = np.asarray(edges, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    high = default_upper_edge(edge_values, sqrt_s) if upper_gev is None else float(upper_gev)
    # validates the histogram and the requested range in one place
    requested = fitted_bins(edge_values, count_values, (stream_start_gev, high), sqrt_s=sqrt_s)
    floor_bin, stop_bin = requested.first_bin, requested.stop_bin
    range_counts = count_values[floor_bin:stop_bin]
    widths = np.diff(edge_values[floor_bin : stop_bin + 1])
    peak = turn_on_peak(range_counts, widths)
    first_bin = floor_bin if peak is None else floor_bin + peak + 1
    turn_on_start = first_bin
    knee = plateau_knee(range_counts, first_bin - floor_bin)
    if knee is not None:
        first_bin = floor_bin + knee
    n_above = float(count_values[stop_bin:].sum())
    if stop_bin - first_bin < min_bins:
        raise InvalidInputError(
            f"the fit range [{edge_values[first_bin]:.0f}, {edge_values[stop_bin]:.0f}] GeV "
            f"(start past the turn-on at {edge_values[first_bin]:.0f} GeV) holds "
            f"{stop_bin - first_bin} bins, fewer than {min_bins}; the spectrum is too narrow to "
            "fit, or give an explicit range"
        )
    if not np.any(count_values[first_bin:stop_bin] > 0):
        raise InvalidInputError(
            f"the fit range [{edge_values[first_bin]:.0f}, {edge_values[stop_bin]:.0f}] GeV "
            "holds no events; nothing to fit"
        )
    lo, hi = float(edge_values[first_bin]), float(edge_values[stop_bin])
    start_text = _start_text(edge_values, floor_bin, peak, turn_on_start, first_bin)
    end_text = (
        f"ends at the fixed upper mass {hi:.0f} GeV"
        + (" (0.65 sqrt_s)" if upper_gev is None else "")
        + ", empty bins included"
    )
    if n_above > 0:
        end_text += f"; {n_above:.0f} event(s) above it are not fitted"
    return FitRange(
        first_bin=first_bin,
        stop_bin=stop_bin,
        lo_gev=lo,
        hi_gev=hi,
        floor_bin=floor_bin,
        turn_on_bin=None if peak is None else floor_bin + peak,
        n_above=n_above,
        reason=f"fit range {start_text}; {end_text}",
    )


def _start_text(
    edges: FloatArray, floor_bin: int, peak: int | None, turn_on_start: int, first_bin: int
) -> str:
    """Why the range starts where it does: the stream's start, the turn-on, the plateau."""
    start = float(edges[turn_on_start])
    if peak is None:
        text = f"starts at the stream's start {start:.0f} GeV (no turn-on above it)"
    else:
        text = (
            f"starts at {start:.0f} GeV, one bin past the turn-on peak of the density at "
            f"{edges[floor_bin + peak]:.0f} GeV (stream start {edges[floor_bin]:.0f} GeV)"
        )
    if first_bin == turn_on_start:
        return text
    return (
        text.replace("starts at", "would start at", 1)
        + f", but the spectrum is not yet falling there: plateau from {start:.0f} up to "
        f"{edges[first_bin]:.0f} GeV (its knee), fit starts at {edges[first_bin]:.0f} GeV"
    )


def last_non_empty_edge(edges: npt.ArrayLike, counts: npt.ArrayLike) -> float:
    """Upper edge (GeV) of the last bin with a positive count."""
    counts_array = np.asarray(counts, dtype=np.float64)
    filled = np.flatnonzero(counts_array > 0)
    if filled.size == 0:
        raise InvalidInputError("the spectrum is empty: every bin has zero counts")
    return float(np.asarray(edges, dtype=np.float64)[filled[-1] + 1])


def check_counts(counts: FloatArray) -> None:
    """InvalidInputError unless every bin count is finite and non-negative."""
    if not np.all(np.isfinite(counts)):
        raise InvalidInputError(
            f"counts contain {np.count_nonzero(~np.isfinite(counts))} NaN or infinite values; "
            "fill empty bins with 0"
        )
    if np.any(counts < 0):
        raise InvalidInputError(
            f"counts must be non-negative; found {np.count_nonzero(counts < 0)} negative bins, "
            f"the smallest {counts.min()}"
        )


@dataclass(frozen=True, eq=False)
class FittedBins:
    """A validated histogram (GeV edges) and the bins of its fit range.

    Bins `first_bin` .. `stop_bin - 1` form the range; `used` marks those that enter the
    likelihood (False inside an excluded window).
    """

    edges: FloatArray
    counts: FloatArray
    first_bin: int
    stop_bin: int
    used: BoolArray

    @property
    def range_edges(self) -> FloatArray:
        """Bin edges (GeV) of the fit range."""
        return self.edges[self.first_bin : self.stop_bin + 1]


def fitted_bins(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    exclude: tuple[float, float] | None = None,
) -> FittedBins:
    """Validate a histogram and select the bins of its fit range [lo, hi] GeV.

    The range holds the bins whose edges lie inside [lo, hi]; hi None (or no range) means
    the fixed upper mass `default_upper_edge` (0.65 sqrt_s, empty bins included), and no
    range starts at the first edge; bins starting above sqrt_s are never in it. Bins
    overlapping the `exclude` window [lo, hi] GeV are left out of the likelihood.
    """
    edge_values, count_values = _checked_histogram(edges, counts, sqrt_s)
    low, high = (float(edge_values[0]), None) if fit_range is None else fit_range
    if high is None:
        high = default_upper_edge(edge_values, sqrt_s)
    tolerance = EDGE_TOLERANCE * float(edge_values[-1])
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InvalidInputError(f"fit range must be finite with lo < hi, got [{low}, {high}] GeV")
    if low < edge_values[0] - tolerance or high > edge_values[-1] + tolerance:
        raise InvalidInputError(
            f"fit range [{low}, {high}] GeV lies outside the histogram, which covers "
            f"[{edge_values[0]}, {edge_values[-1]}] GeV; give a range inside it"
        )
    first_bin = int(np.searchsorted(edge_values, low - tolerance, side="left"))
    stop_bin = int(np.searchsorted(edge_values, high + tolerance, side="right")) - 1
    below_limit = int(np.searchsorted(edge_values, sqrt_s, side="left"))
    if np.any(count_values[below_limit:stop_bin] > 0):
        raise InvalidInputError(
            f"the fit range has counts in bins starting above sqrt_s = {sqrt_s} GeV, beyond "
            "the kinematic limit; check sqrt_s or end the range below it"
        )
    stop_bin = min(stop_bin, below_limit)
    if stop_bin <= first_bin:
        raise InvalidInputError(
            f"fit range [{low}, {high}] GeV contains no complete bin below sqrt_s; the edges "
            f"near it are {edge_values[max(first_bin - 1, 0) : first_bin + 2]}"
        )
    range_edges = edge_values[first_bin : stop_bin + 1]
    used = _outside_window(range_edges, exclude, tolerance)
    if not np.any(count_values[first_bin:stop_bin][used] > 0):
        raise InvalidInputError(
            f"all counts in the fit range [{range_edges[0]}, {range_edges[-1]}] GeV are zero; "
            "choose a range that contains events"
        )
    return FittedBins(edge_values, count_values, first_bin, stop_bin, used)


def _checked_histogram(
    edges: npt.ArrayLike, counts: npt.ArrayLike, sqrt_s: float
) -> tuple[FloatArray, FloatArray]:
    """(edges, counts) as float arrays; InvalidInputError names the first thing wrong."""
    edge_values = np.asarray(edges, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    if edge_values.ndim != 1 or count_values.ndim != 1:
        raise InvalidInputError(
            f"edges and counts must be 1-D arrays, got shapes {edge_values.shape} and "
            f"{count_values.shape}"
        )
    if count_values.size == 0:
        raise InvalidInputError("the spectrum is empty: it has no bins")
    if edge_values.size != count_values.size + 1:
        raise InvalidInputError(
            f"a histogram with {count_values.size} bins needs {count_values.size + 1} edges, "
            f"got {edge_values.size}"
        )
    if not (np.all(np.isfinite(edge_values)) and edge_values[0] > 0):
        raise InvalidInputError("bin edges must be finite and positive masses in GeV")
    if np.any(np.diff(edge_values) <= 0):
        raise InvalidInputError("bin edges must increase strictly")
    if not (np.isfinite(sqrt_s) and sqrt_s > edge_values[0]):
        raise InvalidInputError(
            f"sqrt_s = {sqrt_s} GeV must be finite and above the first bin edge "
            f"{edge_values[0]} GeV"
        )
    check_counts(count_values)
    if not np.any(count_values > 0):
        raise InvalidInputError("the spectrum is empty: every bin has zero counts")
    return edge_values, count_values


def _outside_window(
    range_edges: FloatArray, exclude: tuple[float, float] | None, tolerance: float
) -> BoolArray:
    """The bins of the range that do not overlap the `exclude` window [lo, hi] GeV."""
    used = np.ones(range_edges.size - 1, dtype=bool)
    if exclude is None:
        return used
    window_low, window_high = exclude
    if not (np.isfinite(window_low) and np.isfinite(window_high) and window_low < window_high):
        raise InvalidInputError(f"excluded window must be finite with lo < hi, got {exclude} GeV")
    used = ~(
        (range_edges[1:] > window_low + tolerance) & (range_edges[:-1] < window_high - tolerance)
    )
    if used.all():
        raise InvalidInputError(
            f"excluded window {exclude} GeV does not overlap the fit range "
            f"[{range_edges[0]}, {range_edges[-1]}] GeV"
        )
    return used
