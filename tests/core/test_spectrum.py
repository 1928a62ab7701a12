"""The per-spectrum rule: statuses, only accepted backgrounds hunted, the two halves agree;
an injected resonance is found at its mass, a background-only spectrum stays quiet."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.stats import norm

from core.background import CheckOptions
from core.bumphunt import (
    DEFAULT_HUNT,
    bonferroni_bound,
    significance_from_statistic,
    tail_statistic,
)
from core.errors import InvalidInputError
from core.masses import STREAM_FIT_FROM_GEV
from core.significance import expected_significance
from core.spectrum import (
    RESCUE_BOUND,
    STATUSES,
    analyse_spectrum,
    fallback_applies,
    rescue_refusal,
    search_spectrum,
)
from tests.spectra import (
    EDGES,
    FIT_RANGE,
    PLATEAU_STREAM_START,
    expected_counts,
    plateau_expected,
    sculpted_t7_jb,
)

DEFAULTS = CheckOptions()
"""The robustness checks' defaults (the scan's but for its GOF toys)."""


def test_clean_spectrum_is_accepted_and_both_halves_agree() -> None:
    # (seed 2 of this toy fails the toy GOF at p = 0.019: the 5 % a 5 % test rejects)
    rng = np.random.default_rng(3)
    counts = rng.poisson(expected_counts("p4", 2e4)).astype(float)
    analysis = analyse_spectrum(
        EDGES, counts, 300.0, checks=CheckOptions(), fallback=None, hunt=DEFAULT_HUNT, seed=4
    )
    assert analysis.status == "accepted", analysis.trail
    assert analysis.search is not None
    assert analysis.decision is not None
    fit = analysis.decision.fit
    assert fit is not None
    assert analysis.fit_range == fit.fit_range
    # half 2 alone, from the function name and parameters, gives the same hunt
    again = search_spectrum(
        EDGES, counts, fit.name, fit.fit_range, parameters=fit.parameters, seed=4
    )
    # the refit (and its covariance, folded into the tails) differs slightly: Z to ~2e-5
    assert again.bump.local_z == pytest.approx(analysis.search.bump.local_z, rel=1e-4)
    assert again.bump.first_bin == analysis.search.bump.first_bin
    assert analysis.search.bump.background >= 1.0


def test_a_background_that_fails_its_checks_is_not_hunted() -> None:
    # Two shapes added (a p3 and a broad bump): no function of the family describes it and
    # no fallback is given, so the status says so with every failed check and no bump.
    rng = np.random.default_rng(5)
    mu = expected_counts("p3", 5e5)
    centres = 0.5 * (EDGES[1:] + EDGES[:-1])
    mu = mu + 4e4 * np.exp(-0.5 * ((np.log(centres) - np.log(1200.0)) / 0.35) ** 2)
    counts = rng.poisson(mu).astype(float)
    analysis = analyse_spectrum(
        EDGES, counts, 300.0, checks=CheckOptions(), fallback=None, hunt=DEFAULT_HUNT, seed=1
    )
    assert analysis.status == "no accepted background", analysis.trail
    assert analysis.search is None
    assert analysis.failed_checks
    assert all(": " in line for line in analysis.failed_checks)


def test_sparse_and_unfittable_spectra_get_their_status() -> None:
    counts = np.zeros(EDGES.size - 1)
    counts[60:70] = 1.0
    sparse = analyse_spectrum(
        EDGES, counts, 300.0, checks=CheckOptions(), fallback=None, hunt=DEFAULT_HUNT
    )
    assert sparse.status == "too few events"
    assert "fewer than 40" in sparse.reason
    narrow = np.zeros(EDGES.size - 1)
    narrow[-4] = 50.0  # every event in one bin near the top: no fit range of 8 bins
    failed = analyse_spectrum(
        EDGES, narrow, 300.0, checks=CheckOptions(), fallback=None, hunt=DEFAULT_HUNT
    )
    assert failed.status in STATUSES
    assert failed.status == "fit failed", failed.trail
    with pytest.raises(InvalidInputError, match="N \\+ 1 edges"):
        analyse_spectrum(
            EDGES[:-1], counts, 300.0, checks=CheckOptions(), fallback=None, hunt=DEFAULT_HUNT
        )


def test_injected_bump_is_found_at_its_mass_with_its_significance() -> None:
    # 400 events of X(1500), sigma 45 GeV, on a p4 of 50k events: the hunt finds the window
    # around 1.5 TeV and its local Z is that of the injected s over b, within Poisson noise,
    # with the fit's uncertainty of b folded in as the hunt does (negative binomial tail).
    rng = np.random.default_rng(3)
    background = expected_counts("p4", 5e4)
    signal = 400.0 * np.diff(norm.cdf(EDGES, 1500.0, 45.0))
    counts = rng.poisson(background + signal).astype(float)
    analysis = analyse_spectrum(
        EDGES, counts, STREAM_FIT_FROM_GEV["T2"], checks=DEFAULTS, hunt=DEFAULT_HUNT, seed=1
    )
    assert analysis.status == "accepted", analysis.trail
    assert analysis.search is not None
    bump = analysis.search.bump
    assert bump.mass_low <= 1500.0 <= bump.mass_high
    assert bump.mass_high - bump.mass_low < 400.0
    window = (EDGES[:-1] >= bump.mass_low) & (EDGES[1:] <= bump.mass_high)
    b, s = background[window].sum(), signal[window].sum()
    assert bump.background_uncertainty
    relative = bump.background_error / bump.background
    expected_z = significance_from_statistic(float(tail_statistic(s + b, b, relative)))[1]
    assert expected_z < expected_significance(s, b)
    assert abs(bump.local_z - expected_z) < 2.5  # masked refits absorb a little of it
    assert bump.global_z > 3.0


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_background_only_spectrum_stays_quiet(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(expected_counts("p4", 5e4)).astype(float)
    analysis = analyse_spectrum(
        EDGES, counts, STREAM_FIT_FROM_GEV["T2"], checks=DEFAULTS, hunt=DEFAULT_HUNT, seed=seed
    )
    assert analysis.status == "accepted", analysis.trail
    assert analysis.search is not None
    assert analysis.search.bump.global_p > 0.01


# T5/jj at 10 pb of the demo: a lone event at 3.9 TeV and one near 12 TeV; masking the first
# left a background that vanishes where data exist, which the bump hunt rightly refuses.
SPARSE_TAIL = {
    0: 13, 1: 8, 2: 14, 3: 27, 4: 18, 5: 22, 6: 32, 7: 39, 8: 30, 9: 35, 10: 38, 11: 27,
    12: 32, 13: 33, 14: 27, 15: 21, 16: 24, 17: 17, 18: 18, 19: 11, 20: 20, 21: 15, 22: 11,
    23: 10, 24: 10, 25: 14, 26: 9, 27: 9, 28: 7, 29: 8, 30: 4, 31: 5, 32: 6, 33: 6, 34: 3,
    35: 4, 36: 2, 37: 7, 38: 2, 39: 1, 40: 1, 41: 6, 42: 2, 44: 2, 45: 3, 46: 2, 48: 1,
    49: 1, 50: 1, 51: 1, 54: 2, 55: 1, 56: 1, 60: 1, 61: 2, 63: 1, 113: 1, 155: 1,
}  # fmt: skip


def test_a_degenerate_window_exclusion_refit_keeps_the_unmasked_background() -> None:
    counts = np.zeros(len(EDGES) - 1)
    for index, value in SPARSE_TAIL.items():
        counts[index] = value
    analysis = analyse_spectrum(
        EDGES, counts, STREAM_FIT_FROM_GEV["T5"], checks=DEFAULTS, hunt=DEFAULT_HUNT, seed=1007
    )
    # The window set needs >= 1 expected event per window, so the lone tail events are no
    # longer an excess: no exclusion is triggered, or it is decided and recorded.
    assert analysis.status in ("accepted", "no accepted background"), analysis.trail
    if analysis.search is not None:
        assert analysis.search.bump.background >= 1.0
        assert analysis.search.bump.global_p > 0.01


def test_search_needs_a_range_for_a_function() -> None:
    counts = np.ones(EDGES.size - 1)
    with pytest.raises(InvalidInputError, match="fit_range"):
        search_spectrum(EDGES, counts, "p4")


@pytest.mark.slow
def test_a_strong_wide_resonance_is_found_after_the_masked_choice() -> None:
    """X(2000) of width 5 % (sigma 111 GeV = 2.3 w(m)), 47 events on a 250-event p4 (~1
    background event within +-1.3 sigma): every function fails its goodness of fit, the
    hunt flags the peak and the choice is made again with it masked. With the mask trimmed
    to 3 w(m) (+-0.66 sigma, half the signal) no function passed in any of these 10 toys
    and the scan reported no excess; with 6 w(m) half of them are accepted, each with the
    excess at 2 TeV (helper rule: 73 of 100 injection toys of T2/jg, against 9 of 100). The
    rescue bound (issue 23: the masked excess must have a Bonferroni bound <= 1e-5) keeps 3
    of those 4-5; the others end as "no accepted background", never as a weaker excess."""
    mu = expected_counts("p4", 250.0)
    signal = 47.0 * np.diff(norm.cdf(EDGES, 2000.0, 111.5))
    checks = CheckOptions(spurious_method="asimov", n_gof_toys=50)
    found = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        counts = (rng.poisson(mu) + rng.poisson(signal)).astype(float)
        analysis = analyse_spectrum(
            EDGES, counts, 300.0, checks=checks, fallback=None, hunt=DEFAULT_HUNT, seed=seed
        )
        if analysis.status != "accepted":
            assert analysis.status == "no accepted background", analysis.trail
            continue
        assert analysis.search is not None and analysis.decision is not None
        assert any("choosing again" in line for line in analysis.trail)
        bump = analysis.search.bump
        assert bump.mass_low < 2000.0 < bump.mass_high, analysis.trail
        # no toy of the 1e4 reaches it (the 10 % target is out of reach): a limit < 1e-4
        assert bump.global_z_is_lower_limit and bump.global_p <= 1e-4, analysis.trail
        window = analysis.decision.fit.used if analysis.decision.fit is not None else None
        assert window is not None and not window.all()  # the accepted fit leaves the peak out
        assert analysis.search.mask_from == "choice" and analysis.search.exclusion is None
        assert bonferroni_bound(bump.statistic, bump.n_windows) <= RESCUE_BOUND
        found += 1
    assert found >= 3


def test_a_background_chosen_with_a_mask_is_searched_with_it() -> None:
    """80 events of X(1500) (sigma 30 GeV) on a 2000-event p4: every unmasked function fails
    its goodness of fit, the masked choice passes (p3, fit p ~ 1). The search uses that fit
    with the mask (no second exclusion, no agreement veto by the failed unmasked fit), and
    the same function refitted unmasked, as the graph did, fails (fit p < 0.01)."""
    signal = 80.0 * np.diff(norm.cdf(EDGES, 1500.0, 30.0))
    rng = np.random.default_rng(0)
    counts = rng.poisson(expected_counts("p4", 2000.0) + signal).astype(float)
    checks = CheckOptions(n_gof_toys=50)
    analysis = analyse_spectrum(
        EDGES, counts, 300.0, checks=checks, fallback=None, hunt=DEFAULT_HUNT, seed=0
    )
    assert analysis.status == "accepted", analysis.trail
    search, decision = analysis.search, analysis.decision
    assert search is not None and decision is not None and decision.fit is not None
    assert search.mask_from == "choice" and search.exclusion is None
    assert search.masked_window_gev is not None
    low, high = search.masked_window_gev
    assert low < 1500.0 < high
    assert search.fit is decision.fit and not search.fit.used.all()
    assert search.fit.p_value > 0.05
    assert search.bump.mass_low < 1500.0 < search.bump.mass_high
    unmasked = search_spectrum(
        EDGES, counts, search.fit.name, search.fit.fit_range, parameters=search.fit.parameters
    )
    assert unmasked.bump_unmasked is not None
    assert unmasked.exclusion is not None and unmasked.exclusion.unmasked.p_value < 0.01
    again = search_spectrum(
        EDGES,
        counts,
        search.fit.name,
        search.fit.fit_range,
        parameters=search.fit.parameters,
        masked_window_gev=search.masked_window_gev,
    )
    assert again.bump.local_z == pytest.approx(search.bump.local_z, rel=1e-4)
    assert again.exclusion is None and again.mask_from == "choice"


def test_a_fit_without_the_stated_mask_is_refused() -> None:
    rng = np.random.default_rng(1)
    counts = rng.poisson(expected_counts("p4", 2000.0)).astype(float)
    from core.fit import fit_background

    fit = fit_background(EDGES, counts, "p4", FIT_RANGE)
    with pytest.raises(InvalidInputError, match="not fitted with 1400-1600 GeV masked"):
        search_spectrum(EDGES, counts, fit, masked_window_gev=(1400.0, 1600.0))


def test_the_fallback_runs_only_for_a_shape_with_events_enough() -> None:
    assert fallback_applies([True, True], 5000)[0]
    assert not fallback_applies([True, False], 5000)[0]
    assert not fallback_applies([], 5000)[0]
    use, why = fallback_applies([True, True], 200)
    assert not use and "too sparse" in why


@pytest.mark.slow
def test_the_whole_rule_keeps_the_null_rate_on_background_only_spectra() -> None:
    """150 background-only p4 spectra of ~1000 events: the rule (choice, masked choice,
    search with window exclusion) ends with per-spectrum global p <= 0.01 in at most 3 (2 %;
    measured 1 of 141 accepted, 0 masked choices); a broad shape the family can not describe
    (p3 + a log-normal bump, 5e4 events) is never rescued by a signal-width mask (measured:
    no accepted background in 20 of 20)."""
    checks = CheckOptions(n_gof_toys=100)
    mu = expected_counts("p4", 1000.0)
    small, masked = 0, 0
    for seed in range(150):
        counts = np.random.default_rng(seed).poisson(mu).astype(float)
        analysis = analyse_spectrum(
            EDGES, counts, 300.0, checks=checks, fallback=None, hunt=DEFAULT_HUNT, seed=seed
        )
        if analysis.search is not None:
            small += analysis.search.bump.global_p <= 0.01
            masked += analysis.search.mask_from == "choice"
    assert small <= 3
    assert masked <= 2
    centres = 0.5 * (EDGES[1:] + EDGES[:-1])
    broad = expected_counts("p3", 5e4) + 4e3 * np.exp(
        -0.5 * ((np.log(centres) - np.log(1200.0)) / 0.35) ** 2
    )
    for seed in range(5):
        counts = np.random.default_rng(seed).poisson(broad).astype(float)
        analysis = analyse_spectrum(
            EDGES, counts, 300.0, checks=checks, fallback=None, hunt=DEFAULT_HUNT, seed=seed
        )
        assert analysis.status == "no accepted background", analysis.trail


@pytest.mark.parametrize(
    ("n_events", "seed", "refused"),
    [(2500, 15, True), (2500, 26, False), (5000, 0, False), (5000, 22, False), (1e4, 5, False)],
)
def test_a_plateau_spectrum_gives_no_excess(n_events: float, seed: int, refused: bool) -> None:
    """Issue 23: a background-only plateau (tests.spectra, T7/jb-like) must not end in an
    excess. These seeds did before the knee rules (global p 1e-24 to 1e-4 with the rescue
    mask on 794-963 GeV, the plateau's knee). Now the fit starts past the knee (26, 0, 22,
    5) or, where the knee is too weak to move the start, the rescue mask on it is refused (15).
    Measured over 30 seeds at 2500 / 5000 / 1e4 / 4e4 events: excesses 6 / 5 / 11 / 0 before,
    3 / 0 / 0 / 0 now (docs/physics-notes.md)."""
    counts = np.random.default_rng(seed).poisson(plateau_expected(n_events)).astype(float)
    analysis = analyse_spectrum(
        EDGES,
        counts,
        PLATEAU_STREAM_START,
        checks=CheckOptions(n_gof_toys=100),
        hunt=DEFAULT_HUNT,
        fallback=None,
        seed=seed,
    )
    assert analysis.search is None or analysis.search.bump.global_p >= 0.01, analysis.trail
    assert refused == any("refused: the spectrum has a knee" in line for line in analysis.trail)
    if refused:
        assert analysis.status == "no accepted background"
    else:
        assert analysis.fit_range is not None and analysis.fit_range[0] > 850.0


def test_a_narrow_signal_above_a_turn_on_is_found_at_its_mass() -> None:
    """The old guards hold with the knee rules: a p3-like spectrum (written here) times a
    turn-on at 650 GeV (width 40 GeV), 3000 events from 300 GeV, with 120 events of a
    resolution-wide X(1100): the fit starts below 800 GeV and the hunt (after the masked
    choice) finds the excess at 1100 GeV with global p < 1e-3 in 3 of 4 seeds. The edges
    of the signal are no plateau knee: a rescue test without significant flatness refused
    the mask in 2 of these 4 seeds. In the fourth the masked excess (79 events on 39.5 in a
    narrower window, local Z 5.4) is not decisive (issue 23's rescue bound): that spectrum
    has no accepted background, and the trail says why."""
    centres = 0.5 * (EDGES[:-1] + EDGES[1:])
    x = EDGES / 13000.0
    cumulative = np.where(EDGES >= 300.0, (1 - x) ** 10 * x**-3.5, 0.0)  # falls as x^-4.5
    mu = np.maximum(-np.diff(cumulative), 0.0) / (1.0 + np.exp(-(centres - 650.0) / 40.0))
    mu *= 3000.0 / mu.sum()
    sigma = 1100.0 * np.sqrt(0.84**2 / 1100.0 + 0.016**2)
    signal = 120.0 * np.diff(norm.cdf(EDGES, 1100.0, sigma))
    for seed in range(4):
        counts = np.random.default_rng(seed).poisson(mu + signal).astype(float)
        analysis = analyse_spectrum(
            EDGES,
            counts,
            300.0,
            checks=CheckOptions(n_gof_toys=100),
            hunt=DEFAULT_HUNT,
            fallback=None,
            seed=seed,
        )
        assert analysis.fit_range is not None and analysis.fit_range[0] < 800.0
        if analysis.search is None:
            assert seed == 3 and analysis.reason.startswith("rescue not kept"), analysis.trail
            continue
        bump = analysis.search.bump
        assert bump.mass_low < 1100.0 < bump.mass_high and bump.global_p < 1e-3, analysis.trail


@pytest.mark.parametrize("bound", [RESCUE_BOUND, 1.0])
def test_a_sculpted_multijet_spectrum_is_not_rescued_into_an_excess(
    bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23: every function fails its goodness of fit on this background-only spectrum
    (p2-p4 at p 0.02-0.05), and the hunt against the rejected p2 has its best window at the
    plateau's cliff, 1368-1565 GeV (global p ~ 1e-4: 0 or 2 of 10 000 toys by seed). Rescued
    with the old trigger (global p < 0.01: `bound` 1.0 lets any window through), the masked
    p2 made it 22 events on 5.1, local Z 5.2, the top excess of the scan. The rescue stands
    only for a decisive masked excess: this one's Bonferroni bound is 5e-4 > 1e-5, so the
    spectrum has no accepted background, and the trail says why."""
    monkeypatch.setattr("core.spectrum.RESCUE_BOUND", bound)
    edges, counts = sculpted_t7_jb()
    analysis = analyse_spectrum(
        edges,
        counts,
        STREAM_FIT_FROM_GEV["T7"],
        checks=CheckOptions(),
        hunt=DEFAULT_HUNT,
        fallback=None,
        seed=0,
    )
    if bound == 1.0:
        assert analysis.search is not None and analysis.search.mask_from == "choice"
        assert analysis.search.bump.local_z > 5.0
        return
    assert analysis.status == "no accepted background", analysis.trail
    refusal = next(line for line in analysis.trail if line.startswith("rescue not kept"))
    match = re.search(r"times (\d+) windows is ([0-9.e+-]+) >", refusal)
    assert match is not None, refusal
    assert 1e-4 < float(match.group(2)) < 1e-2


def test_the_rescue_bound_is_the_bonferroni_bound_of_the_probe() -> None:
    # t = -ln(local p); n windows; bound n e^-t: 4000 windows at local p 1e-9 give 4e-6
    assert rescue_refusal(-math.log(1e-9), 4000, "p2") is None
    refusal = rescue_refusal(-math.log(1e-8), 4000, "p2")
    assert refusal is not None and "4000 windows is 4e-05 > 1e-05" in refusal
