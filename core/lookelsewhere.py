"""Scan-wide look-elsewhere effect: one global p over all spectra and anomaly-region points.

Method. The statistic of a scan is T = max t over every spectrum s, every anomaly-region
(AR) point a and every BumpHunter window (t = -ln p_local, `core.bumphunt`). Its global
p-value is the fraction of background-only pseudo-scans with T_toy >= T_obs, counted with
adaptive toys (the same stopping rules as `core.bumphunt.bump_hunt`).

A pseudo-scan respects how the AR points are correlated. The events of a tighter AR
(smaller effective cross-section) are a subset of those of a looser one, so for each
spectrum the toy counts are drawn from the tightest point outwards: n_tightest ~
Poisson(B_tightest), then n_looser = n_tighter + Poisson(B_looser - B_tighter), independent
increments (counts of disjoint score slices of a Poisson process are independent). Each
point's toy is then scanned against that point's own background. If fitted backgrounds are
not nested (B_looser < B_tighter in a bin), the increment uses the envelope max(B) over the
tighter points: toys then fluctuate up at least as much as the background predicts, which
can only raise T_toy, so the global p is conservative; the number of such bins is reported.

Different spectra are drawn independently. Spectra of one stream share events (every mass
of an event) and streams overlap. All counts are sums of independent Poisson counts of
elementary cells of phase space and every spectrum's max t increases with them, so the
per-spectrum maxima are associated (Harris-FKG): P(all T_s < t) >= prod_s P(T_s < t).
Drawing the spectra independently therefore over-estimates P(T >= t): conservative.

Effective trials factor. With p_local = exp(-T_obs), N_eff = ln(1 - p_global) /
ln(1 - p_local): the number of independent tests that would give the same global p. It is
reported when 0 < p_global < 1 (None when no pseudo-scan reached T_obs, or when p_global
is 1). No Gross-Vitells up-crossing extrapolation: toys are exact at the levels that
matter (a few sigma global) and need no asymptotic assumption. The tests check the method
on background-only pseudo-scans: its p is uniform (not anti-conservative), the local p
is not.

Not modelled: the statistical uncertainty of the fitted backgrounds, and the fixed event
count of an AR (multinomial, not Poisson, counts); both are inputs of the background fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.bumphunt import (
    LocalExcess,
    ScanWindows,
    ToyPValue,
    adaptive_toy_p_value,
    best_window,
    global_significance,
    scan_windows,
    significance_from_statistic,
    toys_reaching,
    window_thresholds,
)
from core.errors import InvalidInputError
from core.significance import validate_spectrum

FloatArray = npt.NDArray[np.float64]

METHOD = (
    "background-only pseudo-scans; per spectrum, nested Poisson increments from the tightest "
    "AR point outwards; spectra independent (conservative); global p = fraction with "
    "max t >= observed; N_eff = ln(1 - p_global) / ln(1 - p_local)"
)

_ENTRIES_PER_BATCH = 2_000_000


@dataclass(frozen=True)
class NestedSpectrum:
    """One spectrum at its AR points, loosest (largest cross-section, pb) first.

    `counts` and `background` have shape (n_points, n_bins); `edges` (n_bins + 1,) in GeV.
    `background_envelope` is the running maximum from the tightest point, used for toys.
    """

    name: str
    edges: FloatArray
    cross_sections_pb: FloatArray
    counts: FloatArray
    background: FloatArray
    background_envelope: FloatArray
    nesting_violations: int


def nested_spectrum(
    name: str,
    edges: npt.ArrayLike,
    cross_sections_pb: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
) -> NestedSpectrum:
    """Validate and order one spectrum's AR points (any order in; loosest first out).

    Data must be nested: a tighter AR (smaller cross-section) can not hold more events in a
    bin than a looser one. Raises InvalidInputError otherwise, and for bad histograms.
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
    for point in range(sigma.size):
        try:
            validate_spectrum(n[point], b[point], e)
        except InvalidInputError as error:
            raise InvalidInputError(f"spectrum {name!r} at {sigma[point]:g} pb: {error}") from error
    order = np.argsort(-sigma, kind="stable")
    sigma, n, b = sigma[order], n[order], b[order]
    excess = n[1:] > n[:-1] + 1e-9
    if np.any(excess):
        point, bin_index = (int(i) for i in np.argwhere(excess)[0])
        raise InvalidInputError(
            f"spectrum {name!r}: the AR at {sigma[point + 1]:g} pb has {n[point + 1, bin_index]:g} "
            f"events in bin {bin_index}, more than the looser AR at {sigma[point]:g} pb "
            f"({n[point, bin_index]:g}); tighter ARs must be subsets of looser ones"
        )
    envelope = np.maximum.accumulate(b[::-1], axis=0)[::-1]
    violations = int(np.count_nonzero(envelope > b * (1.0 + 1e-12)))
    return NestedSpectrum(name, e, sigma, n, b, envelope, violations)


