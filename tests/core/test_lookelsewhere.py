"""Scan-wide look-elsewhere: nested pseudo-scans, effective trials, coverage, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kstest

from core.bumphunt import HuntOptions, bump_hunt
from core.errors import InvalidInputError
from core.lookelsewhere import (
    GaussianCopula,
    NestedSpectrum,
    Sampler,
    ScanPoint,
    TailEstimate,
    bootstrap_correlation,
    correlation_from_points,
    effective_trials,
    nested_pseudo_counts,
    nested_spectrum,
    scan_significance,
    spectra_from_points,
    spectrum_toy_maxima,
    tail_probability,
)

EDGES = np.linspace(300.0, 1500.0, 25)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])
SHAPE = np.exp(-(CENTRES - 300.0) / 250.0)
SIGMAS = np.array([10.0, 3.0, 1.0])


def _backgrounds(total: float, sigmas: np.ndarray = SIGMAS) -> np.ndarray:
    """Nested expected counts (n_points, n_bins): AR yield proportional to the cross-section."""
    return np.asarray(total * (sigmas / sigmas.max())[:, None] * (SHAPE / SHAPE.sum())[None, :])


def _observed(name: str, background: np.ndarray, rng: np.random.Generator) -> NestedSpectrum:
    empty = nested_spectrum(name, EDGES, SIGMAS, np.zeros_like(background), background)
    counts = nested_pseudo_counts(empty, 1, rng)[:, 0, :].astype(float)
    return nested_spectrum(name, EDGES, SIGMAS, counts, background)


def test_nested_toys_have_the_right_means_covariance_and_nesting() -> None:
    # Mean per point = B (4 sigma of 20 000 toys); Cov(loose, tight) = B_tight (nested sums).
    background = _backgrounds(3000.0)
    spectrum = nested_spectrum("T1/jj", EDGES, SIGMAS, np.zeros_like(background), background)
    toys = nested_pseudo_counts(spectrum, 20_000, np.random.default_rng(1))
    assert toys.shape == (3, 20_000, 24)
    assert np.all(toys[1:] <= toys[:-1])
    error = np.sqrt(background / 20_000)
    assert np.all(np.abs(toys.mean(axis=1) - background) < 4 * error + 1e-9)
    covariance = np.mean(
        (toys[0, :, 0] - toys[0, :, 0].mean()) * (toys[2, :, 0] - toys[2, :, 0].mean())
    )
    assert covariance == pytest.approx(background[2, 0], rel=0.1)


def test_points_are_ordered_loosest_first_and_envelope_counts_violations() -> None:
    background = _backgrounds(1000.0)[::-1].copy()  # given tightest first
    background[2, 5] = 0.5 * background[1, 5]  # loosest below the middle point in one bin
    spectrum = nested_spectrum("T2/jm", EDGES, SIGMAS[::-1], np.zeros_like(background), background)
    assert list(spectrum.cross_sections_pb) == [10.0, 3.0, 1.0]
    assert spectrum.nesting_violations == 1
    assert spectrum.background_envelope[0, 5] == spectrum.background[1, 5]
    assert np.all(spectrum.background_envelope >= spectrum.background)


def test_effective_trials_inverts_independent_tests() -> None:
    p_local = 1e-4
    for n in (1.0, 7.0, 1234.0):
        assert effective_trials(1 - (1 - p_local) ** n, p_local) == pytest.approx(n, rel=1e-9)
    assert effective_trials(0.0, 0.1) is None
    assert effective_trials(1.0, 0.1) is None
    assert effective_trials(0.5, 0.0) is None


def test_one_spectrum_one_point_equals_the_bump_hunt() -> None:
    # The scan machinery on a single histogram is BumpHunter: global p within 4 sigma of toys.
    rng = np.random.default_rng(2)
    background = _backgrounds(5000.0)[:1]
    counts = rng.poisson(background).astype(float)
    spectrum = nested_spectrum("T3/ee", EDGES, SIGMAS[:1], counts, background)
    scan = scan_significance([spectrum], width_max=8, min_pseudo_scans=4000, seed=3)
    single = bump_hunt(counts[0], background[0], EDGES, width_max=8, min_toys=4000, seed=4)
    assert scan.statistic == single.statistic
    assert scan.best.excess == pytest.approx(scan.best.excess)
    combined_error = math.hypot(scan.global_p_error, single.global_p_error)
    assert abs(scan.global_p - single.global_p) < 4 * combined_error
    assert scan.n_tests == 1


def test_nesting_keeps_the_trials_factor_small() -> None:
    # Four AR points holding 100 %, 99 %, 98 % and 97 % of the same events: the global p is
    # close to that of one point, far below 1 - (1 - p_1)^4 for independent points.
    rng = np.random.default_rng(5)
    sigmas = np.array([1.0, 0.99, 0.98, 0.97])
    background = _backgrounds(20_000.0, sigmas)
    empty = nested_spectrum("T7/jj", EDGES, sigmas, np.zeros_like(background), background)
    counts = nested_pseudo_counts(empty, 1, rng)[:, 0, :].astype(float)
    counts[:, 12] += np.floor(3.2 * np.sqrt(background[:, 12]))
    nested = nested_spectrum("T7/jj", EDGES, sigmas, counts, background)
    one = nested_spectrum("T7/jj", EDGES, sigmas[-1:], counts[-1:], background[-1:])
    p_nested = scan_significance([nested], width_max=6, seed=6, target_rel_error=0.05)
    p_one = scan_significance([one], width_max=6, seed=7, target_rel_error=0.05)
    independent = 1 - (1 - p_one.global_p) ** 4
    assert p_nested.global_p < 0.5 * independent
    assert p_nested.global_p > 0.8 * p_one.global_p
    assert p_nested.effective_trials is not None
    assert p_one.effective_trials is not None
    assert p_nested.effective_trials < 2.0 * p_one.effective_trials


def test_scan_global_p_covers_on_background_only_pseudo_scans() -> None:
    # 200 background-only pseudo-scans (3 spectra x 3 nested AR points): the scan-wide p is
    # uniform (KS p > 0.01) and never anti-conservative: P(p <= a) <= a + 3 sigma at
    # a = 0.05, 0.1, 0.2, 0.5. The local p of the same scans is badly anti-conservative.
    rng = np.random.default_rng(8)
    backgrounds = [_backgrounds(total) for total in (500.0, 2000.0, 8000.0)]
    global_p, local_p = [], []
    for index in range(200):
        spectra = [_observed(f"T{i}/jj", b, rng) for i, b in enumerate(backgrounds)]
        result = scan_significance(
            spectra, width_max=6, min_pseudo_scans=300, target_rel_error=0.2, seed=index
        )
        global_p.append(result.global_p)
        local_p.append(result.local_p)
    p = np.array(global_p)
    assert kstest(p, "uniform").pvalue > 0.01
    for alpha in (0.05, 0.1, 0.2, 0.5):
        assert np.mean(p <= alpha) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / p.size)
    assert np.mean(np.array(local_p) <= 0.05) > 0.5


def test_chained_toys_keep_each_points_own_marginal_on_non_nested_fits() -> None:
    # Fitted backgrounds that are not nested (loosest below the middle point in every other
    # bin): every point's toy mean is its own B (4 sigma of 20 000 toys), not the envelope;
    # where the fits are nested the toys are nested; variance = mean (Poisson).
    truth = _backgrounds(3000.0)
    fitted = truth.copy()
    fitted[0, ::2] = truth[1, ::2] * 0.9
    spectrum = nested_spectrum("T1/jj", EDGES, SIGMAS, np.zeros_like(fitted), fitted)
    assert spectrum.background_nesting_violations == 12
    toys = nested_pseudo_counts(spectrum, 20_000, np.random.default_rng(9))
    error = np.sqrt(fitted / 20_000)
    assert np.all(np.abs(toys.mean(axis=1) - fitted) < 4 * error)
    assert np.allclose(toys.var(axis=1), fitted, rtol=0.1)
    assert np.all(toys[1:, :, 1::2] <= toys[:-1, :, 1::2])
    old = nested_pseudo_counts(spectrum, 20_000, np.random.default_rng(9), sampler="envelope")
    assert np.all(old.mean(axis=1)[0, ::2] > fitted[0, ::2] + 5 * error[0, ::2])


def _crossing_backgrounds(total: float) -> np.ndarray:
    """Non-nested fits: tighter points fall more slowly, so their tails cross above looser."""
    sigmas = CROSSING_SIGMAS
    slopes = np.array([120.0, 200.0, 320.0, 500.0])
    shapes = np.exp(-(CENTRES[None, :] - 300.0) / slopes[:, None])
    shapes /= shapes.sum(axis=1, keepdims=True)
    return np.asarray(total * (sigmas / sigmas.max())[:, None] * shapes)


CROSSING_SIGMAS = np.array([10.0, 3.0, 1.0, 0.3])


def _coverage(sampler: Sampler, n_scans: int) -> np.ndarray:
    rng = np.random.default_rng(21)
    backgrounds = [_crossing_backgrounds(total) for total in (3000.0, 10000.0, 30000.0)]
    values = []
    for index in range(n_scans):
        spectra = []
        for number, b in enumerate(backgrounds):
            empty = nested_spectrum(
                f"T{number}/jm", EDGES, CROSSING_SIGMAS, np.zeros_like(b), b, hunt=HUNT
            )
            observed = nested_pseudo_counts(empty, 1, rng)[:, 0, :].astype(float)
            spectra.append(
                nested_spectrum(f"T{number}/jm", EDGES, CROSSING_SIGMAS, observed, b, hunt=HUNT)
            )
        result = scan_significance(
            spectra, min_pseudo_scans=300, target_rel_error=0.3, seed=index, sampler=sampler
        )
        values.append(result.global_p)
    return np.array(values)


HUNT = HuntOptions(width_max=6)


@pytest.mark.slow
def test_scan_global_p_covers_with_non_nested_fitted_backgrounds() -> None:
    # 3 spectra x 4 AR points whose fitted tails cross (tighter above looser in 30 of 72
    # bin pairs); 200 background-only pseudo-scans drawn from the fitted marginals. The
    # chained sampler covers: P(p <= a) <= a + 3 sigma (binomial, 200 scans) at
    # a = 0.01 .. 0.5 and the median p lies in 0.3 .. 0.7. The previous envelope sampler
    # piles p up near 1 on the same scans (median > 0.7): it fails the same criterion.
    spectrum = nested_spectrum(
        "x", EDGES, CROSSING_SIGMAS, np.zeros((4, 24)), _crossing_backgrounds(3000.0)
    )
    assert spectrum.background_nesting_violations >= 20
    p = _coverage("chained", 200)
    for alpha in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5):
        assert np.mean(p <= alpha) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / p.size)
    assert 0.3 <= float(np.median(p)) <= 0.7
    old = _coverage("envelope", 60)
    assert float(np.median(old)) > 0.7


@pytest.mark.slow
def test_tail_extrapolation_agrees_with_direct_toys() -> None:
    # One spectrum at 3 points: q(t) from 2 000 toys extrapolated (Gross-Vitells law from the
    # level 20 toys reach) against 400 000 direct toys, at levels where the direct count is
    # 40-400 (q ~ 1e-4 .. 1e-3, 1.5-2.5 decades beyond the 2 000 toys). Agreement within a
    # factor 1.6 (the reference level's 22 % Poisson error at 2 sigma plus the law's bias).
    spectrum = nested_spectrum(
        "T2/jj", EDGES, SIGMAS, np.zeros((3, 24)), _backgrounds(4000.0), hunt=HUNT
    )
    direct = spectrum_toy_maxima(spectrum, 400_000, np.random.default_rng(31))
    few = spectrum_toy_maxima(spectrum, 2_000, np.random.default_rng(32))
    ordered = np.sort(direct)[::-1]
    for k in (40, 120, 400):
        level = float(ordered[k - 1])
        estimate = tail_probability(few, level, spectrum.n_windows)
        assert estimate.method == "extrapolated"
        ratio = estimate.q / (k / direct.size)
        assert 1 / 1.6 < ratio < 1.6, (k, ratio)


def test_strong_signal_is_ranked_first_with_small_global_p() -> None:
    rng = np.random.default_rng(10)
    spectra = [_observed(f"T{i}/jb", _backgrounds(4000.0), rng) for i in range(3)]
    counts = spectra[1].counts.copy()
    counts[:, 8] += 120.0 * (SIGMAS / SIGMAS.max())
    spectra[1] = nested_spectrum("T1/jb", EDGES, SIGMAS, counts, spectra[1].background)
    result = scan_significance(spectra, width_max=6, seed=11)
    assert result.best.spectrum == "T1/jb"
    assert result.best.excess.first_bin <= 8 < result.best.excess.stop_bin
    assert result.global_p < 0.01
    assert result.n_pseudo_scans >= 10_000
    assert result.points[0] == result.best
    assert [p.excess.statistic for p in result.points] == sorted(
        (p.excess.statistic for p in result.points), reverse=True
    )
    assert result.n_tests == 9
    assert result.global_z < result.local_z


def test_no_excess_anywhere_gives_p_one() -> None:
    background = _backgrounds(1000.0)
    spectrum = nested_spectrum("T4/gg", EDGES, SIGMAS, np.floor(0.5 * background), background)
    result = scan_significance([spectrum])
    assert (result.global_p, result.n_pseudo_scans, result.global_z) == (1.0, 0, 0.0)
    assert result.effective_trials is None


def test_bad_scans_raise() -> None:
    background = _backgrounds(1000.0)
    counts = np.floor(background)
    with pytest.raises(InvalidInputError, match="at least one spectrum"):
        scan_significance([])
    spectrum = nested_spectrum("a", EDGES, SIGMAS, counts, background)
    with pytest.raises(InvalidInputError, match="unique"):
        scan_significance([spectrum, spectrum])
    with pytest.raises(InvalidInputError, match="larger than the histogram"):
        scan_significance([spectrum], width_max=25)


@pytest.mark.parametrize(
    ("sigmas", "counts", "background", "match"),
    [
        (SIGMAS[:2], None, None, "n_points = 2"),
        (np.array([10.0, 3.0, 3.0]), None, None, "same cross-section"),
        (np.array([10.0, -3.0, 1.0]), None, None, "> 0 pb"),
        (np.array([[10.0, 3.0, 1.0]]), None, None, "1D list"),
        (SIGMAS, "nan", None, "at 3 pb: data counts contain NaN"),
        (SIGMAS, None, "zero", "zero where data exist"),
    ],
)
def test_bad_nested_spectra_raise(
    sigmas: np.ndarray, counts: str | None, background: str | None, match: str
) -> None:
    b = _backgrounds(1000.0)
    n = np.floor(b)
    if counts == "nan":
        n[1, 4] = math.nan
    if background == "zero":
        b[0, 4] = 0.0
        n[0, 4] = 3.0
    with pytest.raises(InvalidInputError, match=match):
        nested_spectrum("T5/gg", EDGES, sigmas, n, b)


def test_a_scan_global_z_of_four_is_measured_not_capped() -> None:
    # 8 spectra x 3 points, one excess of local Z ~ 5.6: the scan-global p (~1e-5) is far
    # below 1 / n_toys, so the dominant spectra are extrapolated; Z is a value (3.5 .. 5),
    # not a lower limit, with an error, and the toys-only limit Z(1 / n) is also given.
    rng = np.random.default_rng(41)
    spectra = [_observed(f"T{i}/jb", _backgrounds(4000.0), rng) for i in range(8)]
    counts = spectra[3].counts.copy()
    counts[:, 8] += np.array([90.0, 27.0, 9.0])
    spectra[3] = nested_spectrum("T3/jb", EDGES, SIGMAS, counts, spectra[3].background)
    result = scan_significance(spectra, width_max=6, max_pseudo_scans=40_000, seed=5)
    assert 5.0 < result.local_z < 7.0
    assert 3.5 < result.global_z < 5.5
    assert not result.global_z_is_lower_limit
    assert "extrapolated" in result.global_p_method
    assert 0 < result.global_p_error < result.global_p
    assert result.global_z_toys_lower_limit is not None
    assert result.global_z > result.global_z_toys_lower_limit


def test_scan_inputs_and_budgets_are_bounded() -> None:
    # Issue 12 item 7: a bin content of 1e20 and a budget of 1e12 pseudo-scans are refused
    # at once instead of looping or running for days.
    background = _backgrounds(1000.0)
    counts = np.floor(background)
    counts[0, 3] = 1e20
    with pytest.raises(InvalidInputError, match="supported"):
        nested_spectrum("T1/jj", EDGES, SIGMAS, counts, background)
    spectrum = nested_spectrum("T1/jj", EDGES, SIGMAS, np.floor(background), background)
    with pytest.raises(InvalidInputError, match="fewer toys"):
        scan_significance([spectrum], max_pseudo_scans=10**12)


def test_toy_maxima_above_a_floor_are_exact() -> None:
    # The floor filter (thresholds first, table look-up only for toys reaching the floor)
    # gives the same T_s above the floor as the full computation, 0 below it.
    spectrum = nested_spectrum(
        "T2/jj", EDGES, SIGMAS, np.zeros((3, 24)), _backgrounds(4000.0), hunt=HUNT
    )
    full = spectrum_toy_maxima(spectrum, 5_000, np.random.default_rng(3))
    floor = float(np.quantile(full, 0.95)) * (1 - 1e-9)
    filtered = spectrum_toy_maxima(spectrum, 5_000, np.random.default_rng(3), floor=floor)
    above = full >= floor
    assert above.sum() >= 250
    assert np.allclose(filtered[above], full[above], rtol=1e-9)
    assert np.all(filtered[~above] == 0.0)


@pytest.mark.parametrize("total", [400.0, 4000.0, 4e6])
def test_compiled_toy_maxima_equal_the_numpy_path(
    total: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compiled comparison-and-look-up loop (with tables grown on demand, and the exact
    # tail where even they are too short: the 4e6-event spectrum) against numpy alone.
    from core import lookelsewhere

    if lookelsewhere.compiled_floor_maxima() is None:
        pytest.skip("numba is not installed: only the numpy path runs")
    spectrum = nested_spectrum(
        "T2/jj", EDGES, SIGMAS, np.zeros((3, 24)), _backgrounds(total), hunt=HUNT
    )
    compiled = {
        floor: spectrum_toy_maxima(spectrum, 2_000, np.random.default_rng(5), floor=floor)
        for floor in (None, 4.0, 9.0)
    }
    monkeypatch.setattr(lookelsewhere, "compiled_floor_maxima", lambda: None)
    for floor, fast in compiled.items():
        plain = spectrum_toy_maxima(spectrum, 2_000, np.random.default_rng(5), floor=floor)
        assert np.count_nonzero(plain) >= 20
        # tables started at different counts: ~1e-8 apart at 1e6 events (TIE_TOLERANCE)
        assert np.allclose(fast, plain, rtol=1e-7, atol=0.0)


def test_the_global_p_does_not_depend_on_the_number_of_workers() -> None:
    rng = np.random.default_rng(12)
    spectra = [_observed(f"T{i}/jm", _backgrounds(3000.0), rng) for i in range(3)]
    one = scan_significance(spectra, width_max=6, seed=4, workers=1)
    two = scan_significance(spectra, width_max=6, seed=4, workers=2)
    assert one.global_p > 0
    assert (two.global_p, two.global_p_error, two.n_pseudo_scans) == (
        one.global_p,
        one.global_p_error,
        one.n_pseudo_scans,
    )
    assert two.spectrum_tails == one.spectrum_tails
    with pytest.raises(InvalidInputError, match="workers"):
        scan_significance(spectra, seed=4, workers=0)


def test_gaussian_copula_joins_identical_spectra_once_and_independent_ones_as_a_product() -> None:
    """Two spectra with q = 0.1 each: p = 0.1 when they are the same (correlation 1), and
    1 - 0.9^2 = 0.19 when independent; the union sum where the sampling cannot resolve p."""
    tails = [TailEstimate(0.1, 0.0, 1000, 100, "toys", None)] * 2
    same = GaussianCopula(np.ones((2, 2)), 2, np.random.default_rng(1))
    apart = GaussianCopula(np.eye(2), 2, np.random.default_rng(1))
    assert same(tails)[0] == pytest.approx(0.1, abs=0.003)
    assert apart(tails)[0] == pytest.approx(0.19, abs=0.003)
    tiny = [TailEstimate(1e-6, 1e-7, 1000, 0, "extrapolated", 1.0)] * 2
    assert same(tiny)[0] == pytest.approx(2e-6)
    assert "union" in same.method


def test_bootstrap_correlation_of_spectra_sharing_their_events() -> None:
    """Replicas of one event list entering two spectra correlate fully; of two lists, not."""
    background = _backgrounds(1000.0)
    spectra = [
        nested_spectrum(name, EDGES, SIGMAS[:1], background[:1], background[:1])
        for name in ("T1/jj", "T2/jj", "T3/jj")
    ]
    rng = np.random.default_rng(4)
    shared = rng.poisson(background[:1], size=(400, 1, background.shape[1]))
    other = rng.poisson(background[:1], size=(400, 1, background.shape[1]))
    correlation = bootstrap_correlation(spectra, [shared, shared, other])
    assert correlation[0, 1] == pytest.approx(1.0)
    assert abs(correlation[0, 2]) < 0.2
    with pytest.raises(InvalidInputError, match="replicas of 'T1/jj' must have shape"):
        bootstrap_correlation(spectra, [shared[:, :, :5], shared, other])


def test_correlation_from_points_aligns_replicas_with_the_kept_points() -> None:
    """Replicas enter by (spectrum, cross-section) over each spectrum's union of bins; a point
    without replicas leaves the spectra independent (None)."""
    background = _backgrounds(1000.0)
    rng = np.random.default_rng(6)
    shared = rng.poisson(background[0], size=(300, background.shape[1])).astype(float)
    points = [
        ScanPoint(name, float(SIGMAS[0]), 0, EDGES, background[0], background[0], replicas=shared)
        for name in ("T1/jj", "T2/jj")
    ]
    spectra = spectra_from_points(points)
    correlation = correlation_from_points(spectra, points)
    assert correlation is not None
    assert correlation[0, 1] == pytest.approx(1.0)
    bare = [points[0], ScanPoint("T2/jj", float(SIGMAS[0]), 0, EDGES, background[0], background[0])]
    assert correlation_from_points(spectra_from_points(bare), bare) is None
