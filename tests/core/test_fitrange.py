"""The fit range (core.fitrange): the fixed upper mass and the turn-on rule, in seeded toys.

Why the rule is what it is (measured with these toys; 200 seeded toys per case, binomial
error of a rate r is sqrt(r (1 - r) / 200), 0.7 % at r = 99 %):

- Start. Before the issue 11 review the start was one bin past the densest bin anywhere in
  the range: a small T3/jm spectrum in an anomaly region (175 events, ~30 of an X(1500) in
  the 1484-1524 GeV bin, a slowly falling background whose first bin holds ~5-10 events)
  started at 1524 GeV, 169 events fell below the start and the signal's local Z went from
  9.45 to 0.08. With the turn-on walk: (a, d) a sculpted spectrum (p3 times a logistic
  efficiency at 650 GeV, width 40 GeV; density top at 680 GeV) starts from one bin before
  to three bins past the top in 100 % of toys at 3000 events, 95.5 % at 300, 84.5 % at 100
  (the rest one or two bins further from the flat top); it stays at the stream's start in
  0 / 200 toys at 300 and 3000 events, 1 / 200 at 100. (b) a falling p3 spectrum of 300,
  3000 or 1e5 events with a signal of 30 events or more (5 local sigma at 1e5),
  resolution-wide, log-uniform in 400-4000 GeV: the signal's bin is inside in 100 %, the
  start is the stream's in 100 %; the reviewer's shape (150 background events, first bins
  ~10 events, a 30-event signal of 8 GeV width from 434 GeV up): inside in 98.5 % (the
  densest-bin rule: 82.5 %), and with the signal at 1504 GeV as in the review, 100 %
  (densest-bin rule: 85.5 %). (c) the sculpted spectrum with that signal four bins or more
  above its top: the signal's bin is inside in 99.5 % at 300 events and 100 % at 3000, the
  start no earlier than one bin before the top in 98.5 % and 100 %. The limit: in the
  reviewer's shape with masses from 400 GeV every miss was 5-7 bins above the start.
- End. The range used to end at the last non-empty bin: one isolated event at 11-12 TeV
  stretched it by ~15 bins that expect ~1e-4 events, and the data, non-empty in that last
  bin by construction, gained ~27 in deviance that no toy reproduces (1e6-event p4: D 121.5
  for 137 ndf and toy p 0.31 with the stretched range, D 94.2 for 122 ndf and toy p 0.91
  with the fixed one; core.robustness has the rest of the goodness-of-fit diagnosis).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from core.errors import InvalidInputError
from core.fit import fit_background
from core.fitfunctions import bin_integrals, get_function
from core.fitrange import default_upper_edge, fit_range, last_non_empty_edge
from tests.spectra import (
    EDGES,
    PLATEAU_STREAM_START,
    SHAPES,
    expected_counts,
    plateau_expected,
)


def _falling_toy(n_events: float, seed: int) -> np.ndarray:
    mu = bin_integrals(get_function("p3"), np.array([0.0, 10.0, -4.5]), EDGES)
    mu[: int(np.searchsorted(EDGES, 300.0))] = 0.0
    return np.random.default_rng(seed).poisson(mu * n_events / mu.sum()).astype(float)


def test_an_isolated_event_at_12_tev_does_not_move_the_range_end():
    counts = _falling_toy(1e5, seed=3)
    before = fit_range(EDGES, counts, 300.0)
    counts[np.searchsorted(EDGES, 12000.0) - 1] += 1
    after = fit_range(EDGES, counts, 300.0)
    assert after.stop_bin == before.stop_bin and after.hi_gev == before.hi_gev
    assert after.hi_gev == pytest.approx(default_upper_edge(EDGES, 13000.0))
    assert after.n_above == before.n_above + 1 and "not fitted" in after.reason
    # a range that ends at the last non-empty bin would have reached 12 TeV
    assert last_non_empty_edge(EDGES, counts) > 12000.0
    assert before.first_bin == before.floor_bin and before.turn_on_bin is None


def test_the_range_starts_past_the_turn_on_of_a_sculpted_spectrum():
    counts = _falling_toy(1e5, seed=4)
    centres = 0.5 * (EDGES[:-1] + EDGES[1:])
    # an anomaly cut that keeps few events below ~700 GeV: a turn-on peaking near 700 GeV
    efficiency = 1.0 / (1.0 + np.exp(-(centres - 650.0) / 40.0))
    sculpted = np.random.default_rng(5).binomial(counts.astype(int), efficiency).astype(float)
    chosen = fit_range(EDGES, sculpted, 300.0)
    density = sculpted / np.diff(EDGES)
    peak = int(np.argmax(density))
    assert chosen.turn_on_bin == peak and chosen.first_bin == peak + 1
    assert chosen.lo_gev > 600.0 and "turn-on" in chosen.reason
    assert chosen.floor_bin == int(np.searchsorted(EDGES, 300.0 * (1 - 1e-12)))
    # past the start the spectrum falls: a p3 fit from there describes it
    fit = fit_background(EDGES, sculpted, "p3", chosen.bounds)
    assert fit.p_value > 0.01


def test_fit_range_rejects_a_range_without_bins_or_events():
    counts = _falling_toy(1e3, seed=6)
    with pytest.raises(InvalidInputError, match="fewer than"):
        fit_range(EDGES, counts, 300.0, upper_gev=400.0)
    with pytest.raises(InvalidInputError, match="zero"):
        fit_range(EDGES, np.where(EDGES[:-1] > 9000.0, 1.0, 0.0), 300.0)


# Turn-on rule (core.fitrange module docstring): seeded toys of the four cases of the rule.
_CENTRES = 0.5 * (EDGES[:-1] + EDGES[1:])
_WIDTHS = np.diff(EDGES)
_FLOOR = int(np.searchsorted(EDGES, 300.0 * (1 - 1e-12)))
_TOYS = 200


def _falling_shape(n_events: float, shape: tuple[float, float] = (10.0, -4.5)) -> np.ndarray:
    mu = bin_integrals(get_function("p3"), np.array([0.0, *shape]), EDGES)
    mu[:_FLOOR] = 0.0
    return mu * n_events / mu.sum()


def _sculpted_shape(n_events: float) -> tuple[np.ndarray, int]:
    """The falling shape times an AE-like efficiency (logistic, 650 GeV, width 40 GeV)."""
    mu = _falling_shape(1.0) / (1.0 + np.exp(-(_CENTRES - 650.0) / 40.0))
    top = int(np.argmax(mu / _WIDTHS))
    return mu * n_events / mu.sum(), top


def _signal(n_events: float, mass: float, sigma: float | None = None) -> np.ndarray:
    width = mass * np.sqrt(0.84**2 / mass + 0.016**2) if sigma is None else sigma
    return n_events * np.diff(special.ndtr((EDGES - mass) / width))


def _bin_of(mass: float) -> int:
    return int(np.searchsorted(EDGES, mass, side="right")) - 1


@pytest.mark.parametrize(("n_events", "min_rate"), [(100, 0.78), (300, 0.9), (3000, 0.97)])
def test_turn_on_of_a_sculpted_spectrum_is_found_in_toys(n_events, min_rate):
    """(a), (d): the start lands from one bin before to three bins past the density top."""
    mu, top = _sculpted_shape(n_events)
    rng = np.random.default_rng(11)
    starts = np.array(
        [fit_range(EDGES, rng.poisson(mu).astype(float), 300.0).first_bin for _ in range(_TOYS)]
    )
    rate = np.mean((starts >= top - 1) & (starts <= top + 3))
    assert rate >= min_rate, (rate, np.bincount(starts - _FLOOR))
    # never at the stream's start when the turn-on is real and a few hundred events show it
    if n_events >= 300:
        assert np.mean(starts == _FLOOR) <= 0.02


@pytest.mark.parametrize(
    ("n_background", "shape", "sigma", "low_bin"),
    [
        (300, (10.0, -4.5), None, 0),
        (3000, (10.0, -4.5), None, 0),
        (100000, (10.0, -4.5), None, 0),
        # the reviewer's shape: a slow fall whose first bins hold ~10 events, a narrow signal
        (150, (40.0, -0.5), 8.0, 7),
    ],
)
def test_a_narrow_signal_on_a_falling_spectrum_never_sets_the_start(
    n_background, shape, sigma, low_bin
):
    """(b): a signal of 5 local sigma or more stays in the range in >= 99 % of toys.

    Masses log-uniform up to 4000 GeV from 400 GeV, or from `low_bin` bins above the
    stream's start (a signal within ~2 windows of the start is the documented limit).
    """
    rng = np.random.default_rng(12)
    n_signal = max(30.0, 5.0 * np.sqrt(0.01 * n_background))
    low = max(400.0, EDGES[_FLOOR + low_bin])
    inside = at_floor = 0
    for _ in range(_TOYS):
        mass = float(np.exp(rng.uniform(np.log(low), np.log(4000.0))))
        mu = _falling_shape(n_background, shape) + _signal(n_signal, mass, sigma)
        chosen = fit_range(EDGES, rng.poisson(mu).astype(float), 300.0)
        inside += chosen.first_bin <= _bin_of(mass)
        at_floor += chosen.first_bin == chosen.floor_bin
    # 200 toys: a true rate of 99 % gives 196 or more with probability 0.95
    assert inside >= 0.99 * _TOYS - 2
    assert at_floor >= 0.95 * _TOYS


@pytest.mark.parametrize("n_events", [300, 3000])
def test_a_signal_above_a_turn_on_stays_in_the_range(n_events):
    """(c): the start is past the turn-on and the signal's bin inside the range in >= 99 %."""
    mu, top = _sculpted_shape(n_events)
    rng = np.random.default_rng(13)
    n_signal = max(30.0, 5.0 * np.sqrt(0.01 * n_events))
    inside = past = 0
    for _ in range(_TOYS):
        mass = float(np.exp(rng.uniform(np.log(_CENTRES[top + 4]), np.log(4000.0))))
        counts = rng.poisson(mu + _signal(n_signal, mass)).astype(float)
        chosen = fit_range(EDGES, counts, 300.0)
        inside += chosen.first_bin <= _bin_of(mass)
        past += chosen.first_bin >= top - 1
    assert inside >= 0.99 * _TOYS - 2
    assert past >= 0.9 * _TOYS


