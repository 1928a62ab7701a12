"""bench/validate_scan.py's statistics: the uniformity summary on the null, the signal ranks,
the window Z of the AE gain (checked against scipy.stats, not the scan's code)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from core.masses import SPECTRUM_NAMES, mass_bin_edges
from core.synth import SignalSpec

_PATH = Path(__file__).resolve().parents[2] / "bench" / "validate_scan.py"
_SPEC = importlib.util.spec_from_file_location("validate_scan", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
validate_scan = importlib.util.module_from_spec(_SPEC)
sys.modules["validate_scan"] = validate_scan
_SPEC.loader.exec_module(validate_scan)


def test_uniform_p_values_meet_the_goals_and_piled_up_ones_do_not():
    """Null true: 20 p values at the uniform quantiles pass the KS test and every goal; the
    failure the goals exist for (p piled up near 1, the old envelope sampler, or near 0)
    fails the KS test and the median goal."""
    n = 20
    uniform = ((np.arange(n) + 0.5) / n).tolist()
    summary = validate_scan.background_summary(uniform, stats.norm.isf(uniform).tolist())
    assert summary["ks_p_value"] > 0.9
    assert summary["median_ok"]
    assert summary["fraction_below_0_05_ok"]
    assert summary["max_z_ok"]
    piled_at_one = [0.9 + 0.1 * q for q in uniform]
    summary = validate_scan.background_summary(piled_at_one, [0.0] * n)
    assert summary["ks_p_value"] < 1e-6
    assert not summary["median_ok"]
    anticonservative = [0.02 * q for q in uniform]
    summary = validate_scan.background_summary(
        anticonservative, stats.norm.isf(anticonservative).tolist()
    )
    assert not summary["fraction_below_0_05_ok"]
    assert not summary["max_z_ok"]


def test_goal_miss_rates_of_a_calibrated_p():
    """The median goal 0.35-0.65 is missed by a uniform p in ~29 % of 10-sample sets: the
    median of 10 uniforms has sd ~0.14 (binomial check: 20k sets, error 0.3 %); Z > 3 in
    1 - (1 - 1.35e-3)^10 = 1.3 %."""
    rates = validate_scan.null_miss_rates(10)
    assert 0.26 < rates["median_ok"] < 0.32
    assert abs(rates["max_z_ok"] - (1 - (1 - stats.norm.sf(3.0)) ** 10)) < 0.004
    assert abs(rates["fraction_below_0_05_ok"] - stats.binom.sf(1, 10, 0.05)) < 0.006


def _excess(spectrum, low, high, local_z):
    return {"spectrum": spectrum, "window_gev": [low, high], "local_z": local_z}


A = SignalSpec("jm", 1500.0, 30.0, n_events=20)
B = SignalSpec("bm", 4000.0, 80.0, n_events=20)


def test_one_signal_seen_in_two_streams_counts_once():
    distinct = [
        _excess("T3/jm", 1445, 1565, 9.0),
        _excess("T2/jm", 1445, 1565, 8.0),
        _excess("T2/bm", 3800, 4200, 6.0),
        _excess("T5/jg", 900, 1000, 5.0),
    ]
    (rank_a, best_a), (rank_b, best_b) = validate_scan.injected_ranks((A, B), distinct)
    assert (rank_a, rank_b) == (1, 2)
    assert best_a is distinct[0]
    assert best_b is distinct[2]


def test_a_fluctuation_between_two_signals_pushes_the_second_out_of_the_top_two():
    distinct = [
        _excess("T3/jm", 1445, 1565, 9.0),
        _excess("T5/jg", 900, 1000, 7.0),
        _excess("T2/bm", 3800, 4200, 6.0),
        _excess("T2/jm", 800, 900, 5.5),  # the pair of A, far from its mass: not A
    ]
    ranks = [rank for rank, _ in validate_scan.injected_ranks((A, B), distinct)]
    assert ranks == [1, 3]
    assert validate_scan.injected_ranks((B,), distinct)[0][0] == 3
    assert validate_scan.injected_ranks((SignalSpec("bb", 2e3, 1.0, n_events=1),), distinct) == [
        (None, None)
    ]


@pytest.mark.parametrize(("data", "background"), [(25, 3.5), (3, 4.0), (0, 2.0)])
def test_window_z_is_the_poisson_tail_of_the_window(tmp_path, data, background):
    """Z of a window = Phi^-1(1 - P(n >= D | B)) summed over its bins (scipy's Poisson)."""
    edges = np.asarray(mass_bin_edges())
    counts = np.zeros((len(SPECTRUM_NAMES), len(edges) - 1))
    expected = np.full_like(counts, 10.0)
    k = SPECTRUM_NAMES.index("T2/jm")
    first = int(np.searchsorted(edges, 1400.0))
    counts[k, first : first + 3] = [data // 3, data // 3, data - 2 * (data // 3)]
    expected[k, first : first + 3] = background / 3
    path = tmp_path / "point.npz"
    np.savez(path, edges=edges, counts=counts, background=expected)
    window = [float(edges[first]), float(edges[first + 3])]
    result = validate_scan.window_counts(path, "T2/jm", window)
    assert result["data"] == data
    assert result["background"] == pytest.approx(background)
    p = stats.poisson.sf(data - 1, background)
    assert result["z"] == pytest.approx(stats.norm.isf(p), rel=1e-9, abs=1e-9)
    expected[k, first] = np.nan
    np.savez(path, edges=edges, counts=counts, background=expected)
    assert validate_scan.window_counts(path, "T2/jm", window)["z"] is None


def test_rate_interval_covers_the_rate_at_small_counts():
    """0 of 10 below 0.05 still allows a rate up to ~16 % (68 % Clopper-Pearson), 1 of 2
    anything from ~8 % to ~92 %: no symmetric +- that goes below 0 or says nothing."""
    summary = validate_scan.background_summary([0.5] * 10, [0.0] * 10)
    low, high = summary["fraction_p_below_0_05_interval"]
    assert low == 0.0
    assert 0.15 < high < 0.17
    low, high = validate_scan.background_summary([0.01, 0.9], [2.3, 0.0])[
        "fraction_p_below_0_05_interval"
    ]
    assert 0.07 < low < 0.09
    assert 0.91 < high < 0.93
