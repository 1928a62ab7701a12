"""Reinterpretation core: acceptance counting, the Gaussian lineshape, yield recovery pulls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import InvalidInputError
from core.events import iterate_events
from core.fit import fit_background
from core.masses import PAIRS, STREAMS, leading_pair_masses, mass_bin_edges, stream_bits
from core.reinterp import (
    RegionCut,
    ae_gain,
    background_toy,
    clopper_pearson,
    correctly_paired,
    fit_injected_signal,
    signal_acceptance,
    signal_sigma_gev,
    window_bins,
    window_expected_z,
)
from core.synth import SampleConfig, SignalSpec, generate_sample, load_truth, signal_record

EDGES = mass_bin_edges()


def _ranges() -> dict[str, tuple[float, float]]:
    return dict.fromkeys(STREAMS, (300.0, 8535.0))


def test_acceptance_counts_stream_cut_pair_and_weights() -> None:
    """Six events, hand-counted: in stream, score above the cut (not at it), pair present."""
    n = 6
    masses = np.full((n, 9), np.nan)
    jm = PAIRS.index("jm")
    masses[:, jm] = [1000.0, 1000.0, 2000.0, 200.0, np.nan, 1000.0]
    bits = np.zeros((n, 7), dtype=bool)
    bits[:, 1] = [True, True, True, True, True, False]  # T2; the last event is not in it
    score = np.array([-1.0, -3.0, -2.0, 0.0, 5.0, 9.0])
    weight = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    regions = [
        RegionCut(1.0, "T2", -2.0, whole_stream=False),
        RegionCut(10.0, "T2", -math.inf, whole_stream=True),
    ]
    result = signal_acceptance(masses, bits, score, weight, regions, EDGES, _ranges())
    assert result.n_events == 6 and result.sum_weights == 7.0
    cut, whole = result.streams
    # score > -2: events 0, 3, 4 (event 2 sits at the cut and does not pass)
    assert cut.n_pass == 3 and cut.acceptance == pytest.approx(3 / 7)
    pair = cut.pairs[jm]
    # of those, the jm pair exists (in the binning) for events 0 and 3
    assert pair.n_pass == 2 and pair.acceptance == pytest.approx(2 / 7)
    assert pair.acceptance_fit_range == pytest.approx(1 / 7)  # 200 GeV is below 300
    assert pair.counts.sum() == pytest.approx(2.0)
    assert whole.n_pass == 5 and whole.acceptance == pytest.approx(6 / 7)
    assert whole.pairs[jm].acceptance == pytest.approx((1 + 1 + 2 + 1) / 7)
    assert whole.stream_acceptance == pytest.approx(6 / 7)
    lo, hi = pair.acceptance_interval
    assert lo < 2 / 6 < hi


def test_acceptance_refuses_empty_or_zero_weight_samples() -> None:
    regions = [RegionCut(1.0, "T1", 0.0, whole_stream=False)]
    with pytest.raises(InvalidInputError, match="no events"):
        signal_acceptance(
            np.zeros((0, 9)), np.zeros((0, 7), bool), [], [], regions, EDGES, _ranges()
        )
    with pytest.raises(InvalidInputError, match="sum to"):
        signal_acceptance(
            np.zeros((1, 9)), np.ones((1, 7), bool), [1.0], [0.0], regions, EDGES, _ranges()
        )


def test_clopper_pearson_known_values() -> None:
    """k = 0 of 10 at 68.27 %: upper 1 - 0.15865^(1/10); k = n mirrors it."""
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.158655**0.1, rel=1e-4)
    low, high = clopper_pearson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.158655**0.1, rel=1e-4)


def test_signal_width_and_expected_z() -> None:
    resolution = 2000.0 * math.sqrt(0.84**2 / 2000.0 + 0.016**2)  # 49.3 GeV
    assert signal_sigma_gev(2000.0, 0.0) == pytest.approx(resolution)
    assert signal_sigma_gev(2000.0, 0.05) == pytest.approx(math.hypot(resolution, 100.0))
    with pytest.raises(InvalidInputError, match="fraction of the mass"):
        signal_sigma_gev(2000.0, 1.5)
    first, stop = window_bins(EDGES, 2000.0, 100.0)
    assert EDGES[first] <= 1800.0 < EDGES[first + 1] and EDGES[stop - 1] < 2200.0 <= EDGES[stop]
    assert window_expected_z(10.0, 100.0) == pytest.approx(
        math.sqrt(2 * ((110) * math.log(1.1) - 10))
    )
    assert window_expected_z(1.0, 0.0) is None
    assert ae_gain(4.0, 1.0) == pytest.approx(300.0)
    assert ae_gain(None, 1.0) is None and ae_gain(2.0, 0.0) is None


def test_default_lineshape_keeps_the_sample_record_unchanged() -> None:
    """Samples written before the lineshape option keep their metadata (and file identity)."""
    old = SignalSpec("jm", 1500.0, 30.0, n_events=10)
    assert "lineshape" not in signal_record(old)
    assert signal_record(SignalSpec("jm", 1.0, 1.0, n_events=1, lineshape="gaussian"))[
        "lineshape"
    ] == ("gaussian")
    with pytest.raises(InvalidInputError, match="lineshape"):
        generate_sample(
            "/nonexistent-never-written",
            SampleConfig(
                n_events=0,
                signals=(SignalSpec("jm", 1.0, 1.0, n_events=1, lineshape="lorentz"),),  # type: ignore[arg-type]
            ),
        )


@pytest.fixture(scope="module")
def signal_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """4000 generated X(2000) -> j mu events (Gaussian, sigma 100 GeV) after the selection.

    Returns the T2/jm mass of every event (NaN outside T2 or without the pair) and whether
    that pair is the decay's (reconstructed mass = true mass).
    """
    folder = tmp_path_factory.mktemp("pool")
    spec = SignalSpec("jm", 2000.0, 100.0, n_events=4000, lineshape="gaussian")
    info = generate_sample(folder / "data", SampleConfig(n_events=0, seed=11, signals=(spec,)))
    truth = load_truth(info.truth_path)["truth"][0]  # type: ignore[index]
    true_mass = dict(zip(truth["events"], truth["true_mass"], strict=True))
    masses, paired = [], []
    for chunk in iterate_events([str(p) for p in info.files]):
        m = leading_pair_masses(chunk)[:, PAIRS.index("jm")]
        in_t2 = stream_bits(chunk)[:, STREAMS.index("T2")]
        m = np.where(in_t2, m, np.nan)
        truth_mass = np.array([true_mass[int(e)] for e in chunk.event])
        masses.append(m)
        paired.append(correctly_paired(m, truth_mass))
    return np.concatenate(masses), np.concatenate(paired)


def test_generated_gaussian_signal_has_the_requested_width(
    signal_pool: tuple[np.ndarray, np.ndarray],
) -> None:
    """The paired T2/jm masses are N(2000, 100): mean within 3 errors, sigma within 5 %."""
    masses, paired = signal_pool
    values = masses[paired]
    assert values.size > 1000
    assert abs(values.mean() - 2000.0) < 3 * 100.0 / math.sqrt(values.size)
    assert values.std() == pytest.approx(100.0, rel=0.05)
    assert 0.5 < paired.mean() < 1.0  # some events lose a decay product to the selection


def _background_truth() -> np.ndarray:
    """Expected counts of a falling p3-like spectrum of 20 000 events above 300 GeV."""
    x = 0.5 * (EDGES[1:] + EDGES[:-1]) / 13000.0
    shape = (1 - x) ** 10 * x**-4.5 * np.diff(EDGES)
    shape[EDGES[:-1] < 300.0] = 0.0
    return 20_000.0 * shape / shape.sum()


def test_injected_yield_is_recovered_without_bias(
    signal_pool: tuple[np.ndarray, np.ndarray],
) -> None:
    """Injection and recovery on 400 toys: mean pull within +-0.2, width within 0.2 of 1.

    The toys vary the background (Poisson in every bin around a fixed falling truth shape)
    and the signal (a Poisson number, mean 40 x the pool's T2/jm acceptance, of events drawn
    from the generated pool: mispaired events included as they come). Each toy refits the
    background (p4 over 300-8535 GeV) and then the background + Gaussian fit of the inject
    command (`fit_injected_signal`, background floating); the pull is (fitted - expected
    paired yield) / fit error. The toys' own spread: the error of the mean pull is
    1/sqrt(400) = 0.05, of its width about 0.035. A template 30 % too narrow gives a mean
    pull of -0.8 (measured on the first 200 of these toys): the test sees a wrong signal.
    """
    masses, paired = signal_pool
    background = _background_truth()
    rng = np.random.default_rng(2026)
    expected_total = 40.0
    expected = expected_total * float(np.mean(paired))
    pulls = []
    for toy in range(400):
        chosen = rng.choice(masses.size, rng.poisson(expected_total), replace=False)
        values = masses[chosen]
        counts = rng.poisson(background).astype(float)
        counts += np.histogram(values[np.isfinite(values)], bins=EDGES)[0]
        fit = fit_background(EDGES, counts, "p4", (300.0, 8535.0), seed=toy)
        recovered = fit_injected_signal(EDGES, counts, fit, 2000.0, 100.0)
        assert recovered.valid and recovered.fraction_in_range == pytest.approx(1.0)
        pulls.append((recovered.signal_yield - expected) / recovered.signal_yield_error)
    values = np.asarray(pulls)
    print(f"mean pull {values.mean():.3f}, width {values.std(ddof=1):.3f}")
    assert abs(values.mean()) < 0.2, values.mean()
    assert abs(values.std(ddof=1) - 1.0) < 0.2, values.std(ddof=1)


def test_a_mass_outside_the_fit_range_is_refused() -> None:
    counts = np.random.default_rng(1).poisson(_background_truth()).astype(float)
    fit = fit_background(EDGES, counts, "p3", (300.0, 8535.0))
    with pytest.raises(InvalidInputError, match="outside the fit range"):
        fit_injected_signal(EDGES, counts, fit, 11_000.0, 100.0)


def test_background_toy_draws_the_scaled_prediction() -> None:
    """Poisson(B k), k = kept / kept_run: the mean over many toys is B k, each toy integer."""
    expected = np.array([200.0, 50.0, 5.0, 0.5, 0.0])
    rng = np.random.default_rng(3)
    toys = []
    for _ in range(4000):
        counts, scale = background_toy(expected, 90.0, 100.0, rng)
        toys.append(counts)
    assert scale == pytest.approx(0.9)
    draws = np.array(toys)
    assert np.all(draws == np.round(draws)) and np.all(draws[:, -1] == 0)
    # mean within 4 standard errors of B k in every bin, variance that of a Poisson
    error = np.sqrt(expected * 0.9 / len(toys))
    assert np.all(np.abs(draws.mean(axis=0) - expected * 0.9) <= 4 * error + 1e-12)
    assert draws[:, 0].var() == pytest.approx(180.0, rel=0.1)
    # the same seed gives the same toy
    a, _ = background_toy(expected, 90.0, 100.0, np.random.default_rng([1, 2]))
    b, _ = background_toy(expected, 90.0, 100.0, np.random.default_rng([1, 2]))
    assert np.array_equal(a, b)
    with pytest.raises(InvalidInputError, match="kept_run > 0"):
        background_toy(expected, 1.0, 0.0, rng)
    with pytest.raises(InvalidInputError, match="non-negative"):
        background_toy(-expected, 1.0, 1.0, rng)
