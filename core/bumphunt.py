"""BumpHunter (Choudalakis, arXiv:1101.0390) on one spectrum against a fitted background.

Method (PHYSICS.md section 6):

- Windows are all runs of contiguous bins of widths `width_min`..`width_max` (default
  1..N/2) inside the scan range, the bins from the first to the last one with background
  B > 0 (pyBumpHunter trims empty background bins the same way).
- In a window with data D and background B (both summed over its bins) the excess-only
  local p-value is p = P(n >= D | B) = P(D, B), the regularised lower incomplete gamma
  function, when D > B > 0 and D >= `MIN_WINDOW_COUNT`, and p = 1 otherwise (a deficit is
  not a bump). With the fitted background's uncertainty (below) the tail is negative
  binomial instead.
- The test statistic is t = -ln(min p) over all windows; the best window is the first
  minimum, scanning widths from small to large and positions from low to high mass.
- The global p-value is the fraction of background-only Poisson pseudo-experiments with
  t_toy >= t_obs; Z = Phi^-1(1 - p) (`core.significance`), clipped at 0 when p >= 0.5.
  With the fit's `jacobian` and `fitted` mask (a fitted background, `core.spectrum`) each
  toy is refitted to first order around the accepted fit (`core.pseudodata`) and scanned
  against its own B', as the data were against the fit that absorbed part of their
  fluctuations ("toys (refitted)", `refitted_window_maxima`); without them (a background
  given as an array) the toys are scanned against the fixed B ("toys"), a p biased towards
  1: 200 p4 fits of 1e4 background-only events gave a fixed-toy p of mean 0.58 (KS p
  1e-4) and a refitted one of mean 0.52 (KS p 0.42; docs/physics-notes.md).
- Sparse tails (PHYSICS.md 6, issue 23), both ways. Every window with B > 0 is scanned
  (`MIN_WINDOW_BACKGROUND` = 0; a user may still set a minimum expected count), so 8-10
  events where the fit predicts 0.05 are a discovery candidate (before, windows expecting
  < 1 event were not scanned and such a signal was only seen diluted in a window widened to
  B >= 1, at the wrong mass). Two rules keep a tiny B from claiming a discovery on 1-2
  events, identically for the data, every per-spectrum toy and every scan-wide pseudo-scan
  (so the global p stays exact):
  1. A window with fewer than `MIN_WINDOW_COUNT` = 5 observed events is not a candidate
     (t = 0). Why 5: the fitted tail, extrapolated over empty bins, can be low by an order
     of magnitude. If the truth is 10x the fitted B = 0.01, a window reaches the local Z
     ~5 of 3 events with P(n >= 3 | 0.1) = 1.5e-4, and a scan has ~1e4 such tail windows
     (63 spectra x AR points x widths): about one false 5-sigma window per scan. With 5
     events P(n >= 5 | 0.1) = 7.7e-8 (8e-4 per scan), even 30x low gives 1.6e-5, while a
     real signal of mean 8 (10) still passes with 90 % (97 %).
  2. The background's fit uncertainty is folded into the local p. B_w is uncertain by
     sigma_w = sqrt(j_w C j_w^T), j_w the sum over the window's bins of the rows of
     `core.fit.background_jacobian` (d mu_i / d parameters), C the fit covariance. With
     B' ~ Gamma(mean B_w, relative sd r_w = sigma_w / B_w) the count is negative binomial:
     P(n >= D) = I_q(D, 1/r^2), q = B r^2 / (1 + B r^2) (regularised incomplete beta,
     continuous in non-integer D for weighted data), which tends to P(D, B) as r -> 0
     (t differs by ~B r^2 t; the Poisson tail is used where B r^2 < 1e-12). Without a
     Jacobian (a tool given only a background array) the Poisson tail applies, and the
     result says which (`background_uncertainty`). The toys are still drawn from
     Poisson(B): the global p is exact for the fitted B; the folding only makes the
     statistic less eager where B is poorly known.
  Local Z of D events (rates, Poisson / r = 50 % / r = 100 %):
  B = 0.01: D = 3: 5.10 / 4.99 / 4.76, D = 5: 7.06 / 6.80 / 6.37, D = 8: 9.41 / 8.91 /
  8.23, D = 10: 10.76 / 10.10 / 9.27; B = 0.1: D = 3: 3.61 / 3.46 / 3.17, D = 5: 5.25 /
  4.91 / 4.37, D = 8: 7.24 / 6.61 / 5.74, D = 10: 8.39 / 7.56 / 6.51; B = 1: D = 3:
  1.40 / 1.29 / 1.15, D = 5: 2.68 / 2.31 / 1.86, D = 8: 4.26 / 3.50 / 2.66, D = 10: 5.18 /
  4.16 / 3.10. D = 3 is below the minimum count (not a candidate).
- Bonferroni bound: each window's p is super-uniform, so P(max t >= t_obs) <= n_windows
  e^-t_obs. When that is below 1 / max(max_toys, 10 000) no toy budget could resolve the
  global p; the bound is then quoted as an upper limit on p (Z a lower limit) and no toy
  is drawn. With the uncertainty folded in the bound still holds where it is used: the
  negative binomial p is at least the Poisson p at every count where it is below 0.2
  (B 1e-3..1e5, r 0.001..2; docs/physics-notes.md), and the minimum count only sets t = 0.
- Bounded work: totals above `core.significance.MAX_TOTAL_COUNT` (1e15) are refused, toy
  budgets above `MAX_TOYS` (1e7) too, and the threshold search stops where float steps
  exceed 1 (a bin content of 1e20 used to loop forever).

Speed. Against the fixed B, B (and r) is the same for every toy, so the tail of each
window is inverted once:
K_w = max(the smallest integer k with -ln P(n >= k | B_w, r_w) >= t_obs, MIN_WINDOW_COUNT).
A toy has t_toy >= t_obs exactly when its count D_w >= K_w in some window, so a toy costs
one integer comparison per window, with window counts from cumulative sums over a batch of
toys (`fixed_toys_reaching`: bins x toys, a few thousand toys at a time, in the narrowest
integer type that holds their counts, 16-bit for a few thousand events, so each width is a
few passes of contiguous vector operations). The full distribution of t_toy
(`toy_statistics`) looks the tails up in a table per window, -ln P(n >= k) for k from the
first candidate count up to the largest count the toys need (`tabulate_poisson_tails`: the
Poisson pmf recurrence p(k+1) = p(k) B / (k + 1), or the negative binomial one
p(k+1) = p(k) q (k + 1/r^2) / (k + 1)). Refitted toys each have their own B', so t_toy is
evaluated only where it can reach t_obs: a cheap upper bound on each window's t
(`tail_statistic_bounds`) drops the windows that cannot, and a lower
bound that reaches it decides a toy without the exact tail (bench/results/hunt_refit.json).

Adaptive toys: batches are drawn until the relative error sqrt((1 - p) / k) of p = k / n
falls below a target, with at least `min_toys`, at least 10 000 when p < 0.01 (even above
`max_toys`), and at most `max_toys` otherwise; from 10 000 toys on they stop as soon as
the target is out of `max_toys`' reach at the current p (none reaching, or fewer than
1 / target^2 expected by `max_toys`), so a p near 1e-5 costs 10 000 toys, not 100 000,
and is quoted with its larger error or as a limit. When no toy reaches t_obs the global p
is the upper limit min(1/n, Bonferroni bound) with `global_z_is_lower_limit`, and Z its
lower limit (never a p of 0).

Conventions compared with pyBumpHunter 0.5 (`BumpHunter1D`, mode "excess", scan_step 1),
with no background uncertainty and windows of at least 5 events:
the same windows, the same p (`gammainc(D, B)` if D > B and B > 0, else 1), the same t and
tie-breaking and the same global p (>=). pyBumpHunter's Z = `norm.ppf(1 - p)` loses all
precision below p ~ 1e-16; ours is `-ndtri(p)`, equal above, exact below, and clipped at 0.
Data may be non-integer (weighted): P(D, B) is then the continuous gamma function.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.special import betainc, betaln, gammainc, gammaln

from core.errors import InvalidInputError
from core.pseudodata import RefitProjection, refit_projection
from core.significance import format_p, p_from_z, validate_spectrum, z_from_log_p, z_from_p

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

MIN_WINDOW_BACKGROUND: Final = 0.0
"""Default minimum expected background of a scanned window: 0, every window with B > 0."""

MIN_WINDOW_COUNT: Final = 5
"""A window with fewer observed events is not a candidate (t = 0), data and toys alike."""

POISSON_LIMIT: Final = 1e-12
"""Where B r^2 (the extra variance over Poisson, relative) is below this the tail is Poisson."""

MAX_TOYS: Final = 10_000_000
"""Upper bound on any toy budget: beyond it a request is refused, not run for hours."""

MIN_TOYS_SMALL_P: Final = 10_000
"""At least this many toys whenever the global p-value is below `SMALL_P`."""

SMALL_P: Final = 0.01

_LOG_TAIL_BELOW: Final = 1e-290
"""Below this P(n >= k | B) from gammainc the tail is summed in log space instead."""

_SERIES_BLOCKS: Final = 64
"""Blocks of 256 series terms summed exactly in `_log_series`; then bounded."""

_TOY_ENTRIES_PER_BATCH: Final = 2_000_000
"""Toy bins drawn per batch: bounds the memory (a few tens of MB)."""

_REFIT_ENTRIES_PER_BATCH: Final = 500_000
"""Toy bins per batch of refitted toys: counts, refitted B' and both cumulative sums, in float."""

