"""Compiled loops of the refitted pseudo-scans (`core.bumphunt.refitted_window_maxima`).

Each toy has its own refitted background B', so no table of tails can be shared between
toys; these loops run over toys and windows, bracket each window's t between two bounds
that need no incomplete function (`window_bounds`) and list the few (toy, window) pairs
whose exact tail must still be evaluated. Windows are flat arrays: start and stop columns
in the cumulative sums, shape a = 1/r^2 of the background's Gamma prior (inf: Poisson) and
ln Gamma(a).

The bounds. t = -ln P(k) - ln S, S = 1 + rho_k + rho_k rho_(k+1) + ..., with
rho_m = P(m + 1) / P(m): B / (m + 1) (Poisson, falling) or, where
`core.bumphunt.tail_statistic` uses the negative binomial (B r^2 >= `POISSON_LIMIT`),
q (m + a) / (m + 1), which moves monotonically towards q. After the first J terms of S the
rest lies between the last term times rho / (1 - rho) for the smallest and for the largest
later ratio (Poisson: 0 and the next one; negative binomial: the smaller and the larger of
the next one and q; no upper bound where the largest is >= 1, and the lower bound on t is
then 0). ln Gamma enters through Stirling's series with Binet's bounds: ln Gamma(x) - S(x)
lies in (0, 1/(12 x)), S(x) = (x - 1/2) ln x - x + ln(2 pi) / 2; for a >= 10 the difference
ln Gamma(k + a) - ln Gamma(a) is taken from S(k + a) - S(a) written without cancellation.
Both bounds are widened by a relative 1e-9 against rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

from core.bumphunt import POISSON_LIMIT

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CHEAP_TERMS = 2
"""Terms of S summed for the first bracket of every window."""

REFINED_TERMS = 64
"""Terms of S at most for the bracket of a window that may matter."""

_REST_SHARE = 0.005
"""The series stops once its rest is below this share of the sum so far (t to ~0.005)."""

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


@numba.njit(cache=True, nogil=True)
def _stirling(x: float) -> float:
    """(x - 1/2) ln x - x + ln(2 pi) / 2: ln Gamma(x) lies in (this, this + 1/(12 x)), x > 0."""
    return (x - 0.5) * math.log(x) - x + _HALF_LOG_TWO_PI


@numba.njit(cache=True, nogil=True)
def _log_rising(count: float, shape: float, log_gamma_shape: float) -> tuple[float, float]:
    """Bounds on ln Gamma(count + shape) - ln Gamma(shape)."""
    upper_error = 1.0 / (12.0 * (count + shape))
    if shape >= 10.0:
        middle = (shape - 0.5) * math.log1p(count / shape) + count * math.log(count + shape) - count
        return middle - 1.0 / (12.0 * shape), middle + upper_error
    middle = _stirling(count + shape) - log_gamma_shape
    return middle, middle + upper_error


@numba.njit(cache=True, nogil=True)
def window_bounds(
    count: float, expected: float, shape: float, log_gamma_shape: float, terms: int
) -> tuple[float, float]:
    """(lower, upper) bounds on t = -ln P(n >= count), count > expected > 0.

    Up to `terms` terms of the series (module docstring).
    """
    extra = expected / shape
    negative_binomial = extra >= POISSON_LIMIT
    factorial = _stirling(count + 1.0)
    if negative_binomial:
        q = extra / (1.0 + extra)
        rising_low, rising_high = _log_rising(count, shape, log_gamma_shape)
        rest = -count * (math.log(extra) - math.log1p(extra)) + shape * math.log1p(extra)
        pmf_low = factorial - rising_high + rest
        pmf_high = factorial + 1.0 / (12.0 * (count + 1.0)) - rising_low + rest
    else:
        q = 0.0
        pmf_low = expected - count * math.log(expected) + factorial
        pmf_high = pmf_low + 1.0 / (12.0 * (count + 1.0))
    total = 1.0
    term = 1.0
    rest_low, rest_high = 0.0, math.inf
    for j in range(terms):
        m = count + j
        ratio = q * (m + shape) / (m + 1.0) if negative_binomial else expected / (m + 1.0)
        smallest, largest = min(ratio, q), max(ratio, q)
        rest_low = term * smallest / (1.0 - smallest)
        rest_high = term * largest / (1.0 - largest) if largest < 1.0 else math.inf
        if j == terms - 1 or rest_high - rest_low <= _REST_SHARE * total:
            break
        term *= ratio
        total += term
    upper = pmf_high - math.log(total + rest_low)
    lower = pmf_low - math.log(total + rest_high) if rest_high < math.inf else 0.0
    margin = 1e-9 * (1.0 + abs(upper))
    return max(lower - margin, 0.0), upper + margin


@numba.njit(cache=True, nogil=True)
def bounds_of(
    counts: FloatArray,
    expected: FloatArray,
    shapes: FloatArray,
    log_gamma_shapes: FloatArray,
    terms: int,
    lower: FloatArray,
    upper: FloatArray,
) -> None:
    """`window_bounds` of each element into `lower` and `upper`."""
    for index in range(counts.size):
        lower[index], upper[index] = window_bounds(
            counts[index], expected[index], shapes[index], log_gamma_shapes[index], terms
        )


@numba.njit(cache=True, nogil=True)
def background_ranges(
    cumulative_background: FloatArray,
    starts: IntArray,
    stops: IntArray,
    lowest: FloatArray,
    highest: FloatArray,
) -> None:
    """The smallest and the largest background of each window over the toys (rows)."""
    lowest[:] = math.inf
    highest[:] = -math.inf
    for toy in range(cumulative_background.shape[0]):
        for window in range(starts.size):
            expected = (
                cumulative_background[toy, stops[window]]
                - cumulative_background[toy, starts[window]]
            )
            lowest[window] = min(lowest[window], expected)
            highest[window] = max(highest[window], expected)


@numba.njit(cache=True, nogil=True)
def open_windows(
    cumulative_counts: FloatArray,
    cumulative_background: FloatArray,
    starts: IntArray,
    stops: IntArray,
    shapes: FloatArray,
    log_gamma_shapes: FloatArray,
    screen: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
    floor: float,
    count_only: bool,
    best: FloatArray,
    rows: IntArray,
    columns: IntArray,
) -> int:
    """The (toy, window) pairs whose exact t can still decide the toy's value.

    `screen` (per window: lowest background, 1 / level step, levels and the count needed
    at each; `core.bumphunt`) drops with one comparison a window whose count cannot reach
    the floor, or is below the hunt's minimum, at the highest level at or below its
    background. Per toy, the level is the floor raised to the largest lower bound of its
    windows. A first pass brackets every screened window cheaply (`CHEAP_TERMS`); a
    second one refines the bracket (`REFINED_TERMS`) where the cheap upper bound reaches
    the level, and opens the window if the refined one still does: the window of the
    toy's maximum is always among the opened ones. With `count_only` a toy is decided as
    soon as the level exceeds the floor: best[toy] gets the level (a value >= floor, not
    the maximum) and none of its pairs stays open. Pairs are written to rows/columns while
    they have room and counted always.
    """
    lowest, inverse_step, levels, minimum = screen
    top = levels.shape[1] - 1
    passed = np.empty(starts.size, dtype=np.int64)
    passed_counts = np.empty(starts.size)
    passed_expected = np.empty(starts.size)
    passed_upper = np.empty(starts.size)
    found = 0
    decide = count_only and floor > 0.0
    for toy in range(cumulative_counts.shape[0]):
        n_passed = 0
        level = floor
        highest = -math.inf
        for window in range(starts.size):
            low, high = starts[window], stops[window]
            count = cumulative_counts[toy, high] - cumulative_counts[toy, low]
            expected = cumulative_background[toy, high] - cumulative_background[toy, low]
            if count <= expected or count < minimum[window, 0]:
                continue
            step = min(int((expected - lowest[window]) * inverse_step[window]), top)
            while step > 0 and levels[window, step] > expected:
                step -= 1
            if count < minimum[window, step]:
                continue
            lower, upper = window_bounds(
                count, expected, shapes[window], log_gamma_shapes[window], CHEAP_TERMS
            )
            level = max(level, lower)
            if decide and level > floor:
                break
            highest = max(highest, upper)
            if upper >= floor:
                passed[n_passed] = window
                passed_counts[n_passed] = count
                passed_expected[n_passed] = expected
                passed_upper[n_passed] = upper
                n_passed += 1
        if decide and level > floor:
            best[toy] = level
            continue
        if highest < level:
            continue
        first = found
        for index in range(n_passed):
            if passed_upper[index] < level:
                continue
            window = passed[index]
            lower, upper = window_bounds(
                passed_counts[index],
                passed_expected[index],
                shapes[window],
                log_gamma_shapes[window],
                REFINED_TERMS,
            )
            level = max(level, lower)
            if decide and level > floor:
                found = first
                best[toy] = level
                break
            if upper >= level:
                if found < rows.size:
                    rows[found] = toy
                    columns[found] = window
                found += 1
    return found
