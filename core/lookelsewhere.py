"""Scan-wide look-elsewhere effect: one global p over all spectra and anomaly-region points.

Statistic. T = max t over every spectrum s, every anomaly-region (AR) point a and every
BumpHunter window of that point (t = -ln p_local, `core.bumphunt`), with exactly the
windows of the per-spectrum hunt: each point carries its own window set (its fit range,
widths and minimum expected background, `core.bumphunt.HuntOptions`). The global p is
P(T_toy >= T_obs) over background-only pseudo-scans.

Pseudo-scans: marginals exact, nesting kept where the backgrounds allow. Per spectrum the
points are drawn from the tightest (smallest cross-section) outwards:
n_tightest ~ Poisson(B_tightest), then for the next looser point
n_k = Binomial(n_(k+1), min(1, B_k / B_(k+1))) + Poisson(max(B_k - B_(k+1), 0)).
Thinning a Poisson count keeps it Poisson and the added increment is independent, so every
point's toy is exactly Poisson(B_k) in every bin, whatever the fitted backgrounds do. When
they are nested (B_k >= B_(k+1)) the binomial keeps all events and this is the nested
increment sampler (tighter events a subset of looser ones). When a tighter fit's tail
crosses above a looser one (non-nested fits, common in a real scan), the looser toy is
thinned instead of being drawn from the envelope max(B): an envelope sampler gives the
looser points more events than their background, so T_toy is inflated and the global p
piles up at 1 (tests/core/test_lookelsewhere.py shows it on non-nested fits).

Pseudo-scans refitted. The data's backgrounds are fits to the data: each absorbs part of
the data's fluctuations (all of the total count, the broad part of any excess). Toys
scanned against the fixed fitted backgrounds keep those fluctuations, so T_toy is
stochastically larger than the data's T under the null and p piles up towards 1 (measured
in docs/physics-notes.md: median p 0.79 over 100 background-only experiments). Each
point's toy is therefore scanned against its own linearised refit, B' = B + J (J^T W J)^+
J^T W (n - B) over the bins the fit used (`core.pseudodata`), with the data's window set
and the exact tail t = -ln P(n >= D | B'_w) (`core.bumphunt.refitted_window_maxima`, shared
with the per-spectrum hunt's global p). Assumptions: the likelihood is quadratic in the
parameters within the toys' spread (first order in (n - B) / B; measured against the
minimiser's refit in tests/core/test_pseudodata.py: < 1 % of sqrt(B) per bin), and the
function choice, the fit range and the window exclusion are those of the data (not redone
per toy: a toy that would have chosen p4 over p3 is scanned against the refitted p3).
Points without a fit jacobian (`ScanPoint.jacobian`, `fitted`) keep the fixed-background
toys and `method` says so.

Spectra sharing events. Spectra of one stream share events and streams overlap (one event
enters several pair masses and streams), so the per-spectrum maxima T_s are positively
associated (Harris-FKG): independent spectra over-estimate p. Given a correlation matrix R
of the spectra (`scan_significance(correlation=...)`), the tails q_s are combined through
a Gaussian copula, p = P(any Z_s > Phi^-1(1 - q_s)), Z ~ N(0, R) (`GaussianCopula`:
sampled where p is resolvable, else the union sum_s q_s, exact to first order in small q).
R is measured from Poisson-bootstrap replicas of the selected events
(`bootstrap_correlation`: every event weighted by one Poisson(1) draw per replica, the
same in every spectrum and AR point it enters; each replica scanned as a toy; the normal
scores of the replica maxima correlated). Assumptions and limits: the dependence of the
T_s is that of a Gaussian copula with the normal-score correlation (no extra tail
dependence: for p far below 1/COPULA_SAMPLES the union sum, which ignores the overlap, is
used and is an upper bound); the replicas fluctuate around the data, not around B, which
changes the correlation only at second order. Without R the spectra are taken as
independent, p = 1 - prod_s (1 - q_s) (conservative), and `global_p_method` says so.

Estimation, spectrum by spectrum. p is a function of the q_s = P(T_s >= T_obs) (and R),
so each q_s is estimated from its own toys (exact T_s per toy: tabulated Poisson tails
against fixed backgrounds, the direct tail against refitted ones). Where
>= `DIRECT_MIN_REACHING` toys reach T_obs, q_s = k / n (binomial error). Where fewer do,
the tail is extrapolated from the level t_ref that `EXTRAPOLATION_REFERENCE` toys reach
(q_ref = k_ref / n) with the Gross-Vitells up-crossing law for one degree of freedom,
q_s(t) = q_ref exp(-(Z(t)^2 - Z(t_ref)^2) / 2), Z(t) = Phi^-1(1 - e^-t) (arXiv:1005.1891),
capped by the Bonferroni bound n_windows e^-t (each window's p-value is super-uniform, so
P(T_s >= t) <= n_windows e^-t holds exactly). The toy budget is adaptive: every spectrum
starts with `min_pseudo_scans`; at least 10 000 when p < 0.01 (refitted spectra: those
holding >= 5 % of sum q_s whose tail the budget can count); then spectra that dominate p
double their toys up to `max_pseudo_scans`, the extrapolated ones first, while the budget
can count their tail (q_s * max_pseudo_scans >= `DIRECT_MIN_REACHING`): beyond that, more
toys move the reference level of the extrapolation but not its error
(q_s / sqrt(`EXTRAPOLATION_REFERENCE`)), so a strong excess costs `min_pseudo_scans` per
refitted spectrum. A scan-global Z of 4
(p = 3e-5) over 60 spectra needs q_s ~ 5e-7: direct toys would need ~1e8 per spectrum, so
it is measured by the extrapolation, said in `global_p_method`, and validated in
tests/core/test_lookelsewhere.py against direct toys. The joint pseudo-scans formed by the
first n toys of every spectrum give `n_pseudo_scans_reaching` (the spectra's toys are
drawn independently, so this count ignores R); when none reaches T_obs,
`global_z_toys_lower_limit` is the toys-only lower limit Z(1/n).

Effective trials factor N_eff = ln(1 - p_global) / ln(1 - p_local), reported when
0 < p_global < 1. Each window's t is the per-spectrum hunt's (`core.bumphunt`): at least
`MIN_WINDOW_COUNT` events, and the fit uncertainty folded into the tail when the point
carries its fit's Jacobian and covariance (`ScanPoint.jacobian`, `.covariance`); the
thresholds, floor tables, compiled kernel and the refitted toys use that same tail. The
refit carries the fit's own fluctuation into the toys (the data's background is as
uncertain as a toy's refit); not modelled: the fixed event count of an AR (multinomial,
not Poisson, counts; the refit's free normalisation absorbs most of it).
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import math
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from core.bumphunt import (
    DEFAULT_HUNT,
    MIN_TOYS_SMALL_P,
    SMALL_P,
    HuntOptions,
    LocalExcess,
    ScanWindows,
    best_window,
    check_toy_budget,
    first_candidate_count,
    refitted_window_maxima,
    significance_from_statistic,
    tabulate_poisson_tails,
    tabulated_tail_statistics,
    toys_reaching,
    window_thresholds,
)
from core.errors import InvalidInputError
from core.pseudodata import RefitProjection, refit_projection
from core.significance import validate_spectrum, z_from_log_p

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Sampler = Literal["chained", "envelope"]

METHOD: Final = (
    "background-only pseudo-scans; per spectrum, AR points chained from the tightest "
    "outwards with exact Poisson(B) marginals (binomial thinning where a looser fit is "
    "lower, Poisson increments where higher); {refit}; spectra combined by {combination}; "
    "q_s from toys, extrapolated beyond them with the Gross-Vitells 1-dof law capped by the "
    "Bonferroni bound; N_eff = ln(1 - p_global) / ln(1 - p_local)"
)
"""The method of `ScanSignificance.method`, filled by `_method`."""

REFIT_METHOD: Final = "each toy refitted to first order around the accepted fit"
NO_REFIT_METHOD: Final = (
    "toys scanned against the fixed fitted backgrounds, not refitted (no fit jacobians "
    "given: p biased towards 1)"
)

REFIT_PILOT_TOYS: Final = 200
"""Exact (unfloored) refitted toys per spectrum before a floor at their 80 % quantile."""

COPULA_SAMPLES: Final = 200_000
"""Correlated normal vectors drawn for the Gaussian-copula combination of the spectra."""

COPULA_MIN_HITS: Final = 100
"""Below this many copula samples beyond a threshold, p is the union sum of q_s."""

DIRECT_MIN_REACHING: Final = 10
"""A spectrum's q_s is the toy fraction when at least this many toys reach T_obs."""