_TABLE_ENTRIES_CAP: Final = 4_000_000
"""Largest tail table built for one window width; beyond it the tail is computed directly."""

_REACH_CHUNK: Final = 4096
"""Toys compared with the thresholds together (`fixed_toys_reaching`): sums stay in cache."""


# --------------------------------------------------------------------------- Poisson tails


def _log_series(
    log_step: Callable[[IntArray, FloatArray], FloatArray],
    final_ratio: Callable[[IntArray, float], FloatArray],
    size: int,
) -> FloatArray:
    """Ln(1 + rho_1 + rho_1 rho_2 + ...) of `size` series, summed term by term in log space.

    `log_step(rows, j)` is ln rho_j of the series `rows` at the term numbers j (a column of
    256). After `_SERIES_BLOCKS` blocks the rest is bounded by the geometric series of
    `final_ratio(rows, j)` (< 1, at least every later ratio): the loop stays bounded even
    for huge counts, where ln of the sum moves by far less than 1 and t > 667 anyway.
    """
    running = np.zeros(size)
    total = np.ones(size)
    active = np.ones(size, dtype=bool)
    block = np.arange(1, 257, dtype=np.float64)
    offset = 0.0
    for _ in range(_SERIES_BLOCKS):
        if not np.any(active):
            break
        idx = np.flatnonzero(active)
        log_terms = running[idx, None] + np.cumsum(log_step(idx, offset + block[None, :]), axis=1)
        total[idx] += np.sum(np.exp(log_terms), axis=1)
        running[idx] = log_terms[:, -1]
        active[idx] = np.exp(running[idx]) > 1e-17 * total[idx]
        offset += block.size
    if np.any(active):
        idx = np.flatnonzero(active)
        ratio = final_ratio(idx, offset)
        total[idx] += np.exp(running[idx]) * ratio / (1.0 - ratio)
    return np.log(total)


def _log_lower_gamma_series(a: FloatArray, x: FloatArray) -> FloatArray:
    """Log of P(a, x) from its series x^a e^-x / Gamma(a+1) sum_j x^j / ((a+1)...(a+j)), x < a.

    Term ratios x / (a + j) only fall.
    """
    log_sum = _log_series(
        lambda rows, j: np.log(x[rows, None]) - np.log(a[rows, None] + j),
        lambda rows, j: x[rows] / (a[rows] + j + 1.0),
        a.size,
    )
    return np.asarray(a * np.log(x) - x - gammaln(a + 1.0) + log_sum, dtype=np.float64)


def poisson_tail_statistic(k: npt.ArrayLike, background: npt.ArrayLike) -> FloatArray:
    """Statistic t = -ln P(n >= k | B) for an excess k > B > 0, else 0 (no bump); broadcast arrays.

    P(n >= k | B) is the regularised lower incomplete gamma P(k, B); where it underflows
    (t > ~667) it is summed in log space, so t stays finite. B = 0 with k > 0 gives +inf.
    """
    counts = np.asarray(k, dtype=np.float64)
    expected = np.asarray(background, dtype=np.float64)
    counts, expected = np.broadcast_arrays(counts, expected)
    statistic = np.zeros(counts.shape, dtype=np.float64)
    excess = (counts > expected) & (expected > 0)
    if np.any(excess):
        a, x = counts[excess], expected[excess]
        p = gammainc(a, x)
        values = np.empty_like(p)
        regular = p > _LOG_TAIL_BELOW
        values[regular] = -np.log(p[regular])
        if not np.all(regular):
            values[~regular] = -_log_lower_gamma_series(a[~regular], x[~regular])
        statistic[excess] = values
    statistic[(expected <= 0) & (counts > 0)] = np.inf
    return statistic