def test_reviewer_case_small_falling_spectrum_with_a_1500_gev_signal_keeps_it():
    """A T3/jm-like anomaly-region spectrum: ~150 falling events from 300 GeV, ~30 in 1484-1524.

    The previous rule (start one bin past the densest bin when it beats the first bin by
    2 sigma) started at 1524 GeV here and left the signal below the range.
    """
    mu = _falling_shape(145.0, (40.0, -0.5)) + _signal(32.0, 1504.0, sigma=8.0)
    counts = np.random.default_rng(35).poisson(mu).astype(float)
    signal_bin = _bin_of(1504.0)
    assert 170 <= counts[_FLOOR:].sum() <= 190 and 25 <= counts[signal_bin] <= 35
    # the case the old rule failed on: the densest bin is the signal's, > 2 sigma over bin one
    density = counts / _WIDTHS
    densest = _FLOOR + int(np.argmax(density[_FLOOR:]))
    error = np.sqrt(counts[densest] / _WIDTHS[densest] ** 2 + counts[_FLOOR] / _WIDTHS[_FLOOR] ** 2)
    assert densest == signal_bin and (density[densest] - density[_FLOOR]) / error > 2.0
    chosen = fit_range(EDGES, counts, 300.0)
    assert chosen.first_bin == chosen.floor_bin and chosen.turn_on_bin is None
    assert chosen.first_bin <= signal_bin - 10
    assert counts[chosen.first_bin : chosen.stop_bin].sum() == counts[_FLOOR:].sum()
    # and in toys of that shape the signal's bin stays inside the range in >= 99 %
    rng = np.random.default_rng(14)
    starts = [
        fit_range(EDGES, rng.poisson(mu).astype(float), 300.0).first_bin for _ in range(_TOYS)
    ]
    assert np.sum(np.array(starts) <= signal_bin) >= 0.99 * _TOYS - 2


