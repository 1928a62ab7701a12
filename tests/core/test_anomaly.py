"""Anomaly regions: exact counts, deterministic ties, whole streams, the inverse and the grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.anomaly import (
    ATLAS_XSEC_POINTS_PB,
    anomaly_region,
    anomaly_regions_per_stream,
    cut_for_xsec,
    log_uniform_xsec_grid,
    requested_count,
    stream_regions,
    xsec_for_cut,
)
from core.errors import InvalidInputError


@pytest.fixture
def scores() -> np.ndarray:
    return np.random.default_rng(7).normal(-5.0, 1.0, size=10_000)


@pytest.mark.parametrize(("xsec_pb", "lumi_pb", "expected"), [(0.1, 1000.0, 100), (1.0, 2.5, 3)])
def test_requested_count_rounds_half_up(xsec_pb: float, lumi_pb: float, expected: int) -> None:
    assert requested_count(xsec_pb, lumi_pb) == expected
    assert requested_count(0.25, 2.0) == 1  # 0.5 -> 1 (half up, not banker's rounding)
    assert requested_count(0.2, 2.0) == 0


@pytest.mark.parametrize("xsec_pb", [0.001, 0.01, 0.1, 1.0, 3.3])
def test_exact_count_passes_and_they_are_the_highest(scores: np.ndarray, xsec_pb: float) -> None:
    lumi_pb = 1400.0
    region = anomaly_region(scores, xsec_pb, lumi_pb)
    n = math.floor(xsec_pb * lumi_pb + 0.5)
    assert region.n_pass == n == int(region.selected.sum())
    assert not region.whole_stream
    # the selected events are exactly the n largest scores
    ranked = np.argsort(scores)[::-1]
    assert set(np.flatnonzero(region.selected)) == set(ranked[:n])
    # the cut is the best rejected score: "score > cut" is the AR
    assert region.cut == scores[ranked[n]]
    assert np.array_equal(scores > region.cut, region.selected)
    assert region.n_pass_at_cut == 0
    assert cut_for_xsec(scores, xsec_pb, lumi_pb) == region.cut


def test_inverse_recovers_the_cross_section(scores: np.ndarray) -> None:
    lumi_pb = 1400.0
    for xsec_pb in (0.01, 0.5, 2.0):
        cut = cut_for_xsec(scores, xsec_pb, lumi_pb)
        # continuous scores have no ties, so the inverse is exact: N / L
        expected = math.floor(xsec_pb * lumi_pb + 0.5) / lumi_pb
        assert xsec_for_cut(scores, cut, lumi_pb) == pytest.approx(expected, rel=1e-12)
    assert xsec_for_cut(scores, math.inf, lumi_pb) == 0.0
    assert xsec_for_cut(scores, -math.inf, lumi_pb) == pytest.approx(len(scores) / lumi_pb)


def test_ties_are_broken_by_event_id_then_position() -> None:
    scores = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    ids = np.array([10, 11, 40, 20, 30, 50])
    region = anomaly_region(scores, 3.0, 1.0, event_ids=ids)
    # 3.0 passes; two of the three tied 2.0 events: the ones with ids 20 and 30
    assert region.n_pass == 3
    assert region.cut == 2.0
    assert region.n_pass_at_cut == 2
    assert int(np.count_nonzero(scores > region.cut)) == region.n_pass - region.n_pass_at_cut
    assert np.flatnonzero(region.selected).tolist() == [1, 3, 4]
    # without ids, the earlier positions win
    by_position = anomaly_region(scores, 3.0, 1.0)
    assert np.flatnonzero(by_position.selected).tolist() == [1, 2, 3]
    # deterministic under permutation of the input when ids are given
    perm = np.random.default_rng(3).permutation(len(scores))
    permuted = anomaly_region(scores[perm], 3.0, 1.0, event_ids=ids[perm])
    assert sorted(ids[perm][permuted.selected].tolist()) == [11, 20, 30]


def test_all_tied_scores_still_give_exact_count() -> None:
    scores = np.zeros(1000)
    region = anomaly_region(scores, 0.0371, 1000.0)
    assert region.n_pass == 37 == int(region.selected.sum())
    assert np.flatnonzero(region.selected).tolist() == list(range(37))


def test_per_stream_and_whole_stream(scores: np.ndarray) -> None:
    rng = np.random.default_rng(11)
    small = np.zeros(len(scores), dtype=bool)
    small[rng.choice(len(scores), size=50, replace=False)] = True
    large = rng.random(len(scores)) < 0.5
    regions = anomaly_regions_per_stream(scores, {"T1": small, "T6": large}, 0.1, 1000.0)
    assert regions["T1"].whole_stream
    assert regions["T1"].n_requested == 100
    assert regions["T1"].n_pass == regions["T1"].n_stream == 50
    assert np.array_equal(regions["T1"].selected, small)
    assert regions["T1"].cut == -math.inf
    assert regions["T1"].effective_xsec_pb == pytest.approx(0.05)
    assert not regions["T6"].whole_stream
    assert regions["T6"].n_pass == 100
    assert not np.any(regions["T6"].selected & ~large)
    # the 100 best of the stream, not of all events
    expected = np.flatnonzero(large)[np.argsort(scores[large])[::-1][:100]]
    assert set(np.flatnonzero(regions["T6"].selected)) == set(expected)


def test_stream_regions_are_the_per_stream_regions_as_mask_columns() -> None:
    # 3000 events in 7 streams (some in several), 1 % excluded as training events: each
    # column holds the N = sigma x L_search best-scoring events of its stream, none excluded;
    # a stream with fewer events than N is taken whole.
    from core.table import EventTable

    rng = np.random.default_rng(5)
    n = 3000
    bits = rng.random((n, 7)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.4, 0.01]
    score = rng.normal(size=n)
    table = EventTable(
        event=np.arange(n),
        run=np.ones(n, dtype=np.int64),
        weight=np.ones(n),
        stream_bits=bits,
        masses=np.full((n, 9), np.nan),
        score=score,
        key=np.arange(n),
    )
    exclude = np.zeros(n, dtype=bool)
    exclude[rng.choice(n, size=30, replace=False)] = True
    masks, whole = stream_regions(table, 0.1, 1000.0, exclude)  # N = 0.1 x 990 = 99
    assert masks.shape == (n, 7)
    for k in range(7):
        in_stream = bits[:, k] & ~exclude
        assert not np.any(masks[:, k] & ~in_stream)
        assert whole[k] == (in_stream.sum() <= 99)
        assert masks[:, k].sum() == min(99, in_stream.sum())
        if not whole[k]:
            cut = np.sort(score[in_stream])[-99]
            assert np.array_equal(masks[:, k], in_stream & (score >= cut))
    assert whole[6] and not whole[0]


def test_empty_region_and_empty_stream() -> None:
    scores = np.array([1.0, 2.0])
    none_requested = anomaly_region(scores, 0.1, 1.0)  # N = round(0.1) = 0
    assert none_requested.n_pass == 0
    assert none_requested.cut == 2.0
    assert not none_requested.selected.any()
    empty_stream = anomaly_region(scores, 1.0, 10.0, in_stream=np.zeros(2, dtype=bool))
    assert empty_stream.whole_stream
    assert empty_stream.n_stream == empty_stream.n_pass == 0
    assert empty_stream.cut == -math.inf


def test_grid_is_log_uniform_and_contains_atlas_points() -> None:
    grid = log_uniform_xsec_grid()
    assert grid[0] == pytest.approx(0.001, rel=1e-12)
    assert grid[-1] == pytest.approx(100.0, rel=1e-12)
    assert len(grid) == 11
    ratios = grid[1:] / grid[:-1]
    assert np.allclose(ratios, math.sqrt(10.0), rtol=1e-9)
    for point in ATLAS_XSEC_POINTS_PB:
        assert np.any(grid == point), point
    assert len(log_uniform_xsec_grid(5)) == 26


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xsec_pb": 0.0}, "xsec_pb must be a positive"),
        ({"xsec_pb": math.nan}, "xsec_pb must be a positive"),
        ({"lumi_pb": -1.0}, "lumi_pb must be a positive"),
        ({"scores": [1.0, math.nan]}, "not finite"),
        ({"scores": [[1.0]]}, "1-d array"),
        ({"in_stream": [1, 0]}, "boolean mask"),
        ({"in_stream": np.ones(3, dtype=bool)}, "boolean mask"),
        ({"event_ids": [1.5, 2.5]}, "event_ids must be integers"),
    ],
)
def test_invalid_inputs_are_explained(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"scores": [1.0, 2.0], "xsec_pb": 1.0, "lumi_pb": 1.0}
    arguments.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        anomaly_region(**arguments)  # type: ignore[arg-type]


def test_inverse_and_grid_errors() -> None:
    with pytest.raises(InvalidInputError, match="NaN"):
        xsec_for_cut([1.0], math.nan, 1.0)
    with pytest.raises(InvalidInputError, match="points_per_decade"):
        log_uniform_xsec_grid(0)
    with pytest.raises(InvalidInputError, match="low_pb < high_pb"):
        log_uniform_xsec_grid(2, 10.0, 1.0)
    with pytest.raises(InvalidInputError, match="low_pb must be a positive"):
        log_uniform_xsec_grid(2, 0.0, 1.0)


def test_ar_size_uses_the_search_luminosity() -> None:
    # N = sigma x L_search, L_search = (1 - f) L: 1 pb at L = 1000 pb^-1 with 1 % of the
    # events trained on selects 990 events, not 1000.
    from core.anomaly import luminosity_after_training

    rng = np.random.default_rng(1)
    scores = rng.normal(size=5000)
    region = anomaly_region(scores, 1.0, 1000.0, training_fraction=0.01)
    assert region.n_pass == 990
    assert region.lumi_pb == pytest.approx(990.0)
    assert luminosity_after_training(1000.0, 0.0) == 1000.0
    with pytest.raises(InvalidInputError, match="training_fraction"):
        anomaly_region(scores, 1.0, 1000.0, training_fraction=1.0)