def nested_pseudo_counts(
    spectrum: NestedSpectrum, n_toys: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Background-only toy counts (n_points, n_toys, n_bins), nested from the tightest AR."""
    envelope = spectrum.background_envelope
    increments = envelope - np.concatenate([envelope[1:], np.zeros_like(envelope[:1])])
    draws = rng.poisson(
        np.maximum(increments, 0.0)[:, None, :], size=(envelope.shape[0], n_toys, envelope.shape[1])
    )
    return np.asarray(np.cumsum(draws[::-1], axis=0)[::-1], dtype=np.int64)


@dataclass(frozen=True)
class ScanPointExcess:
    """The best BumpHunter window of one spectrum at one AR point."""

    spectrum: str
    cross_section_pb: float
    excess: LocalExcess


@dataclass(frozen=True)
class ScanSignificance:
    """Scan-wide result: the largest local excess and its global p over the whole scan."""

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


def effective_trials(global_p: float, local_p: float) -> float | None:
    """N_eff = ln(1 - p_global) / ln(1 - p_local), or None where it is undefined."""
    if not (0.0 < global_p < 1.0 and 0.0 < local_p < 1.0):
        return None
    return math.log1p(-global_p) / math.log1p(-local_p)


def _cumulative(windows: ScanWindows, toys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    inside = toys[:, windows.first_bin : windows.stop_bin]
    cumulative = np.zeros((inside.shape[0], inside.shape[1] + 1), dtype=np.int64)
    np.cumsum(inside, axis=1, out=cumulative[:, 1:])
    return cumulative


def scan_significance(
    spectra: Sequence[NestedSpectrum],
    *,
    width_min: int = 1,
    width_max: int | None = None,
    min_pseudo_scans: int = 1_000,
    max_pseudo_scans: int = 100_000,
    target_rel_error: float = 0.1,
    seed: int | np.random.Generator = 0,
) -> ScanSignificance:
    """Global significance of the largest excess over all spectra and AR points of a scan.

    Widths in bins (default 1..N/2 of each spectrum). See the module docstring for the
    method; `seed` fixes the pseudo-scans.
    """
    if not spectra:
        raise InvalidInputError("scan_significance needs at least one spectrum")
    names = [s.name for s in spectra]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"spectrum names must be unique, found {names}")
    windows: list[list[ScanWindows]] = []
    points: list[ScanPointExcess] = []
    for spectrum in spectra:
        per_point = []
        for point, sigma in enumerate(spectrum.cross_sections_pb):
            point_windows = scan_windows(spectrum.background[point], width_min, width_max)
            per_point.append(point_windows)
            excess = best_window(point_windows, spectrum.counts[point], spectrum.edges)
            points.append(ScanPointExcess(spectrum.name, float(sigma), excess))
        windows.append(per_point)
    ranked = tuple(sorted(points, key=lambda p: -p.excess.statistic))
    best = ranked[0]
    statistic = best.excess.statistic
    local_p, local_z = significance_from_statistic(statistic)
    n_windows = sum(w.n_windows for per_point in windows for w in per_point)
    violations = sum(s.nesting_violations for s in spectra)

    toy_p = ToyPValue(1.0, 0.0, 0, 0, True)
    if statistic > 0:
        rng = np.random.default_rng(seed)
        thresholds = [[window_thresholds(w, statistic) for w in per_point] for per_point in windows]
        largest = max(s.counts.size for s in spectra)

        def count_batch(size: int) -> int:
            reached = np.zeros(size, dtype=bool)
            for spectrum, per_point, limits in zip(spectra, windows, thresholds, strict=True):
                toys = nested_pseudo_counts(spectrum, size, rng)
                for point, (point_windows, point_limits) in enumerate(
                    zip(per_point, limits, strict=True)
                ):
                    cumulative = _cumulative(point_windows, toys[point])
                    reached |= toys_reaching(point_windows, point_limits, cumulative)
            return int(np.count_nonzero(reached))

        toy_p = adaptive_toy_p_value(
            count_batch,
            min_toys=min_pseudo_scans,
            max_toys=max_pseudo_scans,
            target_rel_error=target_rel_error,
            batch_cap=max(1, _ENTRIES_PER_BATCH // largest),
        )
    global_z, z_limit = global_significance(toy_p)
    return ScanSignificance(
        best=best,
        points=ranked,
        statistic=statistic,
        local_p=local_p,
        local_z=local_z,
        global_p=toy_p.p_value,
        global_p_error=toy_p.error,
        global_z=global_z,
        global_z_is_lower_limit=z_limit,
        effective_trials=effective_trials(toy_p.p_value, local_p),
        n_tests=len(points),
        n_windows=n_windows,
        n_pseudo_scans=toy_p.n_toys,
        n_pseudo_scans_reaching=toy_p.n_reaching,
        converged=toy_p.converged,
        background_nesting_violations=violations,
        method=METHOD,
    )