EXTRAPOLATION_REFERENCE: Final = 20
"""The tail is extrapolated from the level this many toys reach."""

TIE_TOLERANCE: Final = 1e-7
"""A toy whose T is within this relative distance below T_obs reaches it. Toys get t from
tabulated tails, the data from the direct one; the two differ by up to ~1e-8 (relative) for
windows of 1e5-1e6 events, so a toy with the data's own count in the data's window (a tie,
which P(T >= T_obs) counts) would otherwise fall on either side at random."""

_ENTRIES_PER_BATCH: Final = 2_000_000
_TABLE_CAP: Final = 4_000_000


@dataclass(frozen=True, eq=False)
class NestedSpectrum:
    """One spectrum at its AR points, loosest (largest cross-section, pb) first.

    `counts` and `background` have shape (n_points, n_bins) over common `edges` (GeV);
    a point's background is 0 outside its fit range. `windows` are the point's BumpHunter
    windows. `merged` lists (cross-section, kept cross-section) of points dropped because
    they repeat another point's events and background (a whole-stream AR at several
    cross-sections). `background_nesting_violations` counts bins where a looser point's
    background is below a tighter one's; `data_nesting_violations` where its data are.
    `uncertainties` holds per point (as in `counts`) its background's (jacobian,
    covariance), rows = all bins, or None; empty when no point has one.
    """

    name: str
    edges: FloatArray
    cross_sections_pb: FloatArray
    counts: FloatArray
    background: FloatArray
    windows: tuple[ScanWindows, ...]
    merged: tuple[tuple[float, float], ...]
    background_nesting_violations: int
    data_nesting_violations: int
    uncertainties: tuple[tuple[FloatArray, FloatArray] | None, ...] = ()
    refits: tuple[RefitProjection | None, ...] = ()

    @property
    def refitted(self) -> bool:
        """Whether every point's pseudo-data are refitted (`core.pseudodata`)."""
        return bool(self.refits) and all(r is not None for r in self.refits)

    @property
    def nesting_violations(self) -> int:
        """Bins where a looser point's background is below a tighter one's."""
        return self.background_nesting_violations

    @property
    def n_windows(self) -> int:
        """Windows scanned over all points."""
        return sum(w.n_windows for w in self.windows)

    @property
    def background_envelope(self) -> FloatArray:
        """Running maximum of B from the tightest point (the old sampler's toy means)."""
        return np.asarray(np.maximum.accumulate(self.background[::-1], axis=0)[::-1])


