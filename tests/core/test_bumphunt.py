"""BumpHunter: Poisson tails, thresholds, tables, pyBumpHunter conventions, toys and errors."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from scipy.special import gammainc
from scipy.stats import kstest, norm

from core.bumphunt import (
    MIN_WINDOW_COUNT,
    adaptive_toy_p_value,
    bump_hunt,
    fixed_toys_reaching,
    most_significant_window,
    poisson_tail_statistic,
    scan_windows,
    tabulate_poisson_tails,
    tail_thresholds,
    toy_cumulative_counts,
    toy_statistics,
    toys_reaching,
    window_thresholds,
)
from core.errors import InvalidInputError
from core.significance import p_from_z, z_from_log_p

mpmath = pytest.importorskip("mpmath")

EDGES = np.linspace(500.0, 1500.0, 101)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])
SHAPE = np.exp(-(CENTRES - 500.0) / 300.0)
BACKGROUND = 1e5 * SHAPE / SHAPE.sum()


def _bump(n_events: float, centre: float, sigma: float) -> np.ndarray:
    shape = np.exp(-0.5 * ((CENTRES - centre) / sigma) ** 2)
    return np.asarray(n_events * shape / shape.sum())


# ---------------------------------------------------------------------------- tails


def test_tail_statistic_is_minus_log_regularised_gamma() -> None:
    rng = np.random.default_rng(1)
    b = 10 ** rng.uniform(-1, 6, 500)
    k = np.floor(b + rng.uniform(-3, 6, 500) * np.sqrt(b))
    statistic = poisson_tail_statistic(k, b)
    excess = k > b
    assert np.allclose(statistic[excess], -np.log(gammainc(k[excess], b[excess])), rtol=1e-13)
    assert np.all(statistic[~excess] == 0.0)


def test_tail_statistic_in_log_space_matches_mpmath() -> None:
    # Tails far below the double range (p ~ e^-3600): mpmath at 30 digits, rel 1e-9.
    mpmath.mp.dps = 30
    for k, b in [(1000.0, 10.0), (2000.0, 500.0), (5.9e4, 5e4), (1.04e6, 1e6)]:
        exact = -float(mpmath.log(mpmath.gammainc(k, 0, b, regularized=True)))
        assert float(poisson_tail_statistic(k, b)) == pytest.approx(exact, rel=1e-9)


def test_tail_statistic_of_empty_background() -> None:
    assert float(poisson_tail_statistic(1.0, 0.0)) == math.inf
    assert float(poisson_tail_statistic(0.0, 0.0)) == 0.0


def test_tabulated_tails_equal_scipy_gammainc() -> None:
    # Tables from the pmf recurrence equal -ln gammainc to 1e-9 relative, across 8 decades of B.
    rng = np.random.default_rng(2)
    b = 10 ** rng.uniform(-1, 7, 300)
    first = np.floor(b - 2 * np.sqrt(b)).clip(0) + 1
    table = tabulate_poisson_tails(b, first, 400)
    counts = first[:, None] + np.arange(400)[None, :]
    p = gammainc(counts, b[:, None])
    regular = p > 1e-280
    reference = np.where(counts > b[:, None], -np.log(np.where(regular, p, 1.0)), 0.0)
    assert np.allclose(table[regular], reference[regular], rtol=1e-9, atol=1e-12)
    exact_tail = poisson_tail_statistic(
        counts[~regular], np.broadcast_to(b[:, None], counts.shape)[~regular]
    )
    assert np.array_equal(table[~regular], exact_tail)


def test_tabulate_rejects_bad_shapes() -> None:
    with pytest.raises(InvalidInputError, match="equal length"):
        tabulate_poisson_tails([1.0, 2.0], [1.0], 3)
    with pytest.raises(InvalidInputError, match="n_counts >= 1"):
        tabulate_poisson_tails([1.0], [1.0], 0)


@pytest.mark.parametrize("t_min", [1e-3, 0.7, 4.0, 20.0, 200.0, 900.0])
def test_thresholds_are_the_smallest_counts_reaching_t(t_min: float) -> None:
    rng = np.random.default_rng(3)
    b = np.concatenate([[0.0, 1e-9, 0.5, 1.0], 10 ** rng.uniform(-2, 7, 400)])
    k = tail_thresholds(b, t_min)
    assert np.all(poisson_tail_statistic(k, b) >= t_min)
    assert np.all(poisson_tail_statistic(k - 1, b) < t_min)


def test_thresholds_need_positive_t() -> None:
    with pytest.raises(InvalidInputError, match="t_min > 0"):
        tail_thresholds([1.0], 0.0)


# ----------------------------------------------------------- pyBumpHunter conventions


def _pybumphunter_scan(
    data: np.ndarray, background: np.ndarray, width_min: int, width_max: int
) -> tuple[float, int, int]:
    pybumphunter = pytest.importorskip("pyBumpHunter")
    hunter = pybumphunter.BumpHunter1D(
        width_min=width_min, width_max=width_max, npe=2, bins=EDGES, nworker=1, seed=0
    )
    with contextlib.redirect_stdout(io.StringIO()):
        hunter.bump_scan(data, background, is_hist=True)
    return float(hunter.min_Pval_ar[0]), int(hunter.min_loc_ar[0]), int(hunter.min_width_ar[0])


@pytest.mark.parametrize(("width_min", "width_max"), [(1, 50), (2, 50), (3, 7)])
def test_local_p_and_window_equal_pybumphunter(width_min: int, width_max: int) -> None:
    # Same counts: same window and local p to 1e-9 (pyBumpHunter's own gammainc), with a
    # deficit region and empty background at both ends (its scan range is trimmed likewise).
    rng = np.random.default_rng(4)
    background = BACKGROUND.copy()
    background[:3] = 0.0
    background[-2:] = 0.0
    expected = background + _bump(300, 1000.0, 15.0) - _bump(300, 700.0, 15.0).clip(max=0)
    expected[30:35] *= 0.9
    data = rng.poisson(expected).astype(float)
    p_ref, first_ref, width_ref = _pybumphunter_scan(data, background, width_min, width_max)
    ours = most_significant_window(data, background, EDGES, width_min, width_max)
    assert ours.local_p == pytest.approx(p_ref, rel=1e-9)
    assert (ours.first_bin, ours.stop_bin - ours.first_bin) == (first_ref, width_ref)
    assert ours.mass_low == EDGES[first_ref]
    # pyBumpHunter's Z = norm.ppf(1 - p); equal to ours (-ndtri(p)) to 1e-9 at these p.
    assert ours.local_z == pytest.approx(float(norm.ppf(1 - p_ref)), rel=1e-9)


def test_pure_deficit_has_no_bump() -> None:
    data = np.floor(0.8 * BACKGROUND)
    result = bump_hunt(data, BACKGROUND, EDGES, seed=1)
    assert result.statistic == 0.0
    assert result.local_p == 1.0
    assert result.local_z == 0.0
    assert (result.global_p, result.n_toys, result.global_z) == (1.0, 0, 0.0)


def test_non_integer_data_use_the_continuous_gamma() -> None:
    data = BACKGROUND.copy()
    data[40] += 0.37 + 5 * math.sqrt(BACKGROUND[40])
    result = most_significant_window(data, BACKGROUND, EDGES, 1, 1)
    assert result.statistic == pytest.approx(-math.log(gammainc(data[40], BACKGROUND[40])))


# ------------------------------------------------------------------------------ toys


def test_injected_bump_is_found_in_the_right_window() -> None:
    # 600 events (sigma 2 bins) at 1000 GeV over 1e5 background: the window covers the peak
    # and lies within +-3 sigma of it; the global p is small, so >= 10 000 toys were drawn.
    rng = np.random.default_rng(5)
    data = rng.poisson(BACKGROUND + _bump(600, 1000.0, 20.0)).astype(float)
    result = bump_hunt(data, BACKGROUND, EDGES, width_max=20, min_toys=1000, seed=6)
    assert result.mass_low <= 1000.0 <= result.mass_high
    assert result.mass_low >= 940.0
    assert result.mass_high <= 1060.0
    assert result.global_p < 0.01
    # Either >= 10 000 toys were drawn or no toy budget could resolve p (Bonferroni bound).
    assert result.n_toys >= 10_000 or (
        result.global_p_method == "bonferroni bound" and result.global_p * 100_000 < 1
    )
    assert result.global_z > 2.5
    assert result.local_z > result.global_z


def test_toy_table_statistics_agree_with_threshold_counting() -> None:
    # Same seed, one batch: the tabulated toy t distribution counts exactly the toys that
    # the integer thresholds count (two independent code paths, same draws).
    rng = np.random.default_rng(7)
    data = rng.poisson(BACKGROUND + _bump(250, 900.0, 20.0)).astype(float)
    result = bump_hunt(data, BACKGROUND, EDGES, width_max=30, min_toys=3000, max_toys=3000, seed=8)
    windows = scan_windows(BACKGROUND, 1, 30)
    statistics = toy_statistics(windows, 3000, 8)
    assert result.n_toys == 3000
    assert int(np.count_nonzero(statistics >= result.statistic)) == result.n_toys_reaching
    assert np.all(statistics >= 0)


@pytest.mark.parametrize(
    ("total", "width_min", "width_max", "min_background", "t_min"),
    [
        (3000.0, 2, 30, 0.0, 6.0),  # 16-bit sums
        (3000.0, 1, None, 50.0, 4.0),  # inactive windows: saturated thresholds
        (1e5, 1, 50, 0.0, 8.0),  # 32-bit sums
        (1e5, 3, 20, 0.0, 1e4),  # thresholds beyond the 16/32-bit range of the counts
    ],
)
def test_fixed_toys_reaching_equals_toys_reaching(
    total: float, width_min: int, width_max: int | None, min_background: float, t_min: float
) -> None:
    # The bins x toys comparison in the narrowest integer type flags exactly the toys that
    # `toys_reaching` flags on the same draws (int64 thresholds, several chunks of toys).
    background = total * SHAPE / SHAPE.sum()
    windows = scan_windows(background, width_min, width_max, min_background)
    thresholds = window_thresholds(windows, t_min, np.int64)
    toys = np.random.default_rng(11).poisson(background, size=(9000, background.size))
    cumulative = toy_cumulative_counts(windows, 9000, np.random.default_rng(11))
    expected = toys_reaching(windows, window_thresholds(windows, t_min), cumulative)
    found = fixed_toys_reaching(windows, thresholds, toys)
    np.testing.assert_array_equal(found, expected)
    assert 0 < np.count_nonzero(found) < found.size or t_min > 100


def test_global_p_of_background_only_data_is_uniform() -> None:
    # 300 background-only pseudo-data: global p uniform (KS p > 0.01), while a 20 % bias
    # (p -> 0.8 p) of the same values is rejected (KS p < 1e-3): the test has the power.
    rng = np.random.default_rng(9)
    edges = np.linspace(0.0, 20.0, 21)
    background = 40.0 * np.exp(-np.linspace(0.0, 1.5, 20))
    p_values = []
    for index in range(300):
        data = rng.poisson(background).astype(float)
        result = bump_hunt(
            data, background, edges, width_max=6, min_toys=400, target_rel_error=0.15, seed=index
        )
        p_values.append(result.global_p)
        if result.global_p < 0.01:
            assert result.n_toys >= 10_000
    p = np.array(p_values)
    assert kstest(p, "uniform").pvalue > 0.01
    assert kstest(0.8 * p, "uniform").pvalue < 1e-3


def test_same_seed_same_result_and_seed_matters() -> None:
    rng = np.random.default_rng(10)
    data = rng.poisson(BACKGROUND + _bump(200, 800.0, 20.0)).astype(float)
    first = bump_hunt(data, BACKGROUND, EDGES, width_max=10, seed=3)
    again = bump_hunt(data, BACKGROUND, EDGES, width_max=10, seed=np.random.default_rng(3))
    other = bump_hunt(data, BACKGROUND, EDGES, width_max=10, seed=4)
    assert first == again
    assert (first.n_toys, first.n_toys_reaching) != (other.n_toys, other.n_toys_reaching)


def test_no_toy_reaching_gives_a_lower_limit_on_z() -> None:
    data = BACKGROUND.copy()
    data[50] = 1000.0 + BACKGROUND[50]
    data = np.floor(data)
    result = bump_hunt(data, BACKGROUND, EDGES, width_max=5, min_toys=500, max_toys=500, seed=1)
    assert result.local_p == 0.0 or result.local_z > 30
    assert math.isfinite(result.local_z)
    # No toy budget resolves it: the Bonferroni bound n_windows e^-t is the upper limit on p.
    assert result.global_p_method == "bonferroni bound"
    assert result.n_toys == 0
    assert result.global_z_is_lower_limit
    bound_z = float(z_from_log_p(math.log(result.n_windows) - result.statistic))
    assert result.global_z == pytest.approx(bound_z, rel=1e-12)
    assert result.global_z > 25


def test_no_toy_reaching_at_a_moderate_excess_gives_the_toy_lower_limit() -> None:
    # A local Z ~ 5.4 excess, widths up to 40: the Bonferroni bound (~1e-4) is above
    # 1 / 10 000, so toys run, none of 10 000 reaches it: Z >= Phi^-1(1 - 1e-4), a lower limit.
    data = np.floor(BACKGROUND.copy())
    data[50] = np.floor(BACKGROUND[50] + 5.6 * math.sqrt(BACKGROUND[50]))
    result = bump_hunt(data, BACKGROUND, EDGES, width_max=40, min_toys=500, max_toys=500, seed=1)
    assert result.global_p_method == "toys"
    assert result.n_toys == 10_000  # p < 0.01 overrides max_toys
    assert result.n_toys_reaching == 0
    assert result.global_z_is_lower_limit
    assert result.global_z >= 3.719 - 1e-3  # Phi^-1(1 - 1e-4) at least
    assert not result.converged
    # p is the matching upper limit (below 1 / n_toys), never a "p = 0"
    assert 0.0 < result.global_p <= 1.0 / result.n_toys
    assert result.global_p == pytest.approx(float(p_from_z(result.global_z)), rel=1e-9)


def test_huge_bin_contents_and_toy_budgets_are_bounded() -> None:
    # A bin content of 1e20 used to loop forever in the threshold bisection: now refused, and
    # the bisection itself terminates above 2^53 where float steps exceed 1.
    data = BACKGROUND.copy()
    data[3] = 1e20
    with pytest.raises(InvalidInputError, match="supported"):
        bump_hunt(data, BACKGROUND, EDGES, seed=1)
    thresholds = tail_thresholds(np.array([1e20, 3e17, 5.0]), 30.0)
    assert thresholds[0] == 2**62  # saturated: no int64 count reaches it
    assert thresholds[1] > 3e17
    assert thresholds[2] == tail_thresholds(np.array([5.0]), 30.0)[0]
    with pytest.raises(InvalidInputError, match="fewer toys"):
        bump_hunt(BACKGROUND, BACKGROUND, EDGES, max_toys=10**12)


def test_adaptive_stopping_reaches_the_target_error() -> None:
    # A synthetic toy source with p = 0.3: stops once sqrt((1-p)/k) < 0.05, near n = 933.
    rng = np.random.default_rng(11)
    result = adaptive_toy_p_value(
        lambda n: int(np.count_nonzero(rng.random(n) < 0.3)),
        min_toys=100,
        max_toys=10**6,
        target_rel_error=0.05,
        batch_cap=50,
    )
    assert result.converged
    assert math.sqrt((1 - result.p_value) / result.n_reaching) < 0.05
    assert result.n_toys < 1400
    assert result.p_value == pytest.approx(0.3, abs=0.05)
    assert result.error == pytest.approx(math.sqrt(0.3 * 0.7 / result.n_toys), rel=0.2)


def test_adaptive_needs_ten_thousand_toys_below_one_percent() -> None:
    rng = np.random.default_rng(12)
    result = adaptive_toy_p_value(
        lambda n: int(np.count_nonzero(rng.random(n) < 0.003)),
        min_toys=100,
        max_toys=1000,
        target_rel_error=0.5,
        batch_cap=10**6,
    )
    assert result.n_toys >= 10_000
    assert result.p_value < 0.01


@pytest.mark.parametrize(("p_true", "stops_at"), [(0.0, 10_000), (2e-4, 10_000), (0.02, None)])
def test_adaptive_stops_when_the_target_is_out_of_reach(
    p_true: float, stops_at: int | None
) -> None:
    # max_toys 1e5 holds 1/0.1^2 = 100 reaching toys only for p >= 1e-3: below, the 10 000
    # toys that decide p < 0.01 are all; above, the target is met as before.
    rng = np.random.default_rng(14)
    result = adaptive_toy_p_value(
        lambda n: int(np.count_nonzero(rng.random(n) < p_true)),
        min_toys=1000,
        max_toys=100_000,
        target_rel_error=0.1,
        batch_cap=10**6,
    )
    if stops_at is None:
        assert result.converged
        assert result.p_value == pytest.approx(p_true, rel=0.35)
    else:
        assert result.n_toys == stops_at
        assert not result.converged
        assert result.p_value < 1e-3


def test_fixed_number_of_toys() -> None:
    rng = np.random.default_rng(13)
    data = rng.poisson(BACKGROUND).astype(float)
    result = bump_hunt(data, BACKGROUND, EDGES, width_max=10, min_toys=700, max_toys=700, seed=2)
    if result.global_p >= 0.01:
        assert result.n_toys == 700


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_toys": 0}, "1 <= min_toys <= max_toys"),
        ({"min_toys": 10, "max_toys": 5}, "1 <= min_toys <= max_toys"),
        ({"target_rel_error": 0.0}, "target_rel_error"),
        ({"target_rel_error": 1.5}, "target_rel_error"),
    ],
)
def test_bad_toy_settings_raise(kwargs: dict[str, float], match: str) -> None:
    data = np.floor(BACKGROUND * 1.1)
    with pytest.raises(InvalidInputError, match=match):
        bump_hunt(data, BACKGROUND, EDGES, **kwargs)  # type: ignore[arg-type]


def test_toy_statistics_needs_toys() -> None:
    with pytest.raises(InvalidInputError, match="n_toys >= 1"):
        toy_statistics(scan_windows(BACKGROUND), 0, 1)


# ------------------------------------------------------------------------ bad input


def _with(values: np.ndarray, index: int, value: float) -> np.ndarray:
    changed = values.copy()
    changed[index] = value
    return changed


DATA = np.floor(BACKGROUND)


@pytest.mark.parametrize(
    ("counts", "background", "edges", "kwargs", "match"),
    [
        (DATA[:-1], BACKGROUND, EDGES, {}, "same \\(non-zero\\) length"),
        (DATA, BACKGROUND, EDGES[:-1], {}, "bin edges"),
        (DATA, BACKGROUND, EDGES[::-1], {}, "strictly increasing"),
        (DATA, BACKGROUND, _with(EDGES, 3, math.nan), {}, "NaN or infinite at edges \\[3\\]"),
        (_with(DATA, 3, math.nan), BACKGROUND, EDGES, {}, "NaN"),
        (DATA, _with(BACKGROUND, 3, math.nan), EDGES, {}, "NaN"),
        (DATA, _with(BACKGROUND, 3, math.inf), EDGES, {}, "infinite"),
        (_with(DATA, 3, -1.0), BACKGROUND, EDGES, {}, "data counts must be >= 0"),
        (DATA, _with(BACKGROUND, 3, -1.0), EDGES, {}, "background must be >= 0"),
        (_with(DATA, 3, 5.0), _with(BACKGROUND, 3, 0.0), EDGES, {}, "zero where data exist"),
        (np.zeros(100), np.zeros(100), EDGES, {}, "zero in every bin"),
        (DATA, BACKGROUND, EDGES, {"width_max": 101}, "larger than the histogram"),
        (DATA, BACKGROUND, EDGES, {"width_min": 0}, "1 <= width_min"),
        (DATA, BACKGROUND, EDGES, {"width_min": 5, "width_max": 4}, "width_min <= width_max"),
    ],
)
def test_bad_spectra_raise(
    counts: np.ndarray,
    background: np.ndarray,
    edges: np.ndarray,
    kwargs: dict[str, int],
    match: str,
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        bump_hunt(counts, background, edges, **kwargs)


def test_scan_range_narrower_than_the_smallest_window() -> None:
    background = np.zeros(100)
    background[10:13] = 5.0
    data = np.zeros(100)
    with pytest.raises(InvalidInputError, match="fewer than width_min=4"):
        bump_hunt(data, background, EDGES, width_min=4, width_max=10)


def test_scan_windows_rejects_bad_background() -> None:
    with pytest.raises(InvalidInputError, match="finite expected counts"):
        scan_windows(np.array([1.0, math.nan]))


def test_sparse_tail_windows_can_not_claim_a_discovery() -> None:
    # Issue 11: 1 event on B = 3e-7 gave local Z 5.0. Every window with B > 0 is scanned,
    # but a window is a candidate only with >= MIN_WINDOW_COUNT = 5 events (data and toys
    # alike), so 1-2 events on a tiny B claim nothing.
    edges = np.linspace(1000.0, 2000.0, 21)
    background = np.geomspace(50.0, 3e-7, 20)
    data = np.round(background)
    data[-1] = 1.0
    data[-4] = 2.0
    unprotected = bump_hunt(data, background, edges, min_window_count=0, seed=1)
    assert unprotected.local_z > 4.5
    result = bump_hunt(data, background, edges, seed=1)
    assert result.min_window_count == MIN_WINDOW_COUNT
    assert result.data >= MIN_WINDOW_COUNT
    assert result.local_z < 1.5
    assert result.global_p > 0.1
    assert scan_windows(background).n_windows == sum(
        s.size for s in scan_windows(background).background_sums
    )
    windows = scan_windows(background, min_background=1.0)
    assert windows.n_windows < sum(s.size for s in windows.background_sums)
