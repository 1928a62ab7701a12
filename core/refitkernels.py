"""Compiled loops of the refitted pseudo-scans (`core.bumphunt.refitted_window_maxima`).

Each toy has its own refitted background B', so no table of tails can be shared between
toys; these loops run over toys and windows, bracket each window's t between two cheap
bounds (`window_bounds`: the pmf at D and the ratios of the following terms) and list the
few (toy, window) pairs whose exact tail must be evaluated. Windows are flat arrays: start
and stop columns in the cumulative sums, shape a = 1/r^2 of the background's Gamma prior
(inf: Poisson) and ln Gamma(a).

The bounds. ln Gamma enters through Stirling's series with Binet's bounds,
ln Gamma(x) in [S(x), S(x) + 1/(12 x)], S(x) = (x - 1/2) ln x - x + ln(2 pi) / 2 (x > 0).
P(n >= k) = P(k) (1 + rho_k + rho_k rho_(k+1) + ...), rho_m = P(m + 1) / P(m).
Poisson: rho_m = B / (m + 1) falls, so 1 + rho_k <= sum <= 1 / (1 - rho_k). Negative
binomial (where `core.bumphunt.tail_statistic` uses it, B r^2 >= `POISSON_LIMIT`):
rho_m = q (m + a) / (m + 1) moves monotonically towards q, so it stays between
q min(1, (k + a) / (k + 1)) and q max(1, (k + a) / (k + 1)) and the sum between the
geometric series of the two (no upper bound where the larger ratio is >= 1). Both bounds
are widened by a relative 1e-9 against rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

from core.bumphunt import POISSON_LIMIT

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


@numba.njit(cache=True, nogil=True)
def _stirling(x: float) -> float:
    """(x - 1/2) ln x - x + ln(2 pi) / 2: ln Gamma(x) lies in [this, this + 1/(12 x)], x > 0."""
    return (x - 0.5) * math.log(x) - x + _HALF_LOG_TWO_PI


@numba.njit(cache=True, nogil=True)
def window_bounds(
    count: float, expected: float, shape: float, log_gamma_shape: float
) -> tuple[float, float]:
    """(lower, upper) bounds on t = -ln P(n >= count), count > expected > 0 (module doc)."""
    extra = expected / shape
    if extra >= POISSON_LIMIT:
        log_q = math.log(extra) - math.log1p(extra)
        # -ln P(k) = ln Gamma(k + 1) - ln Gamma(k + a) + ln Gamma(a) - k ln q - a ln(1 - q)
        rest = log_gamma_shape - count * log_q + shape * math.log1p(extra)
        low_pmf = _stirling(count + 1.0) - _stirling(count + shape) - 1.0 / (12.0 * (count + shape))
        high_pmf = _stirling(count + 1.0) + 1.0 / (12.0 * (count + 1.0)) - _stirling(count + shape)
        q = math.exp(log_q)
        step = (count + shape) / (count + 1.0)
        upper = high_pmf + rest + math.log1p(-q * min(1.0, step))
        largest = q * max(1.0, step)
        lower = low_pmf + rest + math.log1p(-largest) if largest < 1.0 else 0.0
    else:
        rest = expected - count * math.log(expected) + _stirling(count + 1.0)
        ratio = expected / (count + 1.0)
        upper = rest + 1.0 / (12.0 * (count + 1.0)) - math.log1p(ratio)
        lower = rest + math.log1p(-ratio)
    margin = 1e-9 * (1.0 + abs(upper))
    return lower - margin, upper + margin


@numba.njit(cache=True, nogil=True)
def bounds_of(
    counts: FloatArray,
    expected: FloatArray,
    shapes: FloatArray,
    log_gamma_shapes: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
) -> None:
    """`window_bounds` of each element into `lower` and `upper`."""
    for index in range(counts.size):
        lower[index], upper[index] = window_bounds(
            counts[index], expected[index], shapes[index], log_gamma_shapes[index]
        )


@numba.njit(cache=True, nogil=True)
def open_windows(
    cumulative_counts: FloatArray,
    cumulative_background: FloatArray,
    starts: IntArray,
    stops: IntArray,
    shapes: FloatArray,
    log_gamma_shapes: FloatArray,
    min_count: float,
    floor: float,
    count_only: bool,
    best: FloatArray,
    rows: IntArray,
    columns: IntArray,
) -> int:
    """The (toy, window) pairs whose exact t can still decide the toy's value.

    Per toy: level = max(floor, the largest lower bound of its candidate windows); the
    pairs whose upper bound reaches the level are open (the window of the toy's maximum is
    among them). With `count_only`, a toy whose largest lower bound reaches the floor is
    decided: best[toy] gets that bound (a value >= floor) and no pair is opened. Pairs are
    written to rows/columns while they have room and counted always.
    """
    found = 0
    for toy in range(cumulative_counts.shape[0]):
        level = floor
        highest = -math.inf
        for window in range(starts.size):
            count = cumulative_counts[toy, stops[window]] - cumulative_counts[toy, starts[window]]
            expected = (
                cumulative_background[toy, stops[window]]
                - cumulative_background[toy, starts[window]]
            )
            if count < min_count or count <= expected:
                continue
            lower, upper = window_bounds(count, expected, shapes[window], log_gamma_shapes[window])
            level = max(level, lower)
            highest = max(highest, upper)
        if highest < level:
            continue
        if count_only and floor > 0.0 and level > floor:
            best[toy] = level
            continue
        for window in range(starts.size):
            count = cumulative_counts[toy, stops[window]] - cumulative_counts[toy, starts[window]]
            expected = (
                cumulative_background[toy, stops[window]]
                - cumulative_background[toy, starts[window]]
            )
            if count < min_count or count <= expected:
                continue
            _, upper = window_bounds(count, expected, shapes[window], log_gamma_shapes[window])
            if upper >= level:
                if found < rows.size:
                    rows[found] = toy
                    columns[found] = window
                found += 1
    return found