def nested_spectrum(
    name: str,
    edges: npt.ArrayLike,
    cross_sections_pb: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    *,
    hunt: HuntOptions | Sequence[HuntOptions] = DEFAULT_HUNT,
    uncertainties: Sequence[tuple[FloatArray, FloatArray] | None] | None = None,
    refits: Sequence[RefitProjection | None] | None = None,
) -> NestedSpectrum:
    """Validate and order one spectrum's AR points (any order in; loosest first out).

    `hunt` gives the window set (one for all points, or one per point in input order);
    `uncertainties`, per point in input order, its background's (jacobian, covariance)
    (rows = all bins, zero outside its fit range) or None, folded into its windows' tails.
    `refits` the points' linearised refits of pseudo-data (input order; None: no refit).
    Points with identical counts and background are entered once (the loosest is kept).
    Raises InvalidInputError for bad histograms.
    """
    sigma = np.asarray(cross_sections_pb, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if sigma.ndim != 1 or sigma.size == 0:
        raise InvalidInputError(
            f"spectrum {name!r}: expected a 1D list of AR cross-sections (pb), found shape "
            f"{sigma.shape}"
        )
    if n.ndim != 2 or n.shape[0] != sigma.size or b.shape != n.shape:
        raise InvalidInputError(
            f"spectrum {name!r}: expected counts and background of shape (n_points, n_bins) "
            f"with n_points = {sigma.size} cross-sections; found counts {n.shape}, "
            f"background {b.shape}"
        )
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise InvalidInputError(
            f"spectrum {name!r}: AR cross-sections must be finite and > 0 pb, found {sigma}"
        )
    if np.unique(sigma).size != sigma.size:
        raise InvalidInputError(
            f"spectrum {name!r}: two AR points have the same cross-section {sigma}; each AR "
            "point must appear once"
        )
    hunts = [hunt] * sigma.size if isinstance(hunt, HuntOptions) else list(hunt)
    if len(hunts) != sigma.size:
        raise InvalidInputError(
            f"spectrum {name!r}: {len(hunts)} hunt options for {sigma.size} AR points"
        )
    if refits is not None and len(refits) != sigma.size:
        raise InvalidInputError(
            f"spectrum {name!r}: {len(refits)} refit projections for {sigma.size} AR points"
        )
    for point in range(sigma.size):
        try:
            validate_spectrum(n[point], b[point], e)
        except InvalidInputError as error:
            raise InvalidInputError(f"spectrum {name!r} at {sigma[point]:g} pb: {error}") from error
    order = np.argsort(-sigma, kind="stable")
    sigma, n, b = sigma[order], n[order], b[order]
    hunts = [hunts[i] for i in order]
    errors = _point_uncertainties(name, uncertainties, sigma.size)
    errors = [errors[i] for i in order]
    projections = [None] * sigma.size if refits is None else [refits[i] for i in order]
    keep: list[int] = []
    merged: list[tuple[float, float]] = []
    for point in range(sigma.size):
        twin = next(
            (
                kept
                for kept in keep
                if np.array_equal(n[kept], n[point])
                and np.allclose(b[kept], b[point], rtol=1e-9, atol=0.0)
                and hunts[kept] == hunts[point]
                and _same_uncertainty(errors[kept], errors[point])
            ),
            None,
        )
        if twin is None:
            keep.append(point)
        else:
            merged.append((float(sigma[point]), float(sigma[twin])))
    sigma, n, b = sigma[keep], n[keep], b[keep]
    errors = [errors[i] for i in keep]
    windows = []
    for point, options in zip(range(sigma.size), (hunts[i] for i in keep), strict=True):
        try:
            windows.append(options.windows(b[point], *(errors[point] or (None, None))))
        except InvalidInputError as error:
            raise InvalidInputError(f"spectrum {name!r} at {sigma[point]:g} pb: {error}") from error
    both = (b[1:] > 0) & (b[:-1] > 0)
    background_violations = int(np.count_nonzero(both & (b[:-1] < b[1:] * (1.0 - 1e-12))))
    data_violations = int(np.count_nonzero(n[1:] > n[:-1] + 1e-9))
    return NestedSpectrum(
        name,
        e,
        sigma,
        n,
        b,
        tuple(windows),
        tuple(merged),
        background_violations,
        data_violations,
        tuple(errors) if any(x is not None for x in errors) else (),
        tuple(projections[i] for i in keep),
    )


def _point_uncertainties(
    name: str,
    uncertainties: Sequence[tuple[FloatArray, FloatArray] | None] | None,
    n_points: int,
) -> list[tuple[FloatArray, FloatArray] | None]:
    """One (jacobian, covariance) or None per point (input order)."""
    if uncertainties is None:
        return [None] * n_points
    if len(uncertainties) != n_points:
        raise InvalidInputError(
            f"spectrum {name!r}: {len(uncertainties)} background uncertainties for "
            f"{n_points} AR points"
        )
    return list(uncertainties)


def _same_uncertainty(
    first: tuple[FloatArray, FloatArray] | None, second: tuple[FloatArray, FloatArray] | None
) -> bool:
    if first is None or second is None:
        return first is second
    return all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def nested_pseudo_counts(
    spectrum: NestedSpectrum,
    n_toys: int,
    rng: np.random.Generator,
    *,
    sampler: Sampler = "chained",
) -> npt.NDArray[np.int64]:
    """Background-only toy counts (n_points, n_toys, n_bins), chained from the tightest AR.

    "chained" (the method): exact Poisson(B_k) marginals (module docstring). "envelope": the
    previous sampler, nested increments of the running maximum of B, kept only to show in
    the tests how it fails on non-nested fits.
    """
    b = spectrum.background
    n_points, n_bins = b.shape
    if sampler == "envelope":
        envelope = spectrum.background_envelope
        increments = envelope - np.concatenate([envelope[1:], np.zeros_like(envelope[:1])])
        draws = rng.poisson(
            np.maximum(increments, 0.0)[:, None, :], size=(n_points, n_toys, n_bins)
        )
        return np.asarray(np.cumsum(draws[::-1], axis=0)[::-1], dtype=np.int64)
    toys = np.empty((n_points, n_toys, n_bins), dtype=np.int64)
    toys[-1] = rng.poisson(b[-1], size=(n_toys, n_bins))
    for point in range(n_points - 2, -1, -1):
        looser, tighter = b[point], b[point + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            keep = np.where(tighter > 0, np.minimum(1.0, looser / tighter), 1.0)
        previous = toys[point + 1]
        thinned = keep < 1.0
        current = previous.copy()
        if np.any(thinned):
            current[:, thinned] = rng.binomial(previous[:, thinned], keep[thinned])
        extra = np.maximum(looser - tighter, 0.0)
        added = extra > 0
        if np.any(added):
            current[:, added] += rng.poisson(extra[added], size=(n_toys, int(added.sum())))
        toys[point] = current
    return toys


def max_window_statistic(
    windows: ScanWindows,
    toys: npt.NDArray[np.int64],
    floor: float | None = None,
    *,
    table: FloorTable | None = None,
) -> FloatArray:
    """Max t over `windows` for each toy (rows of full-length bin counts).

    Exact where it is >= `floor`; toys whose every window stays below `floor` get 0.
    With a floor and numba, a compiled loop compares each window count with its threshold
    and looks its t up in one pass (`table`, from `floor_table(windows, floor)`, may be
    built once for many batches); counts beyond the table get a longer table, then the
    exact tail. Without numba, numpy does the comparison (`toys_reaching`) and the look-up.
    Without a floor every excess is needed and numpy's per-width tables are used: there
    most counts lie beyond a short table (bench/results/lee.json).
    """
    inside = toys[:, windows.first_bin : windows.stop_bin]
    cumulative = np.zeros((inside.shape[0], inside.shape[1] + 1), dtype=np.int64)
    np.cumsum(inside, axis=1, out=cumulative[:, 1:])
    floor = floor if floor is not None and floor > 0 else None
    kernel = compiled_floor_maxima() if floor is not None else None
    if kernel is not None:
        table = table if table is not None else floor_table(windows, floor)
        result, beyond, needed = _run_floor_kernel(kernel, table, cumulative)
        if needed > table.length:
            rows = np.flatnonzero(beyond)
            if needed <= _TABLE_CAP // max(table.first.size, 1):
                longer = floor_table(windows, floor, needed)
                result[rows] = _run_floor_kernel(kernel, longer, cumulative[rows])[0]
            else:
                result[rows] = _exact_maxima(windows, cumulative[rows])
        return result
    if floor is not None:
        limits = window_thresholds(windows, floor)
        rows = np.flatnonzero(toys_reaching(windows, limits, cumulative))
        result = np.zeros(inside.shape[0], dtype=np.float64)
        if rows.size:
            result[rows] = _exact_maxima(windows, cumulative[rows])
        return result
    return _exact_maxima(windows, cumulative)


FLOOR_TABLE_LENGTH: Final = 64
"""Counts tabulated per window from its threshold up (longer tables are built on demand)."""


@dataclass(frozen=True, eq=False)
class FloorTable:
    """t = -ln P(n >= k | B_w) for k = first[w] .. first[w] + length - 1, every window w.

    `first[w]` is the smallest count with t >= the floor (`core.bumphunt.window_thresholds`),
    or with t > 0 (max(floor(B_w) + 1, min_count)) without a floor; saturated for windows
    that are not scanned. The tails are the windows' own (negative binomial where they
    carry a relative background uncertainty). Windows are flattened width by width, those
    of width `widths[i]` at offsets[i] .. offsets[i + 1] - 1.
    """

    widths: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    first: npt.NDArray[np.int64]
    values: FloatArray
    length: int


def floor_table(
    windows: ScanWindows, floor: float | None, length: int = FLOOR_TABLE_LENGTH
) -> FloorTable:
    """The look-up table of `windows` above `floor` (see `FloorTable`)."""
    sums = np.concatenate(windows.background_sums)
    active = np.concatenate(windows.active)
    relative = windows.flat_relative_sd
    if floor is None:
        first = first_candidate_count(sums, windows.min_count)
        first[~active] = np.iinfo(np.int64).max
    else:
        first = np.concatenate(window_thresholds(windows, floor)).astype(np.int64)
        first[~active] = np.iinfo(np.int64).max
    offsets = np.zeros(len(windows.widths) + 1, dtype=np.int64)
    np.cumsum([s.size for s in windows.background_sums], out=offsets[1:])
    values = np.zeros((sums.size, length), dtype=np.float64)
    if np.any(active):
        values[active] = tabulate_poisson_tails(
            sums[active], first[active], length, None if relative is None else relative[active]
        )
    widths = np.asarray(windows.widths, dtype=np.int64)
    return FloorTable(widths, offsets, first, values.ravel(), length)


def _run_floor_kernel(
    kernel: Callable[..., None], table: FloorTable, cumulative: npt.NDArray[np.int64]
) -> tuple[FloatArray, npt.NDArray[np.bool_], int]:
    """Maxima, rows with a count beyond the table, and the table length they need."""
    result = np.zeros(cumulative.shape[0], dtype=np.float64)
    beyond = np.zeros(cumulative.shape[0], dtype=np.bool_)
    needed = np.zeros(1, dtype=np.int64)
    kernel(
        cumulative,
        table.widths,
        table.offsets,
        table.first,
        table.values,
        table.length,
        result,
        beyond,
        needed,
    )
    return result, beyond, int(needed[0])


def _floor_maxima_loop(
    cumulative: npt.NDArray[np.int64],
    widths: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    first: npt.NDArray[np.int64],
    values: FloatArray,
    length: int,
    best: FloatArray,
    beyond: npt.NDArray[np.bool_],
    needed: npt.NDArray[np.int64],
) -> None:
    """Per toy, the largest tabulated t of its windows at or above the floor (numba kernel).

    A window whose count is at least `first` + `length` sets `beyond` for its toy and
    raises needed[0] to the table length that would hold it.
    """
    for toy in range(cumulative.shape[0]):
        row = cumulative[toy]
        largest = 0.0
        for index in range(widths.size):
            width = widths[index]
            start_window = offsets[index]
            for start in range(offsets[index + 1] - start_window):
                window = start_window + start
                excess = row[start + width] - row[start] - first[window]
                if excess >= 0:
                    if excess < length:
                        largest = max(largest, values[window * length + excess])
                    else:
                        beyond[toy] = True
                        needed[0] = max(needed[0], excess + 1)
        best[toy] = largest


@functools.cache
def compiled_floor_maxima() -> Callable[..., None] | None:
    """`_floor_maxima_loop` compiled by numba (cached on disk), or None without numba."""
    try:
        numba = importlib.import_module("numba")
    except ImportError:
        return None
    kernel: Callable[..., None] = numba.njit(cache=True, nogil=True)(_floor_maxima_loop)
    return kernel


def _exact_maxima(windows: ScanWindows, cumulative: npt.NDArray[np.int64]) -> FloatArray:
    """Exact max t per row of cumulative window counts, from tabulated tails."""
    best = np.zeros(cumulative.shape[0], dtype=np.float64)
    for index, (width, sums, active) in enumerate(
        zip(windows.widths, windows.background_sums, windows.active, strict=True)
    ):
        if not np.any(active):
            continue
        columns = np.flatnonzero(active)
        counts = cumulative[:, width + columns] - cumulative[:, columns]
        relative = windows.width_relative_sd(index)
        values = tabulated_tail_statistics(
            counts,
            sums[columns],
            None if relative is None else relative[columns],
            windows.min_count,
        )
        np.maximum(best, values.max(axis=1), out=best)
    return best


def spectrum_toy_maxima(
    spectrum: NestedSpectrum,
    n_toys: int,
    rng: np.random.Generator,
    *,
    sampler: Sampler = "chained",
    floor: float | None = None,
) -> FloatArray:
    """T_s = max t over points and windows of `n_toys` background-only pseudo-scans.

    Exact where T_s >= `floor`; 0 below it (see `max_window_statistic`).
    """
    result = np.zeros(n_toys, dtype=np.float64)
    batch = max(1, _ENTRIES_PER_BATCH // max(spectrum.counts.size, 1))
    tables: list[FloorTable | None] = [None] * len(spectrum.windows)
    if floor is not None and floor > 0 and compiled_floor_maxima() is not None:
        tables = [floor_table(windows, floor) for windows in spectrum.windows]
    for start in range(0, n_toys, batch):
        size = min(batch, n_toys - start)
        toys = nested_pseudo_counts(spectrum, size, rng, sampler=sampler)
        best = np.zeros(size, dtype=np.float64)
        for point, windows in enumerate(spectrum.windows):
            refit = spectrum.refits[point] if spectrum.refits else None
            if refit is None:
                statistic = max_window_statistic(windows, toys[point], floor, table=tables[point])
            else:
                background = spectrum.background[point]
                statistic = refitted_window_maxima(windows, toys[point], background, refit, floor)
            np.maximum(best, statistic, out=best)
        result[start : start + size] = best
    return result


@dataclass(frozen=True)
class TailEstimate:
    """q_s = P(T_s >= t) of one spectrum: value, error and how it was obtained."""

    q: float
    error: float
    n_toys: int
    n_reaching: int
    method: Literal["toys", "extrapolated", "bonferroni bound", "no excess"]
    reference_statistic: float | None


def tail_probability(toy_maxima: FloatArray, statistic: float, n_windows: int) -> TailEstimate:
    """Estimate P(T_s >= `statistic`) from toy maxima (module docstring for the rules)."""
    n = toy_maxima.size
    if statistic <= 0:
        return TailEstimate(1.0, 0.0, n, n, "no excess", None)
    reaching = int(np.count_nonzero(toy_maxima >= statistic * (1 - TIE_TOLERANCE)))
    bound = min(1.0, n_windows * math.exp(-statistic)) if n_windows else 1.0
    if reaching >= DIRECT_MIN_REACHING:
        q = reaching / n
        return TailEstimate(q, math.sqrt(q * (1 - q) / n), n, reaching, "toys", None)
    ordered = np.sort(toy_maxima)[::-1]
    k_ref = min(EXTRAPOLATION_REFERENCE, n)
    t_ref = float(ordered[k_ref - 1])
    if t_ref <= 0 or t_ref >= statistic * (1 - TIE_TOLERANCE):
        upper = 1.0 - 0.32 ** (1.0 / n) if reaching == 0 else reaching / n
        if bound <= upper:
            return TailEstimate(bound, 0.0, n, reaching, "bonferroni bound", None)
        return TailEstimate(upper, upper, n, reaching, "toys", None)
    q_ref = k_ref / n
    z_obs = float(z_from_log_p(-statistic))
    z_ref = float(z_from_log_p(-t_ref))
    extrapolated = q_ref * math.exp(-0.5 * (z_obs * z_obs - z_ref * z_ref))
    if bound < extrapolated:
        return TailEstimate(bound, 0.0, n, reaching, "bonferroni bound", t_ref)
    return TailEstimate(
        extrapolated, extrapolated / math.sqrt(k_ref), n, reaching, "extrapolated", t_ref
    )


@dataclass(frozen=True)
class ScanPointExcess:
    """The best BumpHunter window of one spectrum at one AR point."""

    spectrum: str
    cross_section_pb: float
    excess: LocalExcess


@dataclass(frozen=True)
class ScanSignificance:
    """Scan-wide result: the largest local excess and its global p over the whole scan.

    `global_p_method` says how p was obtained ("toys", "toys + extrapolated tails in k
    spectra[, bonferroni bound in m]", "bonferroni bound", "no excess");
    `global_z_is_lower_limit` is True when Bonferroni upper bounds carry more than half of
    p (then p is an upper bound). `spectrum_tails` gives (name, q_s, method) per spectrum.
    """

    best: ScanPointExcess
    points: tuple[ScanPointExcess, ...]
    statistic: float
    local_p: float
    local_z: float
    global_p: float
    global_p_error: float
    global_z: float
    global_z_is_lower_limit: bool
    effective_trials: float | None
    n_tests: int
    n_windows: int
    n_pseudo_scans: int
    n_pseudo_scans_reaching: int
    converged: bool
    background_nesting_violations: int
    method: str
    global_p_method: str = "toys"
    global_z_toys_lower_limit: float | None = None
    n_spectra: int = 0
    n_toys_per_spectrum_max: int = 0
    spectrum_tails: tuple[tuple[str, float, str], ...] = ()
    merged_points: tuple[tuple[str, float, float], ...] = ()
    data_nesting_violations: int = 0


def effective_trials(global_p: float, local_p: float) -> float | None:
    """N_eff = ln(1 - p_global) / ln(1 - p_local), or None where it is undefined."""
    if not (0.0 < global_p < 1.0 and 0.0 < local_p < 1.0):
        return None
    return math.log1p(-global_p) / math.log1p(-local_p)


def _combine(tails: Sequence[TailEstimate]) -> tuple[float, float]:
    """P = 1 - prod(1 - q_s) and its error from the q_s errors."""
    if any(t.q >= 1.0 for t in tails):
        return 1.0, 0.0
    log_none = sum(math.log1p(-t.q) for t in tails)
    p = -math.expm1(log_none)
    survive = math.exp(log_none)
    variance = sum((survive / max(1.0 - t.q, 1e-300)) ** 2 * t.error**2 for t in tails)
    return min(max(p, 0.0), 1.0), math.sqrt(variance)


def scan_significance(
    spectra: Sequence[NestedSpectrum],
    *,
    width_min: int | None = None,
    width_max: int | None = None,
    min_pseudo_scans: int = 1_000,
    max_pseudo_scans: int = 100_000,
    target_rel_error: float = 0.1,
    seed: int | np.random.Generator = 0,
    sampler: Sampler = "chained",
    workers: int = 1,
    correlation: npt.ArrayLike | None = None,
) -> ScanSignificance:
    """Global significance of the largest excess over all spectra and AR points of a scan.

    Each spectrum's points carry their window sets (`nested_spectrum`); `width_min` and
    `width_max`, when given, replace the widths of every point (the other options stay).
    `seed` fixes the pseudo-scans. See the module docstring for the method.

    `correlation` (spectra x spectra, in the order of `spectra`, e.g. from
    `bootstrap_correlation`) combines the spectra's tail probabilities through a Gaussian
    copula; without it the spectra are taken as independent (module docstring).

    `workers` > 1 draws the pseudo-scans of different spectra in that many processes. Each
    spectrum has its own random stream, handed to the process and back, so the result is
    the same for any number of workers (tests/core/test_lookelsewhere.py).
    """
    if workers < 1:
        raise InvalidInputError(f"workers must be >= 1, found {workers}")
    check_toy_budget(min_pseudo_scans, max_pseudo_scans, target_rel_error)
    if not spectra:
        raise InvalidInputError("scan_significance needs at least one spectrum")
    names = [s.name for s in spectra]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"spectrum names must be unique, found {names}")
    if width_min is not None or width_max is not None:
        spectra = [_with_widths(s, width_min, width_max) for s in spectra]
    common = _observed_excesses(spectra)
    common["method"] = common["method"].format(
        combination="a Gaussian copula with the given correlation"
        if correlation is not None
        else "independence, p = 1 - prod_s (1 - q_s)"
    )
    statistic = common["statistic"]
    if statistic <= 0:
        return ScanSignificance(
            **common,
            global_p=1.0,
            global_p_error=0.0,
            global_z=0.0,
            global_z_is_lower_limit=False,
            effective_trials=None,
            n_pseudo_scans=0,
            n_pseudo_scans_reaching=0,
            converged=True,
            global_p_method="no excess",
        )
    generators = np.random.default_rng(seed).spawn(len(spectra) + 1)
    copula_stream = generators.pop()
    combine: Callable[[Sequence[TailEstimate]], tuple[float, float]] = _combine
    if correlation is not None:
        combine = GaussianCopula(correlation, len(spectra), copula_stream)
    with ToyPool(workers) as pool:
        toys = _SpectrumToys(spectra, statistic, sampler, generators, pool)
        tails, p, error = _adaptive_tails(
            toys, min_pseudo_scans, max_pseudo_scans, target_rel_error, combine
        )
    maxima = toys.maxima
    n_joint = min(m.size for m in maxima)
    joint = np.max(np.stack([m[:n_joint] for m in maxima]), axis=0)
    joint_reaching = int(np.count_nonzero(joint >= statistic * (1 - TIE_TOLERANCE)))
    global_method, is_limit = _global_method(tails, joint_reaching)
    global_method += "; " + _combination_method(combine)
    global_z = max(float(z_from_log_p(math.log(p))) if p > 0 else math.inf, 0.0)
    toys_limit = None
    if joint_reaching == 0:
        toys_limit = max(float(z_from_log_p(-math.log(n_joint))), 0.0)
    return ScanSignificance(
        **common,
        global_p=p,
        global_p_error=error,
        global_z=global_z,
        global_z_is_lower_limit=is_limit,
        effective_trials=effective_trials(p, common["local_p"]),
        n_pseudo_scans=n_joint,
        n_pseudo_scans_reaching=joint_reaching,
        converged=bool(p > 0 and error <= target_rel_error * p),
        global_p_method=global_method,
        global_z_toys_lower_limit=toys_limit,
        n_toys_per_spectrum_max=max(m.size for m in maxima),
        spectrum_tails=tuple((s.name, t.q, t.method) for s, t in zip(spectra, tails, strict=True)),
    )


class GaussianCopula:
    """p = P(any T_s >= T_obs) from the spectra's tails q_s and their correlation (callable).

    The spectra's maxima are joined by a Gaussian copula: Z ~ N(0, R) and T_s >= T_obs
    where Z_s > Phi^-1(1 - q_s). p is the fraction of `COPULA_SAMPLES` correlated normal
    vectors (drawn once, so successive calls compare alike) with any component beyond its
    threshold; where fewer than `COPULA_MIN_HITS` are, p is the union sum_s q_s, exact to
    first order in q (a Gaussian copula with |R_st| < 1 has no joint tail) and an upper
    bound. The error adds the sampling error and the q_s errors (to first order).
    """

    def __init__(self, correlation: npt.ArrayLike, n_spectra: int, rng: np.random.Generator):
        matrix = nearest_correlation(correlation, n_spectra)
        factor = np.linalg.cholesky(matrix + 1e-12 * np.eye(n_spectra))
        normals = rng.standard_normal((COPULA_SAMPLES, n_spectra))
        # einsum for a few spectra: a BLAS product of a thin matrix spins up its threads for
        # longer than the product takes (0.09 s against 0.02 s for 3 spectra)
        self.normals = (
            np.einsum("ij,kj->ik", normals, factor) if n_spectra <= 8 else normals @ factor.T
        )
        self.method = "Gaussian copula of the spectra (bootstrap correlation)"

    def __call__(self, tails: Sequence[TailEstimate]) -> tuple[float, float]:
        """(p, error) for these tails."""
        q = np.array([t.q for t in tails], dtype=np.float64)
        q_error = math.sqrt(sum(t.error**2 for t in tails))
        if np.any(q >= 1.0):
            return 1.0, 0.0
        thresholds = -special.ndtri(q)
        hits = int(np.count_nonzero(np.any(self.normals > thresholds, axis=1)))
        if hits >= COPULA_MIN_HITS:
            self.method = "Gaussian copula of the spectra (bootstrap correlation), sampled"
            p = hits / COPULA_SAMPLES
            return p, math.hypot(math.sqrt(p * (1 - p) / COPULA_SAMPLES), q_error)
        self.method = (
            "Gaussian copula of the spectra (bootstrap correlation), union sum of q_s "
            "(first order in small q)"
        )
        return min(float(q.sum()), 1.0), q_error


def nearest_correlation(correlation: npt.ArrayLike, n_spectra: int) -> FloatArray:
    """A valid correlation matrix near `correlation`: symmetrised, eigenvalues clipped >= 0.

    Raises InvalidInputError unless it is a finite (n_spectra, n_spectra) matrix.
    """
    matrix = np.asarray(correlation, dtype=np.float64)
    if matrix.shape != (n_spectra, n_spectra) or not np.all(np.isfinite(matrix)):
        raise InvalidInputError(
            f"correlation: expected a finite {n_spectra} x {n_spectra} matrix (one row per "
            f"spectrum), found shape {matrix.shape}"
        )
    matrix = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(matrix)
    matrix = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    scale = np.sqrt(np.clip(np.diag(matrix), 1e-300, None))
    matrix = matrix / np.outer(scale, scale)
    np.fill_diagonal(matrix, 1.0)
    return np.asarray(matrix, dtype=np.float64)


def bootstrap_correlation(
    spectra: Sequence[NestedSpectrum], replicas: Sequence[npt.ArrayLike]
) -> FloatArray:
    """Correlation of the spectra's maximum statistics, from Poisson-bootstrap replicas.

    `replicas[s]` has shape (n_replicas, n_points, n_bins) over spectrum s's points and
    bins: the data's selected events, each weighted by one Poisson(1) draw per replica (the
    same draw for an event in every spectrum it enters). Each replica's T_s is scanned as a
    toy is (refitted where the spectrum has refits); the van der Waerden normal scores of
    the T_s are correlated across spectra (their Pearson correlation estimates the Gaussian
    copula's). A spectrum whose T_s never varies is uncorrelated with the others.
    """
    if len(replicas) != len(spectra):
        raise InvalidInputError(
            f"bootstrap_correlation: {len(replicas)} replica sets for {len(spectra)} spectra"
        )
    scores = [
        _replica_scores(spectrum, replica)
        for spectrum, replica in zip(spectra, replicas, strict=True)
    ]
    return _scores_correlation(spectra, scores)


def _replica_scores(spectrum: NestedSpectrum, replicas: npt.ArrayLike) -> FloatArray:
    """Normal scores of the T_s of each replica (n_replicas, n_points, n_bins) of `spectrum`."""
    counts = np.asarray(replicas)
    if counts.ndim != 3 or counts.shape[1:] != spectrum.counts.shape:
        raise InvalidInputError(
            f"bootstrap_correlation: replicas of {spectrum.name!r} must have shape "
            f"(n_replicas, {spectrum.counts.shape[0]}, {spectrum.counts.shape[1]}), "
            f"found {counts.shape}"
        )
    maxima = _replica_maxima(spectrum, np.rint(counts).astype(np.int64))
    ranks = stats.rankdata(maxima)
    return np.asarray(special.ndtri(ranks / (maxima.size + 1.0)), dtype=np.float64)


def _scores_correlation(spectra: Sequence[NestedSpectrum], scores: list[FloatArray]) -> FloatArray:
    """The nearest correlation matrix to that of the spectra's replica normal `scores`."""
    if len({s.size for s in scores}) != 1 or scores[0].size < 3:
        raise InvalidInputError(
            "bootstrap_correlation: every spectrum needs the same number (>= 3) of replicas"
        )
    matrix = np.eye(len(spectra))
    stacked = np.stack(scores)
    varying = np.std(stacked, axis=1) > 0
    if np.count_nonzero(varying) > 1:
        matrix[np.ix_(varying, varying)] = np.corrcoef(stacked[varying])
    return nearest_correlation(matrix, len(spectra))


def _replica_maxima(spectrum: NestedSpectrum, counts: npt.NDArray[np.int64]) -> FloatArray:
    """Max t over points and windows of each replica (rows of counts), as for a toy."""
    best = np.zeros(counts.shape[0], dtype=np.float64)
    for point, windows in enumerate(spectrum.windows):
        refit = spectrum.refits[point] if spectrum.refits else None
        rows = counts[:, point]
        if refit is None:
            statistic = max_window_statistic(windows, rows)
        else:
            statistic = refitted_window_maxima(windows, rows, spectrum.background[point], refit)
        np.maximum(best, statistic, out=best)
    return best


def _method(spectra: Sequence[NestedSpectrum]) -> str:
    """`METHOD` for these spectra (refitted pseudo-data or not; the combination added later)."""
    refitted = [s.refitted for s in spectra]
    if all(refitted):
        refit = REFIT_METHOD
    elif any(refitted):
        refit = f"{REFIT_METHOD} in {sum(refitted)} of {len(spectra)} spectra, the others " + (
            NO_REFIT_METHOD.removeprefix("toys ")
        )
    else:
        refit = NO_REFIT_METHOD
    return METHOD.format(refit=refit, combination="{combination}")


def _combination_method(combine: Callable[[Sequence[TailEstimate]], tuple[float, float]]) -> str:
    """How the spectra's tail probabilities were combined."""
    if isinstance(combine, GaussianCopula):
        return combine.method
    return "spectra independent, p = 1 - prod_s (1 - q_s) (conservative for shared events)"


def _observed_excesses(spectra: Sequence[NestedSpectrum]) -> dict[str, Any]:
    """The fields of a `ScanSignificance` that the data alone set (best excess, counts)."""
    points: list[ScanPointExcess] = []
    for spectrum in spectra:
        for point, sigma in enumerate(spectrum.cross_sections_pb):
            excess = best_window(spectrum.windows[point], spectrum.counts[point], spectrum.edges)
            points.append(ScanPointExcess(spectrum.name, float(sigma), excess))
    ranked = tuple(sorted(points, key=lambda p: -p.excess.statistic))
    best = ranked[0]
    statistic = best.excess.statistic
    local_p, local_z = significance_from_statistic(statistic)
    return {
        "best": best,
        "points": ranked,
        "statistic": statistic,
        "local_p": local_p,
        "local_z": local_z,
        "n_tests": len(points),
        "n_windows": sum(s.n_windows for s in spectra),
        "background_nesting_violations": sum(s.background_nesting_violations for s in spectra),
        "method": _method(spectra),
        "n_spectra": len(spectra),
        "merged_points": tuple(
            (s.name, dropped, kept) for s in spectra for dropped, kept in s.merged
        ),
        "data_nesting_violations": sum(s.data_nesting_violations for s in spectra),
    }


class _SpectrumToys:
    """The toy maxima of every spectrum so far, each from its own random stream."""

    def __init__(
        self,
        spectra: Sequence[NestedSpectrum],
        statistic: float,
        sampler: Sampler,
        generators: list[np.random.Generator],
        pool: ToyPool,
    ) -> None:
        self.spectra = spectra
        self.statistic = statistic
        self.sampler = sampler
        self.generators = generators
        self.pool = pool
        self.maxima: list[FloatArray] = [np.zeros(0) for _ in spectra]

    def extend(self, wanted: dict[int, int]) -> None:
        """Draw pseudo-scans until spectrum `index` has `wanted[index]` toy maxima."""
        maxima = self.maxima
        pilots = {
            index: REFIT_PILOT_TOYS
            for index, total in wanted.items()
            if self.spectra[index].refitted
            and maxima[index].size == 0
            and total > 2 * REFIT_PILOT_TOYS
        }
        if pilots:
            self.extend(pilots)
        tasks = []
        for index, total in wanted.items():
            missing = total - maxima[index].size
            if missing <= 0:
                continue
            # Only the upper tail of T_s is ever used (T_obs and the level of the 20th
            # largest toy): beyond the first toys, values below the 95 % quantile are not
            # computed exactly (at least 5 % of all toys, >= 50, stay exact above it).
            # Refitted toys, ~5x dearer, start below the 80 % quantile of exact pilot toys.
            floor = None
            if maxima[index].size >= 1_000 or index in pilots:
                quantile = 0.95 if maxima[index].size >= 1_000 else 0.8
                level = min(float(np.quantile(maxima[index], quantile)), self.statistic)
                floor = level * (1 - 2 * TIE_TOLERANCE)
            task = (self.spectra[index], missing, self.generators[index], self.sampler, floor)
            tasks.append((index, task))
        for (index, _), (more, generator) in zip(
            tasks, self.pool.map([task for _, task in tasks]), strict=True
        ):
            self.generators[index] = generator
            maxima[index] = np.concatenate([maxima[index], more])

    def estimates(self) -> list[TailEstimate]:
        """P(T_s >= T_obs) of every spectrum from its toys so far."""
        return [
            tail_probability(m, self.statistic, s.n_windows)
            for m, s in zip(self.maxima, self.spectra, strict=True)
        ]


def _is_refitted(spectrum: NestedSpectrum) -> bool:
    """Whether any of the spectrum's points refits its pseudo-data (`core.pseudodata`)."""
    return any(refit is not None for refit in spectrum.refits)


def _adaptive_tails(
    toys: _SpectrumToys,
    min_pseudo_scans: int,
    max_pseudo_scans: int,
    target_rel_error: float,
    combine: Callable[[Sequence[TailEstimate]], tuple[float, float]],
) -> tuple[list[TailEstimate], float, float]:
    """(tails, p, error) after the adaptive toy budget (module docstring).

    Every spectrum gets `min_pseudo_scans`; when p < 0.01 at least 10 000, except a
    refitted spectrum (toys ~5x dearer) that holds under 5 % of the sum of q_s or whose
    tail the budget cannot count; then, until p is known to `target_rel_error`, the
    spectra that dominate p double their toys, the extrapolated ones first, up to
    `max_pseudo_scans`. A spectrum whose q_s the budget cannot count
    (q_s * `max_pseudo_scans` < `DIRECT_MIN_REACHING`) stays extrapolated whatever its toys:
    more of them only move the reference level, not the error, so it gets none.
    """
    n_spectra = len(toys.spectra)
    maxima = toys.maxima
    toys.extend(dict.fromkeys(range(n_spectra), min_pseudo_scans))
    tails = toys.estimates()
    p, error = combine(tails)

    def dominant(index: int) -> bool:
        return tails[index].q >= 0.05 * (sum(t.q for t in tails) or 1.0)

    def countable(index: int) -> bool:
        return tails[index].q * max_pseudo_scans >= DIRECT_MIN_REACHING

    if p < SMALL_P:
        toys.extend(
            {
                index: max(MIN_TOYS_SMALL_P, min_pseudo_scans)
                for index in range(n_spectra)
                if not _is_refitted(toys.spectra[index]) or (dominant(index) and countable(index))
            }
        )
        tails = toys.estimates()
        p, error = combine(tails)
    while True:
        growing = [
            i
            for i, t in enumerate(tails)
            if dominant(i) and countable(i) and maxima[i].size < max_pseudo_scans
        ]
        candidates = [i for i in growing if tails[i].method != "toys"]
        if not candidates and not (p > 0 and error <= target_rel_error * p):
            candidates = growing
        if not candidates:
            break
        toys.extend({index: min(2 * maxima[index].size, max_pseudo_scans) for index in candidates})
        tails = toys.estimates()
        p, error = combine(tails)
    return tails, p, error


def _global_method(tails: Sequence[TailEstimate], joint_reaching: int) -> tuple[str, bool]:
    """How the global p was measured, and whether it is an upper limit (Z a lower limit).

    p is a limit when no joint pseudo-scan reaches T_obs and Bonferroni bounds carry most of
    it; a bound below the extrapolation only makes p larger than the truth (conservative).
    """
    methods = [t.method for t in tails]
    bounded = [m == "bonferroni bound" for m in methods]
    n_extrapolated = methods.count("extrapolated")
    bounded_share = sum(t.q for t, b in zip(tails, bounded, strict=True) if b)
    is_limit = joint_reaching == 0 and bounded_share > 0.5 * sum(t.q for t in tails)
    if all(m in ("toys", "no excess") for m in methods):
        return "toys", is_limit
    if is_limit:
        return "bonferroni bound", is_limit
    return (
        f"toys + extrapolated tails in {n_extrapolated} of {len(tails)} spectra"
        + (f", bonferroni bound in {sum(bounded)}" if any(bounded) else "")
    ), is_limit


def _toy_maxima_task(
    task: tuple[NestedSpectrum, int, np.random.Generator, Sampler, float | None],
) -> tuple[FloatArray, np.random.Generator]:
    """One spectrum's next toy maxima and its advanced random stream (runs in a worker)."""
    spectrum, n_toys, generator, sampler, floor = task
    return spectrum_toy_maxima(spectrum, n_toys, generator, sampler=sampler, floor=floor), generator


class ToyPool:
    """Runs per-spectrum toy tasks in this process, or in `workers` processes (spawned once).

    Processes are started with "spawn" (not fork: the caller may hold threads, as a Ray
    worker does) and only when there is more than one task to share.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> ToyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def map(
        self, tasks: list[tuple[NestedSpectrum, int, np.random.Generator, Sampler, float | None]]
    ) -> list[tuple[FloatArray, np.random.Generator]]:
        """Results of `_toy_maxima_task` for every task, in order."""
        if self.workers == 1 or len(tasks) < 2:
            return [_toy_maxima_task(task) for task in tasks]
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context
            )
        # largest first, so that the last task to finish is a short one
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i][1] * tasks[i][0].counts.size)
        results = list(self._executor.map(_toy_maxima_task, [tasks[i] for i in order]))
        output: list[tuple[FloatArray, np.random.Generator]] = [results[0]] * len(tasks)
        for position, index in enumerate(order):
            output[index] = results[position]
        return output


def _with_widths(
    spectrum: NestedSpectrum, width_min: int | None, width_max: int | None
) -> NestedSpectrum:
    windows = []
    errors = spectrum.uncertainties or (None,) * len(spectrum.windows)
    for point, current in enumerate(spectrum.windows):
        options = HuntOptions(
            width_min=current.widths[0] if width_min is None else width_min,
            width_max=width_max,
            min_window_background=current.min_background,
            min_window_count=current.min_count,
        )
        windows.append(
            options.windows(spectrum.background[point], *(errors[point] or (None, None)))
        )
    return NestedSpectrum(
        spectrum.name,
        spectrum.edges,
        spectrum.cross_sections_pb,
        spectrum.counts,
        spectrum.background,
        tuple(windows),
        spectrum.merged,
        spectrum.background_nesting_violations,
        spectrum.data_nesting_violations,
        spectrum.uncertainties,
        spectrum.refits,
    )


@dataclass(frozen=True, eq=False)
class ScanPoint:
    """One spectrum at one AR point, as the per-spectrum search left it.

    `edges` (GeV, n + 1) and `counts`, `background` (n) cover histogram bins
    [first_bin, first_bin + n) of the spectrum's common binning; `hunt` is the window set
    the per-spectrum hunt used, so the scan-wide test scans the same windows. `jacobian`
    (n, n_params: d mu / d parameters, zero outside the fit range, `core.fit.
    background_jacobian`), `covariance` (the fit's, n_params x n_params) and `fitted` (n,
    the bins the likelihood used) describe the fit: `jacobian` and `covariance` fold the
    background uncertainty into the windows' tails as the per-spectrum hunt did (None:
    exact background); with `jacobian` and `fitted` the pseudo-scans refit each toy to
    first order (`core.pseudodata`), without them they are scanned against the fixed
    background (and the result's method says so). `replicas` (n_replicas, n) are
    Poisson-bootstrap replicas of the point's counts (`core.bootstrap`), for the spectra's
    correlation (`correlation_from_points`).
    """

    spectrum: str
    cross_section_pb: float
    first_bin: int
    edges: FloatArray
    counts: FloatArray
    background: FloatArray
    hunt: HuntOptions = DEFAULT_HUNT
    jacobian: FloatArray | None = None
    covariance: FloatArray | None = None
    fitted: BoolArray | None = None
    replicas: FloatArray | None = None

    def refit(self) -> RefitProjection | None:
        """The point's linearised refit of pseudo-data, or None without a jacobian."""
        if self.jacobian is None or self.fitted is None:
            return None
        try:
            return refit_projection(self.jacobian, self.background, self.fitted)
        except InvalidInputError as error:
            raise InvalidInputError(
                f"spectrum {self.spectrum!r} at {self.cross_section_pb:g} pb: {error}"
            ) from error


def spectra_from_points(points: Sequence[ScanPoint]) -> list[NestedSpectrum]:
    """Group scan points by spectrum over the union of their ranges (B = 0 outside each).

    Raises InvalidInputError when the points of one spectrum disagree on the bin edges.
    """
    grouped: dict[str, list[ScanPoint]] = {}
    for point in points:
        grouped.setdefault(point.spectrum, []).append(point)
    spectra = []
    for name, members in grouped.items():
        first = min(p.first_bin for p in members)
        stop = max(p.first_bin + p.counts.size for p in members)
        edges = np.full(stop - first + 1, np.nan)
        counts = np.zeros((len(members), stop - first))
        background = np.zeros((len(members), stop - first))
        errors: list[tuple[FloatArray, FloatArray] | None] = []
        for index, point in enumerate(members):
            size = point.counts.size
            if point.edges.shape != (size + 1,) or point.background.shape != (size,):
                raise InvalidInputError(
                    f"spectrum {name!r} at {point.cross_section_pb:g} pb: expected {size + 1} "
                    f"edges and {size} background values for {size} counts, found "
                    f"{point.edges.shape} and {point.background.shape}"
                )
            start = point.first_bin - first
            known = edges[start : start + size + 1]
            overlap = np.isfinite(known)
            if not np.allclose(known[overlap], point.edges[overlap], rtol=1e-9, atol=0.0):
                raise InvalidInputError(
                    f"spectrum {name!r}: the points disagree on the bin edges at bins from "
                    f"{point.first_bin}; give every point of a spectrum the same binning"
                )
            edges[start : start + size + 1] = point.edges
            counts[index, start : start + size] = point.counts
            background[index, start : start + size] = point.background
            errors.append(_padded_uncertainty(point, start, stop - first))
        if not np.all(np.isfinite(edges)):
            raise InvalidInputError(
                f"spectrum {name!r}: the points' ranges leave a gap in the binning; give "
                "overlapping or adjacent ranges"
            )
        spectra.append(
            nested_spectrum(
                name,
                edges,
                [p.cross_section_pb for p in members],
                counts,
                background,
                hunt=[p.hunt for p in members],
                uncertainties=errors,
                refits=[_padded_refit(p, first, stop) for p in members],
            )
        )
    return spectra


def _padded_uncertainty(
    point: ScanPoint, start: int, n_bins: int
) -> tuple[FloatArray, FloatArray] | None:
    """The point's (jacobian, covariance) with jacobian rows over the spectrum's n_bins."""
    if point.jacobian is None and point.covariance is None:
        return None
    if point.jacobian is None or point.covariance is None:
        raise InvalidInputError(
            f"spectrum {point.spectrum!r} at {point.cross_section_pb:g} pb: give both the "
            "background's jacobian and covariance, or neither"
        )
    size = point.counts.size
    if point.jacobian.ndim != 2 or point.jacobian.shape[0] != size:
        raise InvalidInputError(
            f"spectrum {point.spectrum!r} at {point.cross_section_pb:g} pb: expected a "
            f"jacobian with {size} rows (one per bin), found shape {point.jacobian.shape}"
        )
    rows = np.zeros((n_bins, point.jacobian.shape[1]))
    rows[start : start + size] = point.jacobian
    return rows, np.asarray(point.covariance, dtype=np.float64)


def _padded_refit(point: ScanPoint, first: int, stop: int) -> RefitProjection | None:
    """The point's refit projection over the spectrum's union of bins [first, stop)."""
    refit = point.refit()
    if refit is None:
        return None
    start = point.first_bin - first
    size = point.counts.size
    fitted = np.zeros(stop - first, dtype=bool)
    fitted[start : start + size] = refit.fitted
    matrix = np.zeros((stop - first, refit.matrix.shape[1]))
    matrix[start : start + size] = refit.matrix
    return RefitProjection(fitted, matrix)


def correlation_from_points(
    spectra: Sequence[NestedSpectrum], points: Sequence[ScanPoint]
) -> FloatArray | None:
    """`bootstrap_correlation` of `spectra` (from `spectra_from_points(points)`), or None.

    None when a point kept in the spectra has no `replicas` or the replica counts differ.
    """
    by_key = {(p.spectrum, p.cross_section_pb): p for p in points}
    scores: list[FloatArray] = []
    for spectrum in spectra:
        first = min(p.first_bin for p in points if p.spectrum == spectrum.name)
        stacked = np.zeros((0, *spectrum.counts.shape))
        for index, sigma in enumerate(spectrum.cross_sections_pb):
            point = by_key[(spectrum.name, float(sigma))]
            if point.replicas is None or point.replicas.shape[1:] != point.counts.shape:
                return None
            if index == 0:
                stacked = np.zeros((point.replicas.shape[0], *spectrum.counts.shape))
            if point.replicas.shape[0] != stacked.shape[0]:
                return None
            start = point.first_bin - first
            stacked[:, index, start : start + point.counts.size] = point.replicas
        if scores and stacked.shape[0] != scores[0].size:
            return None
        # one spectrum's dense replicas at a time (all at once: 0.1 GB at 300k events,
        # growing with the luminosity)
        scores.append(_replica_scores(spectrum, stacked))
    return _scores_correlation(spectra, scores)