# Plateau rule (issue 23): multi-jet thresholds sculpt a plateau that only starts to fall
# well above the stream's start; the fit starts at its knee, not inside it.


@pytest.mark.parametrize("n_events", [1e4, 4e4])
def test_the_fit_starts_at_the_knee_of_a_plateau(n_events):
    """The plateau of tests.spectra (flat counts 520-900 GeV, a dip at 780 GeV, stream start
    600 GeV): the start lands at the knee, 848-934 GeV, in >= 9 of 10 seeds (measured 29 and
    30 of 30 at 876 GeV; the previous rule started every one at the stream's 621 GeV)."""
    mu = plateau_expected(n_events)
    at_knee = 0
    for seed in range(10):
        chosen = fit_range(EDGES, np.random.default_rng(seed).poisson(mu), PLATEAU_STREAM_START)
        at_knee += 848.0 <= chosen.lo_gev <= 934.0
        if chosen.lo_gev > 621.0 and chosen.turn_on_bin is None:
            assert f"plateau from 621 up to {chosen.lo_gev:.0f} GeV" in chosen.reason
            assert f"fit starts at {chosen.lo_gev:.0f} GeV" in chosen.reason
    assert at_knee >= 9


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_knee_rule_leaves_falling_spectra_alone(name):
    """The tests.spectra shapes (p3 to p5, UA2; p5 falls by only 0.89 per window at 300 GeV,
    as slowly as a plateau) at 3000 and 1e5 events: the start stays at the stream's in 20 of
    20 toys (measured over every spectrum of this module, 4400 toys: 5 starts changed)."""
    rng = np.random.default_rng(21)
    for n_events in (3000, 1e5):
        mu = expected_counts(name, n_events)
        for _ in range(20):
            chosen = fit_range(EDGES, rng.poisson(mu).astype(float), 300.0)
            assert chosen.first_bin == _FLOOR, chosen.reason