def _negative_binomial_parameters(
    background: FloatArray, relative_sd: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(shape a = 1/r^2, ln q, ln(1 - q)) of the Gamma-Poisson count, q = B r^2 / (1 + B r^2)."""
    extra = background * relative_sd * relative_sd
    shape = 1.0 / (relative_sd * relative_sd)
    return shape, np.log(extra) - np.log1p(extra), -np.log1p(extra)


def _log_negative_binomial_pmf(
    k: FloatArray, shape: FloatArray, log_q: FloatArray, log_1mq: FloatArray
) -> FloatArray:
    """Ln P(n = k) = ln[Gamma(k + a) / (Gamma(k + 1) Gamma(a)) q^k (1 - q)^a], k > 0 real."""
    return np.asarray(-np.log(k) - betaln(k, shape) + k * log_q + shape * log_1mq, dtype=np.float64)


def _log_negative_binomial_series(
    k: FloatArray, shape: FloatArray, log_q: FloatArray, log_1mq: FloatArray
) -> FloatArray:
    """Ln of P(n >= k) summed term by term in log space (where betainc underflows).

    Term ratios are q (m + a) / (m + 1), which tend to q < 1; the rest is bounded by a
    geometric series of the larger of the current ratio and q.
    """

    def final_ratio(rows: IntArray, j: float) -> FloatArray:
        m = k[rows] + j
        ratio = np.exp(log_q[rows]) * (m + shape[rows]) / (m + 1.0)
        return np.minimum(np.maximum(ratio, np.exp(log_q[rows])), 1.0 - 1e-12)

    log_sum = _log_series(
        lambda rows, j: (
            log_q[rows, None]
            + np.log(k[rows, None] + j - 1.0 + shape[rows, None])
            - np.log(k[rows, None] + j)
        ),
        final_ratio,
        k.size,
    )
    first = _log_negative_binomial_pmf(k, shape, log_q, log_1mq)
    return np.asarray(first + log_sum, dtype=np.float64)


def tail_statistic(
    k: npt.ArrayLike, background: npt.ArrayLike, relative_sd: npt.ArrayLike | None = None
) -> FloatArray:
    """T = -ln P(n >= k) for an excess k > B > 0, else 0, with B uncertain by r B (broadcast).

    n ~ Poisson(B'), B' ~ Gamma(mean B, relative sd r): n is negative binomial and
    P(n >= k) = I_q(k, 1/r^2), q = B r^2 / (1 + B r^2) (regularised incomplete beta,
    continuous in real k). As r -> 0 it tends to the Poisson tail P(k, B), which is used
    where B r^2 < 1e-12 and when `relative_sd` is None. Underflowing tails are summed in
    log space, so t stays finite.
    """
    counts = np.asarray(k, dtype=np.float64)
    expected = np.asarray(background, dtype=np.float64)
    if relative_sd is None:
        return poisson_tail_statistic(counts, expected)
    counts, expected, sd = np.broadcast_arrays(
        counts, expected, np.asarray(relative_sd, dtype=np.float64)
    )
    mixed = (counts > expected) & (expected > 0) & (expected * sd * sd >= POISSON_LIMIT)
    statistic = np.zeros(counts.shape, dtype=np.float64)
    statistic[~mixed] = poisson_tail_statistic(counts[~mixed], expected[~mixed])
    if np.any(mixed):
        a = counts[mixed]
        shape, log_q, log_1mq = _negative_binomial_parameters(expected[mixed], sd[mixed])
        p = betainc(a, shape, np.exp(log_q))
        values = np.empty_like(p)
        regular = p > _LOG_TAIL_BELOW
        values[regular] = -np.log(p[regular])
        if not np.all(regular):
            low = ~regular
            values[low] = -_log_negative_binomial_series(
                a[low], shape[low], log_q[low], log_1mq[low]
            )
        statistic[mixed] = values
    return statistic


def tail_statistic_bounds(
    k: npt.ArrayLike,
    background: npt.ArrayLike,
    relative_sd: npt.ArrayLike | None = None,
    terms: int = 2,
) -> tuple[FloatArray, FloatArray]:
    """(lower, upper) bounds on `tail_statistic` for integer k > B > 0, cheap.

    No incomplete function: the pmf at k and the first `terms` terms of the series that
    follows it (`core.refitkernels`). They let the refitted toys (`refitted_window_maxima`) evaluate
    the exact tail only in windows that can decide a toy's maximum.
    """
    sd = 0.0 if relative_sd is None else relative_sd
    counts, expected, sd = np.broadcast_arrays(
        np.asarray(k, dtype=np.float64),
        np.asarray(background, dtype=np.float64),
        np.asarray(sd, dtype=np.float64),
    )
    shapes, log_gamma_shapes = _gamma_shapes(sd.ravel())
    lower = np.empty(counts.size, dtype=np.float64)
    upper = np.empty(counts.size, dtype=np.float64)
    kernels = refit_kernels()
    flat = (counts.ravel(), expected.ravel(), shapes, log_gamma_shapes)
    kernels.bounds_of(*flat, terms, lower, upper)
    return lower.reshape(counts.shape), upper.reshape(counts.shape)


def _gamma_shapes(relative_sd: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(a = 1/r^2, inf for r = 0; ln Gamma(a), 0 where a is inf) of each relative sd."""
    shapes = np.full(relative_sd.size, np.inf)
    np.divide(1.0, relative_sd * relative_sd, out=shapes, where=relative_sd > 0)
    finite = np.isfinite(shapes)
    log_gamma = np.zeros(relative_sd.size)
    log_gamma[finite] = gammaln(shapes[finite])
    return shapes, log_gamma


def tail_thresholds(
    background: npt.ArrayLike, t_min: float, relative_sd: npt.ArrayLike | None = None
) -> IntArray:
    """Smallest integer count k with t(k) >= t_min (> 0), for each B >= 0 (`tail_statistic`).

    A galloping search from a Cornish-Fisher guess, then bisection, all on the exact tail
    `tail_statistic` (relative background uncertainty `relative_sd`, None: Poisson), so the
    comparison D >= k equals t(D) >= t_min exactly.
    """
    if not (math.isfinite(t_min) and t_min > 0):
        raise InvalidInputError(f"tail_thresholds needs a finite t_min > 0, found {t_min}")
    b = np.atleast_1d(np.asarray(background, dtype=np.float64))
    sd = None if relative_sd is None else np.broadcast_to(np.asarray(relative_sd, float), b.shape)
    spread = b if sd is None else b + (b * sd) ** 2
    z = float(z_from_log_p(-t_min))
    guess = np.ceil(b + z * np.sqrt(spread) + (z * z - 1.0) / 6.0)
    guess = np.maximum(guess, np.floor(b) + 1.0)

    def reaches(k: FloatArray, rows: IntArray) -> npt.NDArray[np.bool_]:
        return np.asarray(tail_statistic(k, b[rows], None if sd is None else sd[rows]) >= t_min)

    all_rows = np.arange(b.size)
    ok = reaches(guess, all_rows)
    lower = np.where(ok, np.floor(b), guess)  # t(lower) < t_min
    upper = np.where(ok, guess, np.inf)  # t(upper) >= t_min
    step = np.ones_like(b)
    searching = np.ones(b.size, dtype=bool)
    while np.any(searching):
        rows = np.flatnonzero(searching)
        going_up = ~ok[rows]
        trial = np.where(going_up, lower[rows] + step[rows], upper[rows] - step[rows])
        inside = going_up | (trial > lower[rows])
        hit = reaches(trial, rows)
        up_rows, down_rows = rows[going_up], rows[~going_up]
        up_hit = hit[going_up]
        upper[up_rows[up_hit]] = trial[going_up][up_hit]
        lower[up_rows[~up_hit]] = trial[going_up][~up_hit]
        down_hit = hit[~going_up] & inside[~going_up]
        down_miss = ~hit[~going_up] & inside[~going_up]
        upper[down_rows[down_hit]] = trial[~going_up][down_hit]
        lower[down_rows[down_miss]] = trial[~going_up][down_miss]
        finished = np.where(going_up, hit, ~(hit & inside))
        # A tail that never reaches t_min within float range (or a NaN tail) ends the search
        # with an unreachable threshold, saturated below.
        runaway = going_up & ~hit & ~np.isfinite(trial + step[rows])
        upper[rows[runaway]] = np.inf
        searching[rows[finished | runaway]] = False
        step[rows] *= 2.0
    stuck = np.zeros(b.size, dtype=bool)
    open_gap = upper - lower > 1
    while np.any(open_gap):
        rows = np.flatnonzero(open_gap)
        before_low, before_up = lower[rows], upper[rows]
        middle = np.floor((before_up + before_low) / 2.0)
        hit = reaches(middle, rows)
        upper[rows[hit]] = middle[hit]
        lower[rows[~hit]] = middle[~hit]
        # Where float steps exceed 1 (sums above 2^53) the midpoint can equal an end: stop.
        stalled = np.where(hit, middle >= before_up, middle <= before_low)
        stuck[rows[stalled]] = True
        open_gap = (upper - lower > 1) & ~stuck
    return np.minimum(upper, 2.0**62).astype(np.int64)


def _log_pmf_table(
    b: FloatArray, k_first: FloatArray, n_counts: int, relative_sd: FloatArray | None
) -> tuple[FloatArray, FloatArray]:
    """Ln pmf at k_first + j (rows x n_counts) and the tail beyond the last, per row.

    Poisson rows by p(k+1) = p(k) B / (k + 1); rows with B r^2 >= 1e-12 negative binomial
    by p(k+1) = p(k) q (k + a) / (k + 1).
    """
    counts = k_first[:, None] + np.arange(n_counts, dtype=np.float64)[None, :]
    safe_b = np.where(b > 0, b, 1.0)
    log_b = np.log(safe_b)[:, None]
    log_first = k_first[:, None] * log_b - safe_b[:, None] - gammaln(k_first[:, None] + 1.0)
    steps = log_b - np.log(counts[:, 1:])
    beyond = np.asarray(gammainc(k_first + n_counts, safe_b), dtype=np.float64)
    if relative_sd is not None:
        mixed = safe_b * relative_sd * relative_sd >= POISSON_LIMIT
        if np.any(mixed):
            shape, log_q, log_1mq = _negative_binomial_parameters(safe_b[mixed], relative_sd[mixed])
            k0 = np.maximum(k_first[mixed], 1e-300)
            log_first[mixed, 0] = _log_negative_binomial_pmf(k0, shape, log_q, log_1mq)
            steps[mixed] = (
                log_q[:, None]
                + np.log(counts[mixed, :-1] + shape[:, None])
                - np.log(counts[mixed, 1:])
            )
            beyond[mixed] = betainc(k_first[mixed] + n_counts, shape, np.exp(log_q))
    log_pmf = np.concatenate([log_first, log_first + np.cumsum(steps, axis=1)], axis=1)
    return log_pmf, beyond


def tabulate_poisson_tails(
    background: npt.ArrayLike,
    first_count: npt.ArrayLike,
    n_counts: int,
    relative_sd: npt.ArrayLike | None = None,
) -> FloatArray:
    """Table T[i, j] = -ln P(n >= first_count[i] + j | background[i]), j < n_counts.

    Poisson, or negative binomial where `relative_sd` r > 0 (`tail_statistic`): built by the
    pmf recurrence and a reverse cumulative sum closed by one gammainc (betainc) per row;
    entries whose tail underflows use the exact tail. Counts at or below B give 0.
    """
    b = np.asarray(background, dtype=np.float64)
    k_first = np.asarray(first_count, dtype=np.float64)
    if n_counts < 1 or b.shape != k_first.shape or b.ndim != 1:
        raise InvalidInputError(
            f"tabulate_poisson_tails needs 1D background and first_count of equal length "
            f"and n_counts >= 1; found shapes {b.shape}, {k_first.shape}, n_counts={n_counts}"
        )
    sd = None if relative_sd is None else np.broadcast_to(np.asarray(relative_sd, float), b.shape)
    counts = k_first[:, None] + np.arange(n_counts, dtype=np.float64)[None, :]
    log_pmf, beyond = _log_pmf_table(b, k_first, n_counts, sd)
    tail = beyond[:, None] + np.cumsum(np.exp(log_pmf)[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(divide="ignore"):
        table = -np.log(tail)
    unreliable = (tail < 1e-280) | (counts <= b[:, None]) | (b[:, None] <= 0)
    if np.any(unreliable):
        rows, cols = np.nonzero(unreliable)
        table[rows, cols] = tail_statistic(
            counts[rows, cols], b[rows], None if sd is None else sd[rows]
        )
    return np.asarray(table, dtype=np.float64)


def first_candidate_count(background: FloatArray, min_count: float) -> IntArray:
    """Smallest integer count with t > 0: an excess (> B) of at least `min_count` events."""
    return np.maximum(np.floor(background) + 1.0, math.ceil(min_count)).astype(np.int64)


def tabulated_tail_statistics(
    counts: npt.NDArray[np.int64],
    background: FloatArray,
    relative_sd: FloatArray | None = None,
    min_count: float = 0.0,
) -> FloatArray:
    """Tail statistics t of window counts k (toys x windows), B (and r) per window.

    Counts at or below B, or below `min_count`, give 0. The tails come from one
    `tabulate_poisson_tails` table of at most `_TABLE_ENTRIES_CAP` entries; counts past its
    end get the exact tail.
    """
    first = first_candidate_count(background, min_count)
    offset = counts - first[None, :]
    longest = int(offset.max()) + 1
    if longest <= 0:
        return np.zeros(counts.shape, dtype=np.float64)
    length = max(1, min(longest, _TABLE_ENTRIES_CAP // background.size))
    table = tabulate_poisson_tails(background, first, length, relative_sd)
    index = np.clip(offset, 0, length - 1) + (np.arange(background.size) * length)[None, :]
    values = np.where(offset >= 0, table.ravel()[index], 0.0)
    beyond = offset >= length
    if np.any(beyond):
        columns = np.nonzero(beyond)[1]
        values[beyond] = tail_statistic(
            counts[beyond],
            background[columns],
            None if relative_sd is None else relative_sd[columns],
        )
    return values


# ------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class ScanWindows:
    """Every window of a spectrum's scan range with its background (counts), by width.

    Windows of width `widths[i]` start at bins `first_bin + j`, j < len(background_sums[i]);
    `background_bins` is B in the scan range [first_bin, stop_bin). `relative_sd` (per
    width, like `background_sums`) is each window's relative background uncertainty
    sigma_w / B_w, None when the background is taken as exact (Poisson tails); a window is
    a candidate only with at least `min_count` observed events.
    """

    first_bin: int
    stop_bin: int
    widths: tuple[int, ...]
    background_sums: tuple[FloatArray, ...]
    background_bins: FloatArray
    active: tuple[npt.NDArray[np.bool_], ...]
    min_background: float
    min_count: int = MIN_WINDOW_COUNT
    relative_sd: tuple[FloatArray, ...] | None = None

    @property
    def n_windows(self) -> int:
        """Total number of windows scanned (those expecting >= `min_background` events)."""
        return int(sum(np.count_nonzero(a) for a in self.active))

    @property
    def background_uncertainty(self) -> bool:
        """Whether the background's fit uncertainty is folded into the local p."""
        return self.relative_sd is not None

    def width_relative_sd(self, index: int) -> FloatArray | None:
        """Relative background uncertainty of the windows of width `widths[index]` (or None)."""
        return None if self.relative_sd is None else self.relative_sd[index]

    @property
    def flat_relative_sd(self) -> FloatArray | None:
        """`relative_sd` flattened width by width, like np.concatenate(background_sums)."""
        return None if self.relative_sd is None else np.concatenate(self.relative_sd)


def _check_widths(n_bins: int, width_min: int, width_max: int | None) -> tuple[int, int]:
    upper = n_bins // 2 if width_max is None else width_max
    upper = max(upper, 1) if width_max is None else upper
    if width_min < 1 or upper < width_min:
        raise InvalidInputError(
            f"window widths must satisfy 1 <= width_min <= width_max; found width_min="
            f"{width_min}, width_max={upper} (bins)"
        )
    if upper > n_bins:
        raise InvalidInputError(
            f"width_max={upper} bins is larger than the histogram ({n_bins} bins); "
            "choose width_max <= the number of bins"
        )
    return width_min, upper


def window_relative_sd(
    widths: tuple[int, ...],
    background_sums: tuple[FloatArray, ...],
    jacobian: FloatArray,
    covariance: FloatArray,
) -> tuple[FloatArray, ...]:
    """sigma_w / B_w per window, sigma_w^2 = j_w C j_w^T with j_w the window's summed rows.

    `jacobian` (scan-range bins x parameters) is d mu_i / d parameters, `covariance` C.
    """
    cumulative = np.zeros((jacobian.shape[0] + 1, jacobian.shape[1]))
    np.cumsum(jacobian, axis=0, out=cumulative[1:])
    result = []
    for width, sums in zip(widths, background_sums, strict=True):
        rows = cumulative[width:] - cumulative[:-width]
        variance = np.maximum(np.einsum("ip,pq,iq->i", rows, covariance, rows), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            result.append(np.where(sums > 0, np.sqrt(variance) / sums, 0.0))
    return tuple(result)


def _check_uncertainty(
    n_bins: int, jacobian: npt.ArrayLike | None, covariance: npt.ArrayLike | None
) -> tuple[FloatArray, FloatArray] | None:
    """(jacobian, covariance) as arrays after checking shapes and values, or None."""
    if jacobian is None and covariance is None:
        return None
    if jacobian is None or covariance is None:
        raise InvalidInputError(
            "give both the background's jacobian and its fit covariance, or neither"
        )
    j = np.asarray(jacobian, dtype=np.float64)
    c = np.asarray(covariance, dtype=np.float64)
    if j.ndim != 2 or j.shape[0] != n_bins or c.shape != (j.shape[1], j.shape[1]):
        raise InvalidInputError(
            f"expected a jacobian of shape ({n_bins}, n_parameters) (one row per background "
            f"bin) and a square covariance of n_parameters; found {j.shape} and {c.shape}"
        )
    if not (np.all(np.isfinite(j)) and np.all(np.isfinite(c))):
        raise InvalidInputError("the background's jacobian and covariance must be finite")
    return j, c


def scan_windows(
    background: npt.ArrayLike,
    width_min: int = 1,
    width_max: int | None = None,
    min_background: float = MIN_WINDOW_BACKGROUND,
    *,
    min_count: int = MIN_WINDOW_COUNT,
    jacobian: npt.ArrayLike | None = None,
    covariance: npt.ArrayLike | None = None,
) -> ScanWindows:
    """All windows (widths in bins; default 1..N/2) of the bins with background > 0.

    Windows whose summed background is below `min_background` events are kept in the
    arrays but inactive: their statistic is 0 for data and toys alike (module docstring).
    With the background's `jacobian` (one row per background bin, d mu / d parameters) and
    fit `covariance`, each window's relative uncertainty is folded into its tail.
    """
    if not (math.isfinite(min_background) and min_background >= 0):
        raise InvalidInputError(
            f"min_background must be a finite number of events >= 0, found {min_background}"
        )
    if not 0 <= min_count <= 1_000_000:
        raise InvalidInputError(f"min_count must be in 0..1e6 events, found {min_count}")
    b = np.asarray(background, dtype=np.float64)
    if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)) or np.any(b < 0):
        raise InvalidInputError("scan_windows needs a 1D background of finite expected counts >= 0")
    low, high = _check_widths(b.size, width_min, width_max)
    nonzero = np.flatnonzero(b > 0)
    if nonzero.size == 0:
        raise InvalidInputError("background is zero in every bin; expected a background shape")
    first, stop = int(nonzero[0]), int(nonzero[-1]) + 1
    if stop - first < low:
        raise InvalidInputError(
            f"the scan range (bins {first}..{stop - 1}, where background > 0) has "
            f"{stop - first} bins, fewer than width_min={low}"
        )
    bins = b[first:stop].copy()
    cumulative = np.concatenate([[0.0], np.cumsum(bins)])
    widths = tuple(w for w in range(low, high + 1) if w <= bins.size)
    sums = tuple(cumulative[w:] - cumulative[:-w] for w in widths)
    active = tuple(np.asarray(s >= min_background * (1.0 - 1e-12)) for s in sums)
    uncertainty = _check_uncertainty(b.size, jacobian, covariance)
    relative = (
        None
        if uncertainty is None
        else window_relative_sd(widths, sums, uncertainty[0][first:stop], uncertainty[1])
    )
    return ScanWindows(
        first, stop, widths, sums, bins, active, float(min_background), int(min_count), relative
    )


def window_statistics(windows: ScanWindows, counts: npt.ArrayLike) -> tuple[FloatArray, ...]:
    """Statistic t = -ln p of every window (per width, as in `windows`) for data `counts`.

    0 for windows that are not scanned and for counts below `windows.min_count`.
    """
    n = np.asarray(counts, dtype=np.float64)[windows.first_bin : windows.stop_bin]
    cumulative = np.concatenate([[0.0], np.cumsum(n)])
    result = []
    for index, (w, sums, active) in enumerate(
        zip(windows.widths, windows.background_sums, windows.active, strict=True)
    ):
        data = cumulative[w:] - cumulative[:-w]
        candidate = active & (data >= windows.min_count)
        values = tail_statistic(data, sums, windows.width_relative_sd(index))
        result.append(np.where(candidate, values, 0.0))
    return tuple(result)


@dataclass(frozen=True)
class LocalExcess:
    """The most significant window of a spectrum: bins [first, stop), masses in GeV."""

    first_bin: int
    stop_bin: int
    mass_low: float
    mass_high: float
    data: float
    background: float
    statistic: float
    local_p: float
    local_z: float
    background_error: float = 0.0


def significance_from_statistic(statistic: float) -> tuple[float, float]:
    """(p, Z) of t = -ln p; Z is computed from ln p (exact where p underflows), >= 0."""
    local_p = math.exp(-statistic)
    if statistic == math.inf:
        return 0.0, math.inf
    return local_p, max(float(z_from_log_p(-statistic)), 0.0)


def most_significant_window(
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    edges: npt.ArrayLike,
    width_min: int = 1,
    width_max: int | None = None,
) -> LocalExcess:
    """Scan all windows and return the one of smallest local p (GeV, counts)."""
    n, b = validate_spectrum(counts, background, edges)
    e = np.asarray(edges, dtype=np.float64)
    windows = scan_windows(b, width_min, width_max)
    return best_window(windows, n, e)


def best_window(windows: ScanWindows, counts: npt.ArrayLike, edges: npt.ArrayLike) -> LocalExcess:
    """The window of largest t (first one on ties) for data `counts` over `windows`."""
    n = np.asarray(counts, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    statistics = window_statistics(windows, n)
    best_t, best_index, best_start = -1.0, 0, 0
    for index, values in enumerate(statistics):
        start = int(np.argmax(values))
        if values[start] > best_t:
            best_t, best_index, best_start = float(values[start]), index, start
    first = windows.first_bin + best_start
    stop = first + windows.widths[best_index]
    local_p, local_z = significance_from_statistic(best_t)
    relative = windows.width_relative_sd(best_index)
    window_sum = float(windows.background_sums[best_index][best_start])
    background = float(
        np.sum(windows.background_bins[first - windows.first_bin : stop - windows.first_bin])
    )
    return LocalExcess(
        first_bin=first,
        stop_bin=stop,
        mass_low=float(e[first]),
        mass_high=float(e[stop]),
        data=float(np.sum(n[first:stop])),
        background=background,
        statistic=best_t,
        local_p=local_p,
        local_z=local_z,
        background_error=0.0 if relative is None else float(relative[best_start]) * window_sum,
    )


# ---------------------------------------------------------------------------------- toys


def _count_dtype(windows: ScanWindows) -> type[np.signedinteger]:
    total = float(np.sum(windows.background_bins))
    return np.int32 if total < 1e8 else np.int64


def toy_cumulative_counts(
    windows: ScanWindows, n_toys: int, rng: np.random.Generator
) -> npt.NDArray[np.signedinteger]:
    """Cumulative bin counts (n_toys, n_scan_bins + 1) of background-only Poisson toys."""
    toys = rng.poisson(windows.background_bins, size=(n_toys, windows.background_bins.size))
    dtype = _count_dtype(windows)
    cumulative = np.zeros((n_toys, toys.shape[1] + 1), dtype=dtype)
    np.cumsum(toys, axis=1, out=cumulative[:, 1:])
    return cumulative


def toys_reaching(
    windows: ScanWindows,
    thresholds: tuple[npt.NDArray[np.signedinteger], ...],
    cumulative: npt.NDArray[np.signedinteger],
) -> npt.NDArray[np.bool_]:
    """Which toys have a window with D_w >= K_w (i.e. t_toy >= the thresholds' t)."""
    reached = np.zeros(cumulative.shape[0], dtype=bool)
    for width, limit in zip(windows.widths, thresholds, strict=True):
        counts = cumulative[:, width:] - cumulative[:, :-width]
        reached |= np.any(counts >= limit, axis=1)
    return reached


def fixed_toys_reaching(
    windows: ScanWindows,
    thresholds: tuple[npt.NDArray[np.signedinteger], ...],
    toys: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """Which toys (rows of scan-range bin counts) have a window with D_w >= K_w.

    The answer of `toys_reaching` on their cumulative sums, faster: the sums are built
    bins x toys, `_REACH_CHUNK` toys at a time, so each width is one contiguous
    subtraction and comparison per window start, in the narrowest integer type that holds
    the sum of the bins' largest counts (a bound on every window count). Thresholds above
    that type's range (unreachable) are saturated at its largest value, which no count
    reaches.
    """
    n_toys, n_bins = toys.shape
    reached = np.zeros(n_toys, dtype=bool)
    if n_toys == 0:
        return reached
    largest = int(np.max(toys, axis=0).sum())
    dtype: type[np.signedinteger] = np.int64
    for narrow in (np.int16, np.int32):
        if largest < np.iinfo(narrow).max:
            dtype = narrow
            break
    ceiling = np.iinfo(dtype).max
    limits = [np.minimum(limit, ceiling).astype(dtype)[:, None] for limit in thresholds]
    cumulative = np.zeros((n_bins + 1, min(n_toys, _REACH_CHUNK)), dtype=dtype)
    for start in range(0, n_toys, _REACH_CHUNK):
        part = toys[start : start + _REACH_CHUNK]
        sums = cumulative[:, : part.shape[0]]
        sums[1:] = part.T
        for row in range(1, n_bins):  # row by row: numpy's cumsum along axis 0 is slower
            np.add(sums[row], sums[row + 1], out=sums[row + 1])
        hit = reached[start : start + part.shape[0]]
        for width, limit in zip(windows.widths, limits, strict=True):
            hit |= np.logical_or.reduce(sums[width:] - sums[:-width] >= limit, axis=0)
    return reached


def window_thresholds(
    windows: ScanWindows, t_min: float, dtype: type[np.signedinteger] | None = None
) -> tuple[npt.NDArray[np.signedinteger], ...]:
    """Per width, the smallest window count with t >= t_min (see `tail_thresholds`).

    In `dtype` (default: the integer type of `toy_cumulative_counts`), saturated at its
    largest value.
    """
    dtype = _count_dtype(windows) if dtype is None else dtype
    flat = tail_thresholds(np.concatenate(windows.background_sums), t_min, windows.flat_relative_sd)
    flat = np.maximum(flat, math.ceil(windows.min_count))
    flat = np.minimum(flat, np.iinfo(dtype).max)
    flat[~np.concatenate(windows.active)] = np.iinfo(dtype).max
    flat = flat.astype(dtype)
    return tuple(np.split(flat, np.cumsum([s.size for s in windows.background_sums])[:-1]))


def toy_statistics(
    windows: ScanWindows, n_toys: int, seed: int | np.random.Generator
) -> FloatArray:
    """Exact t = -ln(min p) of `n_toys` background-only pseudo-experiments, via tail tables.

    For each width a table -ln P(n >= k | B_w) is built from the first excess count
    floor(B_w) + 1 up to the largest window count of the toys (capped; beyond the cap the
    exact tail is used), and window counts are looked up in it.
    """
    if n_toys < 1:
        raise InvalidInputError(f"toy_statistics needs n_toys >= 1, found {n_toys}")
    rng = np.random.default_rng(seed)
    result = np.zeros(n_toys, dtype=np.float64)
    batch = max(1, _TOY_ENTRIES_PER_BATCH // max(windows.background_bins.size, 1))
    for start in range(0, n_toys, batch):
        size = min(batch, n_toys - start)
        cumulative = toy_cumulative_counts(windows, size, rng).astype(np.int64)
        best = np.zeros(size, dtype=np.float64)
        for index, (width, sums, active) in enumerate(
            zip(windows.widths, windows.background_sums, windows.active, strict=True)
        ):
            values = tabulated_tail_statistics(
                cumulative[:, width:] - cumulative[:, :-width],
                sums,
                windows.width_relative_sd(index),
                windows.min_count,
            )
            values[:, ~active] = 0.0
            np.maximum(best, values.max(axis=1), out=best)
        result[start : start + size] = best
    return result


def refitted_window_maxima(
    windows: ScanWindows,
    toys: npt.ArrayLike,
    background: FloatArray,
    refit: RefitProjection,
    floor: float | None = None,
    *,
    count_only: bool = False,
) -> FloatArray:
    """Max t over `windows` of each toy (rows of bin counts) against its refitted background.

    Each toy is scanned against its linearised refit B' (`core.pseudodata`), with
    the windows (and the active ones) of the data's background B and the hunt's statistic
    (`tail_statistic`): at least `windows.min_count` events, and the data fit's relative
    uncertainty r_w of each window folded into the tail around B'_w. Exact where the result
    is >= `floor`; 0 below. The exact tail (an incomplete beta or gamma function) is
    evaluated only where it can matter: in windows whose upper bound reaches the largest
    lower bound of the toy's windows (`tail_statistic_bounds`; compiled loops over toys and
    windows, `core.refitkernels`). With `count_only` (and a floor) a toy is left at a value
    >= floor as soon as one is certain: enough to count the toys reaching it, not its
    maximum.
    """
    counts = np.asarray(toys, dtype=np.float64)
    span = slice(windows.first_bin, windows.stop_bin)
    cumulative_counts = _row_cumsum(counts[:, span])
    cumulative_background = _row_cumsum(refit.refitted(counts, background)[:, span])
    starts, widths, relative = _flat_windows(windows)
    stops = starts + widths
    shapes, log_gamma_shapes = _gamma_shapes(relative)
    floor = floor if floor is not None and floor > 0 else 0.0
    screen = _count_screen(cumulative_background, starts, stops, relative, floor, windows.min_count)
    best = np.zeros(counts.shape[0], dtype=np.float64)
    arguments = (
        *(cumulative_counts, cumulative_background, starts, stops, shapes, log_gamma_shapes),
        *(screen, floor, count_only, best),
    )
    rows = np.empty(4 * counts.shape[0], dtype=np.int64)
    columns = np.empty_like(rows)
    found = refit_kernels().open_windows(*arguments, rows, columns)
    if found > rows.size:
        best[:] = 0.0
        rows, columns = np.empty(found, dtype=np.int64), np.empty(found, dtype=np.int64)
        refit_kernels().open_windows(*arguments, rows, columns)
    rows, columns = rows[:found], columns[:found]
    if found:
        low, high = starts[columns], stops[columns]
        data = cumulative_counts[rows, high] - cumulative_counts[rows, low]
        expected = cumulative_background[rows, high] - cumulative_background[rows, low]
        sd = relative[columns]
        values = tail_statistic(data, expected, sd if np.any(sd > 0) else None)
        np.maximum.at(best, rows, values)
    best[best < floor] = 0.0
    return best


_SCREEN_LEVELS: Final = 8
"""Backgrounds per window, evenly spaced over the toys' range, where the floor's count is found."""


def _count_screen(
    cumulative_background: FloatArray,
    starts: IntArray,
    stops: IntArray,
    relative: FloatArray,
    floor: float,
    min_count: int,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per window: (lowest B'_w, 1 / level step, levels, the count needed at each level).

    t falls as the background grows (fixed count and r), so below the count that reaches
    the floor at a level at or below a toy's own B'_w, its t cannot reach the floor.
    `_SCREEN_LEVELS` levels from the smallest to the largest B'_w of the batch; at each,
    that count (`tail_thresholds`), at least `min_count`. Without a floor, one level and
    `min_count`.
    """
    n_windows = starts.size
    if floor <= 0 or n_windows == 0:
        flat = np.zeros(n_windows)
        return flat, flat, np.zeros((n_windows, 1)), np.full((n_windows, 1), float(min_count))
    lowest, highest = np.empty(n_windows), np.empty(n_windows)
    refit_kernels().background_ranges(cumulative_background, starts, stops, lowest, highest)
    step = (highest - lowest) / (_SCREEN_LEVELS - 1)
    inverse = np.divide(1.0, step, out=np.zeros(n_windows), where=step > 0)
    levels = lowest[:, None] + np.arange(_SCREEN_LEVELS)[None, :] * step[:, None]
    spread = np.broadcast_to(relative[:, None], levels.shape).ravel()
    counts = tail_thresholds(np.maximum(levels, 0.0).ravel(), floor, spread)
    minimum = np.maximum(counts.reshape(levels.shape).astype(np.float64), float(min_count))
    return lowest, inverse, levels, minimum


def _flat_windows(windows: ScanWindows) -> tuple[IntArray, IntArray, FloatArray]:
    """Start bin (scan range), width and relative sd (0: Poisson) of every active window."""
    starts, widths, relative = [], [], []
    for index, (width, active) in enumerate(zip(windows.widths, windows.active, strict=True)):
        columns = np.flatnonzero(active)
        starts.append(columns)
        widths.append(np.full(columns.size, width, dtype=np.int64))
        sd = windows.width_relative_sd(index)
        relative.append(np.zeros(columns.size) if sd is None else sd[columns])
    return (
        np.concatenate(starts).astype(np.int64),
        np.concatenate(widths),
        np.concatenate(relative).astype(np.float64),
    )


@functools.cache
def refit_kernels() -> ModuleType:
    """`core.refitkernels`, the compiled loops of the refitted toys.

    Imported on first use: numba compiles (or loads from its disk cache) only when toys
    are refitted.
    """
    return importlib.import_module("core.refitkernels")


def _row_cumsum(values: FloatArray) -> FloatArray:
    """Cumulative sums along each row with a leading zero column."""
    cumulative = np.zeros((values.shape[0], values.shape[1] + 1), dtype=np.float64)
    np.cumsum(values, axis=1, out=cumulative[:, 1:])
    return cumulative


def check_toy_budget(min_toys: int, max_toys: int, target_rel_error: float = 0.1) -> None:
    """Raise InvalidInputError unless 1 <= min_toys <= max_toys <= MAX_TOYS, 0 < target < 1."""
    if not (1 <= min_toys <= max_toys <= MAX_TOYS):
        raise InvalidInputError(
            f"toy counts must satisfy 1 <= min_toys <= max_toys <= {MAX_TOYS:.0e}; found "
            f"{min_toys}, {max_toys}; ask for fewer toys"
        )
    if not (0 < target_rel_error < 1):
        raise InvalidInputError(f"target_rel_error must be in (0, 1), found {target_rel_error}")


@dataclass(frozen=True)
class ToyPValue:
    """A p-value estimated as the fraction k/n of toys reaching the observed statistic."""

    p_value: float
    error: float
    n_toys: int
    n_reaching: int
    converged: bool


def adaptive_toy_p_value(
    count_batch: Callable[[int], int],
    *,
    min_toys: int,
    max_toys: int,
    target_rel_error: float,
    batch_cap: int,
) -> ToyPValue:
    """Run toy batches (`count_batch(n)` returns how many of n toys reach) until p is known.

    Stops when the relative error sqrt((1 - p)/k) < `target_rel_error` after `min_toys`;
    never before 10 000 toys while p < 0.01 (even above `max_toys`); otherwise at
    `max_toys`, or from 10 000 toys on as soon as the target is out of reach (`max_toys`
    would not hold the (1 - p) / (p target^2) toys it needs at the current p): the toys
    between could not make p precise, only cost. The error is binomial; with k = 0 it is
    the 68 % upper limit 1 - 0.32^(1/n).
    """
    check_toy_budget(min_toys, max_toys, target_rel_error)
    n_toys, reaching = 0, 0
    converged = False
    while True:
        p = reaching / n_toys if n_toys else 1.0
        limit = max(max_toys, MIN_TOYS_SMALL_P) if p < SMALL_P else max_toys
        if n_toys >= min_toys:
            precise = reaching > 0 and math.sqrt((1.0 - p) / reaching) < target_rel_error
            if precise and (p >= SMALL_P or n_toys >= MIN_TOYS_SMALL_P):
                converged = True
                break
            if n_toys >= limit or _out_of_reach(n_toys, reaching, max_toys, target_rel_error):
                break
        if n_toys < min_toys:
            wanted = min_toys
        elif p < SMALL_P and n_toys < MIN_TOYS_SMALL_P:
            wanted = MIN_TOYS_SMALL_P
        elif reaching > 0:
            wanted = math.ceil((1.0 - p) / (p * target_rel_error**2)) + 1
        else:
            wanted = 2 * n_toys
        size = int(min(max(wanted - n_toys, 1), batch_cap, limit - n_toys))
        reaching += count_batch(size)
        n_toys += size
    p = reaching / n_toys
    error = math.sqrt(p * (1.0 - p) / n_toys) if reaching else 1.0 - 0.32 ** (1.0 / n_toys)
    return ToyPValue(p, error, n_toys, reaching, converged)


def _out_of_reach(n_toys: int, reaching: int, max_toys: int, target_rel_error: float) -> bool:
    """True from `MIN_TOYS_SMALL_P` toys on when `max_toys` cannot bring p to the target."""
    if n_toys < MIN_TOYS_SMALL_P:
        return False
    if reaching == 0:
        return True
    p = reaching / n_toys
    return (1.0 - p) / (p * target_rel_error**2) > max_toys


# ----------------------------------------------------------------------------- bump hunt


@dataclass(frozen=True)
class HuntOptions:
    """Window set and toy budget of a BumpHunter scan (widths in bins, background in events).

    One object for the per-spectrum hunt and the scan-wide look-elsewhere test, so that both
    scan the same windows: widths `width_min`..`width_max` (None: half the scan range),
    windows expecting fewer than `min_window_background` events left out, windows with
    fewer than `min_window_count` observed events not candidates. With
    `fold_background_uncertainty` the hunt of a fitted background folds the fit's
    uncertainty into the local p (callers pass the fit's jacobian and covariance).
    """

    width_min: int = 1
    width_max: int | None = None
    min_window_background: float = MIN_WINDOW_BACKGROUND
    min_toys: int = 1_000
    max_toys: int = 100_000
    target_rel_error: float = 0.1
    min_window_count: int = MIN_WINDOW_COUNT
    fold_background_uncertainty: bool = True

    def windows(
        self,
        background: npt.ArrayLike,
        jacobian: npt.ArrayLike | None = None,
        covariance: npt.ArrayLike | None = None,
    ) -> ScanWindows:
        """The windows of a background (expected counts per bin) under these options.

        With the background's `jacobian` (rows = its bins) and fit `covariance` the
        background uncertainty is folded into each window's tail (`scan_windows`).
        """
        return scan_windows(
            background,
            self.width_min,
            self.width_max,
            self.min_window_background,
            min_count=self.min_window_count,
            jacobian=jacobian,
            covariance=covariance,
        )


DEFAULT_HUNT: Final = HuntOptions()
"""The window set of the scan: widths 1..N/2, every window with B > 0, candidates >= 5 events."""


@dataclass(frozen=True)
class BumpHuntResult:
    """BumpHunter on one spectrum: best window (GeV, bins [first, stop)), local and global p.

    `global_p_method` is "toys (refitted)" (the fraction of toys, each refitted to first
    order and scanned against its own background), "toys" (the same against the fixed
    background: biased towards 1 for a fitted one), "bonferroni bound" (no toy could
    resolve it: p <= n_windows x local p, quoted as an upper limit with
    `global_z_is_lower_limit`) or "no excess" (t = 0, p = 1). When no toy reaches t_obs,
    `global_p` is an upper limit too (the smaller of 1/n_toys and the Bonferroni bound)
    and `global_z_is_lower_limit` is set. `background_uncertainty` says
    whether the fit uncertainty of the background was folded into the local p
    (`background_error` is then the best window's sigma_w, events); windows with fewer than
    `min_window_count` events are not candidates.
    """

    mass_low: float
    mass_high: float
    first_bin: int
    stop_bin: int
    data: float
    background: float
    statistic: float
    local_p: float
    local_z: float
    global_p: float
    global_p_error: float
    global_z: float
    global_z_is_lower_limit: bool
    n_toys: int
    n_toys_reaching: int
    converged: bool
    width_min: int
    width_max: int
    n_windows: int
    min_window_background: float = MIN_WINDOW_BACKGROUND
    global_p_method: str = "toys"
    min_window_count: int = MIN_WINDOW_COUNT
    background_uncertainty: bool = False
    background_error: float = 0.0

    @property
    def global_p_text(self) -> str:
        """The global p for a sentence ("< 5.4e-06" when it is an upper limit)."""
        return format_p(self.global_p, self.global_z_is_lower_limit)


def bump_hunt(
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    edges: npt.ArrayLike,
    *,
    width_min: int = 1,
    width_max: int | None = None,
    min_toys: int = 1_000,
    max_toys: int = 100_000,
    target_rel_error: float = 0.1,
    min_window_background: float = MIN_WINDOW_BACKGROUND,
    min_window_count: int = MIN_WINDOW_COUNT,
    jacobian: npt.ArrayLike | None = None,
    covariance: npt.ArrayLike | None = None,
    fitted: npt.ArrayLike | None = None,
    seed: int | np.random.Generator = 0,
) -> BumpHuntResult:
    """BumpHunter of data `counts` against expected `background` counts, bins `edges` (GeV).

    Widths in bins (default 1..N/2). The global p uses adaptive background-only toys drawn
    from `seed` (see the module docstring); with no excess anywhere (t = 0) it is 1 and no
    toy is drawn. When the Bonferroni bound n_windows x local p is below 1 / max(`max_toys`,
    10 000), no toy budget could resolve the global p: the bound is quoted (an upper limit on p, a
    lower limit on Z) and no toy is drawn. With the background's `jacobian` (d mu / d
    parameters, rows = background bins) and fit `covariance`, its uncertainty is folded
    into every window's local p, for the data and the toys alike. With the `jacobian` and
    the fit's `fitted` mask (bins the likelihood used, one per background bin) each toy is
    refitted to first order (`core.pseudodata`) and scanned against its own background, as
    the data were against theirs: the global p is then "toys (refitted)". `fitted` without
    a `jacobian` raises InvalidInputError.
    """
    check_toy_budget(min_toys, max_toys, target_rel_error)
    n, b = validate_spectrum(counts, background, edges)
    e = np.asarray(edges, dtype=np.float64)
    if fitted is not None and jacobian is None:
        raise InvalidInputError(
            "bump_hunt was given the fit's fitted mask without its jacobian; the toys can "
            "only be refitted with both: give the jacobian too, or neither"
        )
    windows = scan_windows(
        b,
        width_min,
        width_max,
        min_window_background,
        min_count=min_window_count,
        jacobian=jacobian,
        covariance=covariance,
    )
    refit = None if fitted is None or jacobian is None else refit_projection(jacobian, b, fitted)
    best = best_window(windows, n, e)
    bound = bonferroni_bound(best.statistic, windows.n_windows)
    if best.statistic > 0 and bound * max(max_toys, MIN_TOYS_SMALL_P) < 1.0:
        toy_p = ToyPValue(bound, 0.0, 0, 0, True)
        global_z = max(float(z_from_log_p(_log_bound(best.statistic, windows))), 0.0)
        lower_limit = True
        method = "bonferroni bound"
    else:
        toy_p = _global_p_value(
            windows,
            best.statistic,
            min_toys=min_toys,
            max_toys=max_toys,
            target_rel_error=target_rel_error,
            seed=seed,
            refit=refit,
        )
        global_z, lower_limit = global_significance(toy_p)
        if lower_limit:
            # no toy reached t_obs: p is below both 1/n and the Bonferroni bound, quoted
            # as that upper limit (the p of the lower limit on Z), never as 0
            global_z = max(global_z, float(z_from_log_p(_log_bound(best.statistic, windows))))
            toy_p = replace(toy_p, p_value=float(p_from_z(global_z)))
        toys = "toys" if refit is None else "toys (refitted)"
        method = toys if best.statistic > 0 else "no excess"
    return BumpHuntResult(
        mass_low=best.mass_low,
        mass_high=best.mass_high,
        first_bin=best.first_bin,
        stop_bin=best.stop_bin,
        data=best.data,
        background=best.background,
        statistic=best.statistic,
        local_p=best.local_p,
        local_z=best.local_z,
        global_p=toy_p.p_value,
        global_p_error=toy_p.error,
        global_z=global_z,
        global_z_is_lower_limit=lower_limit,
        n_toys=toy_p.n_toys,
        n_toys_reaching=toy_p.n_reaching,
        converged=toy_p.converged,
        width_min=windows.widths[0],
        width_max=windows.widths[-1],
        n_windows=windows.n_windows,
        min_window_background=windows.min_background,
        global_p_method=method,
        min_window_count=windows.min_count,
        background_uncertainty=windows.background_uncertainty,
        background_error=best.background_error,
    )


def bonferroni_bound(statistic: float, n_windows: int) -> float:
    """Upper bound min(1, n_windows e^-t) on P(max t_toy >= t): each window has P <= e^-t."""
    if statistic <= 0 or n_windows < 1:
        return 1.0
    return min(1.0, n_windows * math.exp(-statistic))


def _log_bound(statistic: float, windows: ScanWindows) -> float:
    """Ln of `bonferroni_bound`, finite where the bound underflows."""
    return min(0.0, math.log(max(windows.n_windows, 1)) - statistic)


def global_significance(toy_p: ToyPValue) -> tuple[float, bool]:
    """(Z, is_lower_limit) of a toy p-value; with no toy reaching, Z of 1/n as a lower limit."""
    if toy_p.n_reaching == 0 and toy_p.n_toys > 0:
        return max(float(z_from_p(1.0 / toy_p.n_toys)), 0.0), True
    return max(float(z_from_p(toy_p.p_value)), 0.0), False


def _global_p_value(
    windows: ScanWindows,
    statistic: float,
    *,
    min_toys: int,
    max_toys: int,
    target_rel_error: float,
    seed: int | np.random.Generator,
    refit: RefitProjection | None = None,
) -> ToyPValue:
    """Fraction of background-only toys with max t >= `statistic` (adaptive budget).

    Without `refit` each toy is scanned against the fixed B (integer thresholds K_w);
    with it, against its own first-order refit B' (`refitted_window_maxima`, screened at
    t_obs so only windows that can reach it are evaluated).
    """
    if statistic <= 0:
        return ToyPValue(1.0, 0.0, 0, 0, True)
    rng = np.random.default_rng(seed)
    if refit is not None:
        background = np.zeros(refit.fitted.size, dtype=np.float64)
        background[windows.first_bin : windows.stop_bin] = windows.background_bins
        cap = max(1, _REFIT_ENTRIES_PER_BATCH // background.size)

        def count_refitted(size: int) -> int:
            toys = rng.poisson(background, size=(size, background.size))
            maxima = refitted_window_maxima(
                windows, toys, background, refit, statistic, count_only=True
            )
            return int(np.count_nonzero(maxima >= statistic))

        return adaptive_toy_p_value(
            count_refitted,
            min_toys=min_toys,
            max_toys=max_toys,
            target_rel_error=target_rel_error,
            batch_cap=cap,
        )
    thresholds = window_thresholds(windows, statistic, np.int64)
    bins = windows.background_bins
    batch_cap = max(1, _TOY_ENTRIES_PER_BATCH // bins.size)

    def count_batch(size: int) -> int:
        toys = rng.poisson(bins, size=(size, bins.size))
        return int(np.count_nonzero(fixed_toys_reaching(windows, thresholds, toys)))

    return adaptive_toy_p_value(
        count_batch,
        min_toys=min_toys,
        max_toys=max_toys,
        target_rel_error=target_rel_error,
        batch_cap=batch_cap,
    )
