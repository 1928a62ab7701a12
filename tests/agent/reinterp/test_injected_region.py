"""An injection's anomaly regions, made from the run's ranking alone, equal the regions of
`core.anomaly.anomaly_region` on the run's events and the injected ones held together."""

from __future__ import annotations

import numpy as np

from agent.reinterp.injection import _injected_region
from core.anomaly import anomaly_region
from core.masses import STREAMS
from core.regions import StreamRanking
from core.table import EventTable

N_DATA = 600
N_INJECTED = 40


def _events(rng: np.random.Generator, n: int, keys: np.ndarray) -> EventTable:
    """`n` events with coarse scores (ties at every cut) in random streams."""
    return EventTable(
        event=keys,
        run=np.ones(n, dtype=np.int64),
        weight=np.ones(n),
        stream_bits=rng.random((n, len(STREAMS))) < 0.4,
        masses=np.full((n, 9), 1000.0),
        score=np.round(rng.normal(size=n), 1),
        key=keys,
        training=np.zeros(n, dtype=np.bool_),
    )


def _ranking(data: EventTable, exclude: np.ndarray) -> StreamRanking:
    """Every stream's search events by score, then lower key (the ranking's definition)."""
    assert data.score is not None
    scores, keys, n_search = [], [], []
    for k in range(len(STREAMS)):
        rows = np.flatnonzero(data.stream_bits[:, k] & ~exclude)
        order = rows[np.lexsort((data.keys()[rows], -data.score[rows]))]
        scores.append(data.score[order])
        keys.append(data.keys()[order])
        n_search.append(rows.size)
    return StreamRanking(
        tuple(scores), tuple(keys), tuple(n_search), N_DATA, int(exclude.sum()), N_DATA
    )


def test_regions_with_injected_events_equal_those_of_the_joined_events() -> None:
    """Tight, tied, loose and whole-stream regions; injected keys that repeat run keys
    (the run's event goes first on a tie of score and key)."""
    rng = np.random.default_rng(5)
    data = _events(rng, N_DATA, rng.permutation(N_DATA).astype(np.int64) * 3)
    injected = _events(rng, N_INJECTED, rng.choice(N_DATA * 3, N_INJECTED, replace=False))
    assert data.score is not None and injected.score is not None
    exclude = rng.random(N_DATA) < 0.1
    twins = np.flatnonzero(~exclude)[:10]  # injected events with a run event's score and key
    injected.score[:10] = data.score[twins]
    injected.keys()[:10] = data.keys()[twins]
    injected.stream_bits[:10] = data.stream_bits[twins]
    ranking = _ranking(data, exclude)
    joined_scores = np.concatenate([data.score, injected.score])
    joined_keys = np.concatenate([data.keys(), injected.keys()])
    joined_exclude = np.concatenate([exclude, np.zeros(N_INJECTED, dtype=np.bool_)])
    tied = 0
    for k in range(len(STREAMS)):
        in_stream = np.concatenate([data.stream_bits[:, k], injected.stream_bits[:, k]])
        for n_requested in (0, 1, 7, 40, 120, 230, 260, 400):
            expected = anomaly_region(
                joined_scores,
                max(n_requested, 0.4),  # N = round(sigma L) with L = 1 pb^-1
                1.0,
                in_stream=in_stream & ~joined_exclude,
                event_ids=joined_keys,
            )
            region = _injected_region(ranking, injected, k, n_requested)
            held_data = np.flatnonzero(expected.selected[:N_DATA])
            assert sorted(data.keys()[held_data]) == sorted(ranking.keys[k][: region.n_data])
            np.testing.assert_array_equal(region.injected, expected.selected[N_DATA:])
            assert region.cut == expected.cut
            assert region.whole_stream == expected.whole_stream
            tied += expected.n_pass_at_cut > 0
    assert tied > 5, "the test must cut through tied scores"
