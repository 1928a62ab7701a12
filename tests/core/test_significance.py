"""Z <-> p far in the tails, the Asimov significance, the AE gain and the Gaussian signal fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammainc

from core import significance
from core.errors import FitDidNotConvergeError, InvalidInputError
from core.masses import mass_resolution
from core.significance import (
    ae_gain_percent,
    expected_significance,
    gaussian_bin_fractions,
    log_p_from_z,
    p_from_z,
    signal_fit,
    z_from_log_p,
    z_from_p,
)

mpmath = pytest.importorskip("mpmath")

EDGES = np.linspace(1000.0, 3000.0, 41)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])
BACKGROUND = 5000.0 * np.exp(-(CENTRES - 1000.0) / 400.0)


def test_z_and_p_are_exact_up_to_z_8_and_beyond() -> None:
    # mpmath at 30 digits is the reference; tolerance 1e-12 relative.
    for z in (0.5, 2.0, 5.0, 8.0, 12.0, 30.0):
        exact = float(mpmath.ncdf(-z))
        assert float(p_from_z(z)) == pytest.approx(exact, rel=1e-12)
        assert float(z_from_p(exact)) == pytest.approx(z, rel=1e-12)
    assert float(z_from_p(0.0013498980316300946)) == pytest.approx(3.0, rel=1e-12)


def test_log_space_conversions_survive_underflow() -> None:
    # p = exp(-1000) underflows a double; Z from ln p stays exact (round trip 1e-12).
    z = float(z_from_log_p(-1000.0))
    assert math.isfinite(z)
    assert z > 40
    assert float(log_p_from_z(z)) == pytest.approx(-1000.0, rel=1e-12)
    assert float(z_from_log_p(math.log(0.02275013194817921))) == pytest.approx(2.0, rel=1e-10)


def test_probability_limits_map_to_infinite_significance() -> None:
    assert float(z_from_p(0.0)) == math.inf
    assert float(z_from_p(1.0)) == -math.inf
    assert float(z_from_p(0.5)) == 0.0


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.5])
def test_z_from_p_rejects_non_probabilities(bad: float) -> None:
    with pytest.raises(InvalidInputError, match="probabilities"):
        z_from_p(bad)


def test_log_and_inverse_conversions_reject_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="ln p <= 0"):
        z_from_log_p(0.5)
    with pytest.raises(InvalidInputError, match="NaN"):
        p_from_z(math.nan)
    with pytest.raises(InvalidInputError, match="NaN"):
        log_p_from_z(math.nan)


def test_expected_significance_formula_and_small_signal_limit() -> None:
    s, b = 50.0, 100.0
    direct = math.sqrt(2 * ((s + b) * math.log(1 + s / b) - s))
    assert float(expected_significance(s, b)) == pytest.approx(direct, rel=1e-14)
    # s << b: Z -> s / sqrt(b) (relative correction ~ s/(6b)); series is used below 1e-4.
    assert float(expected_significance(1e-3, 1e4)) == pytest.approx(1e-5, rel=1e-7)
    below = float(expected_significance(0.99999e-4 * 1e6, 1e6))
    above = float(expected_significance(1.00001e-4 * 1e6, 1e6))
    assert above / below == pytest.approx(1.00001 / 0.99999, rel=1e-8)


def test_expected_significance_rejects_bad_counts() -> None:
    with pytest.raises(InvalidInputError, match="s >= 0"):
        expected_significance(-1.0, 10.0)
    with pytest.raises(InvalidInputError, match="b > 0"):
        expected_significance(1.0, 0.0)
    with pytest.raises(InvalidInputError, match="b > 0"):
        expected_significance(1.0, math.nan)


def test_ae_gain_and_resolution() -> None:
    assert ae_gain_percent(3.0, 2.0) == pytest.approx(50.0)
    assert ae_gain_percent(1.0, 2.0) == pytest.approx(-50.0)
    with pytest.raises(InvalidInputError, match="Z \\(without AE\\) > 0"):
        ae_gain_percent(1.0, 0.0)
    assert mass_resolution(1000.0) == pytest.approx(1000 * math.sqrt(0.84**2 / 1000 + 0.016**2))
    with pytest.raises(InvalidInputError, match="mass > 0"):
        mass_resolution(0.0)


def test_gaussian_bin_fractions_sum_to_one_and_keep_tail_precision() -> None:
    edges = np.linspace(-20.0, 20.0, 81)
    fractions = gaussian_bin_fractions(edges, 0.0, 1.0)
    assert fractions.sum() == pytest.approx(1.0, abs=1e-15)
    # The bin [10, 10.5] sigma: exact mpmath value, relative 1e-10 (a CDF difference loses it).
    exact = float(mpmath.ncdf(10.5) - mpmath.ncdf(10.0))
    assert fractions[60] == pytest.approx(exact, rel=1e-10)


def _asimov_q0(signal: np.ndarray, background: np.ndarray) -> float:
    return float(np.sum(expected_significance(signal, background) ** 2))


def test_signal_fit_recovers_asimov_yield_and_likelihood_ratio() -> None:
    # Asimov data n = b + s g: s_hat = s and q0 = sum_i Z_Asimov(s_i, b_i)^2 exactly.
    mass, width, true_yield = 1800.0, 60.0, 400.0
    signal = true_yield * gaussian_bin_fractions(EDGES, mass, width)
    result = signal_fit(BACKGROUND + signal, BACKGROUND, EDGES, mass, width)
    assert result.signal_yield == pytest.approx(true_yield, rel=1e-3)
    assert result.q0 == pytest.approx(_asimov_q0(signal, BACKGROUND), rel=1e-3)
    assert result.local_z == pytest.approx(math.sqrt(result.q0))
    assert result.local_p == pytest.approx(float(p_from_z(result.local_z)))
    assert result.background_scale == 1.0
    assert result.signal_fraction_in_range == pytest.approx(1.0, abs=1e-9)
    # Hesse error of s for a known background: 1 / sqrt(sum g^2 / (b + s g)).
    g = gaussian_bin_fractions(EDGES, mass, width)
    expected_error = 1.0 / math.sqrt(float(np.sum(g**2 / (BACKGROUND + signal))))
    assert result.signal_yield_error == pytest.approx(expected_error, rel=0.02)


def test_floating_background_normalisation_absorbs_a_scale() -> None:
    # Data = 1.2 x background, no signal: mu_b -> 1.2, s -> 0, q0 -> 0.
    result = signal_fit(
        1.2 * BACKGROUND, BACKGROUND, EDGES, 2000.0, 60.0, background_normalisation="floating"
    )
    assert result.background_scale == pytest.approx(1.2, rel=1e-4)
    assert abs(result.signal_yield) < 0.05 * result.signal_yield_error
    assert result.q0 < 1e-4
    assert result.background_scale_error > 0


def test_signal_fit_pulls_on_poisson_toys() -> None:
    # 120 seeded toys with 300 injected events: pull mean 0 +- 0.3, width 1 +- 0.25.
    rng = np.random.default_rng(11)
    mass, width, true_yield = 1800.0, 60.0, 300.0
    expected = BACKGROUND + true_yield * gaussian_bin_fractions(EDGES, mass, width)
    pulls = []
    for _ in range(120):
        counts = rng.poisson(expected).astype(float)
        result = signal_fit(counts, BACKGROUND, EDGES, mass, width)
        pulls.append((result.signal_yield - true_yield) / result.signal_yield_error)
    assert abs(np.mean(pulls)) < 0.3
    assert 0.75 < np.std(pulls) < 1.25


def test_signal_fit_background_only_false_positive_rate() -> None:
    # Background-only toys: P(local p < 0.05) = 0.05; 200 toys, 3 sigma band [0.004, 0.096].
    rng = np.random.default_rng(12)
    small = 0
    for _ in range(200):
        counts = rng.poisson(BACKGROUND).astype(float)
        result = signal_fit(counts, BACKGROUND, EDGES, 2200.0, 60.0)
        small += result.local_p < 0.05
        if result.signal_yield <= 0:
            assert result.q0 == 0.0
    assert 0.004 <= small / 200 <= 0.096


def test_signal_fit_skips_empty_background_bins() -> None:
    background = BACKGROUND.copy()
    background[:5] = 0.0
    counts = background.copy()
    result = signal_fit(counts, background, EDGES, 2000.0, 60.0)
    assert result.n_bins_fitted == EDGES.size - 1 - 5


@pytest.mark.parametrize(
    ("counts", "background", "edges", "match"),
    [
        (BACKGROUND[:-1], BACKGROUND, EDGES, "same length"),
        (np.where(CENTRES > 2000, np.nan, BACKGROUND), BACKGROUND, EDGES, "NaN"),
        (BACKGROUND, -BACKGROUND, EDGES, "background must be >= 0"),
        (BACKGROUND, np.where(CENTRES > 2900, 0.0, BACKGROUND), EDGES, "zero where data exist"),
        (-BACKGROUND, BACKGROUND, EDGES, "counts must be >= 0"),
        (BACKGROUND, BACKGROUND, EDGES[::-1], "increase strictly"),
        (np.zeros(40), np.zeros(40), EDGES, "zero in every bin"),
    ],
)
def test_signal_fit_rejects_bad_histograms(
    counts: np.ndarray, background: np.ndarray, edges: np.ndarray, match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        signal_fit(counts, background, edges, 2000.0, 60.0)


def test_signal_fit_rejects_bad_signal_parameters() -> None:
    with pytest.raises(InvalidInputError, match="outside the histogram"):
        signal_fit(BACKGROUND, BACKGROUND, EDGES, 5000.0, 60.0)
    with pytest.raises(InvalidInputError, match="width must be > 0"):
        signal_fit(BACKGROUND, BACKGROUND, EDGES, 2000.0, 0.0)
    with pytest.raises(InvalidInputError, match="'fixed' or 'floating'"):
        signal_fit(BACKGROUND, BACKGROUND, EDGES, 2000.0, 60.0, background_normalisation="free")  # type: ignore[arg-type]
    background = np.where(CENTRES < 2000, BACKGROUND, 0.0)
    counts = background.copy()
    with pytest.raises(InvalidInputError, match="no events in the bins"):
        signal_fit(counts, background, EDGES, 2990.0, 0.5)


def test_signal_fit_reports_non_convergence(monkeypatch: pytest.MonkeyPatch) -> None:
    class NeverValid(significance.Minuit):  # type: ignore[misc,name-defined]
        @property
        def valid(self) -> bool:
            return False

    monkeypatch.setattr(significance, "Minuit", NeverValid)
    with pytest.raises(FitDidNotConvergeError, match="no valid minimum"):
        signal_fit(BACKGROUND, BACKGROUND, EDGES, 2000.0, 60.0)


def test_gammainc_is_the_poisson_tail() -> None:
    # The identity the bump hunt relies on: P(n >= k | B) = P(k, B) (regularised lower gamma).
    b, k = 7.3, 12
    tail = 1.0 - sum(math.exp(-b) * b**j / math.factorial(j) for j in range(k))
    assert float(gammainc(k, b)) == pytest.approx(tail, rel=1e-12)
