"""Anomaly regions from a ranking and passes over the table equal the in-memory regions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.anomaly import anomaly_region, stream_anomaly_regions, stream_regions
from core.bootstrap import SpectrumSelection, bootstrap_spectra, replica_key
from core.errors import InvalidInputError
from core.masses import SPECTRUM_NAMES, STREAMS, histogram, mass_bin_edges
from core.regions import (
    ReplicaRequest,
    points_bootstrap,
    points_spectra,
    rank_streams,
    ranked_values,
    search_spectrum,
)
from core.table import (
    MASS_COLUMNS,
    commit_table_parts,
    event_table_schema,
    iter_table_columns,
    read_event_table,
    region_spectra,
)

LUMI_PB = 1000.0
STREAM_FRACTIONS = (0.6, 0.4, 0.3, 0.2, 0.1, 0.5, 0.02)
POINTS_PB = (0.0001, 0.02, 0.1, 0.5, 2.0, 5.0)
"""N = 0, 18, 90, 450, 1800 and 4500 at L_search ~ 900 pb^-1 (a tenth is excluded): an
empty region, tight and loose ones, whole streams."""


def _columns(rng: np.random.Generator, n: int, first_key: int) -> dict[str, np.ndarray]:
    """One part's rows: coarse scores (many ties at every cut), keys out of order, masses
    with gaps (NaN), values on the binning's edges and outside it."""
    edges = mass_bin_edges()
    masses = rng.choice(edges[:60], size=(n, 9)) * rng.choice([1.0, 1.0001], size=(n, 9))
    masses[rng.random((n, 9)) < 0.3] = np.nan
    masses[0, :] = edges[-1]
    masses[1, :] = edges[0] - 1.0
    keys = first_key + rng.permutation(n).astype(np.int64) * 7
    columns = {
        "event": keys,
        "run": np.ones(n, dtype=np.int64),
        "weight": np.ones(n),
        "lumi_block": np.zeros(n, dtype=np.int64),
        "source_id": np.zeros(n, dtype=np.int64),
        "key": keys,
        **{s: rng.random(n) < f for s, f in zip(STREAMS, STREAM_FRACTIONS, strict=True)},
        **{name: masses[:, j] for j, name in enumerate(MASS_COLUMNS)},
        "score": np.round(rng.normal(size=n), 1),
        "training": np.zeros(n, dtype=bool),
    }
    return columns


@pytest.fixture(scope="module")
def table_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-part event table of 3000 + 2000 rows."""
    folder = tmp_path_factory.mktemp("regions") / "events"
    folder.mkdir()
    rng = np.random.default_rng(11)
    names = []
    for i, (n, first_key) in enumerate(((3000, 5), (2000, 1))):
        name = f"part-{i:05d}.parquet"
        rows = pa.Table.from_pydict(
            _columns(rng, n, first_key), event_table_schema(with_score=True)
        )
        pq.write_table(rows, folder / name, row_group_size=900)
        names.append(name)
    commit_table_parts(folder, names, {"scored": True})
    return folder


def _exclude(keys: np.ndarray) -> np.ndarray:
    return keys % 10 == 3


def test_spectra_of_every_point_equal_the_in_memory_regions(table_folder):
    """Ties at the cut, an empty region, tight and whole-stream regions, two parts read
    in batches that straddle them: every point's 63 spectra, region sizes, whole-stream
    flags and lowest scores equal those of the whole table in memory."""
    table = read_event_table(table_folder)
    exclude = _exclude(table.keys())
    depth = 4950
    ranking = rank_streams(table_folder, depth, _exclude, batch_size=700)
    assert ranking.n_rows == 5000
    assert ranking.n_excluded == int(exclude.sum())
    assert all(scores.size <= depth for scores in ranking.scores)
    regions = [ranking.regions(point, LUMI_PB) for point in reversed(POINTS_PB)]
    spectra = points_spectra(table_folder, ranking, regions, _exclude, batch_size=700)
    for point, region, counts in zip(reversed(POINTS_PB), regions, spectra, strict=True):
        masks, whole = stream_regions(table, point, LUMI_PB, exclude)
        _, expected = region_spectra(table, masks)
        np.testing.assert_array_equal(counts, expected, err_msg=f"{point} pb")
        assert region.whole_stream == tuple(whole)
        assert region.n_pass == tuple(int(n) for n in masks.sum(axis=0))
        for k, lowest in enumerate(region.lowest_score):
            selected = table.score[masks[:, k]]
            assert lowest == (float(selected.min()) if selected.size else None)
        in_memory = stream_anomaly_regions(table, point, LUMI_PB, exclude)
        assert ranking.cuts(point, LUMI_PB) == tuple(r.cut for r in in_memory), f"{point} pb"
    tied = [
        anomaly_region(
            table.score,
            0.1,
            LUMI_PB,
            in_stream=table.stream_bits[:, k] & ~exclude,
            event_ids=table.keys(),
            training_fraction=float(exclude.mean()),
        ).n_pass_at_cut
        for k in range(len(STREAMS))
    ]
    assert sum(tied) > 0, "the test must cut through tied scores"
    assert any(regions[0].whole_stream) and not any(regions[-2].whole_stream)
    assert spectra[-1].sum() == 0 < spectra[-2].sum() < spectra[0].sum()


def test_bootstrap_replicas_equal_those_of_the_whole_table(table_folder):
    table = read_event_table(table_folder)
    exclude = _exclude(table.keys())
    ranking = rank_streams(table_folder, 4950, _exclude, batch_size=1300)
    key = replica_key(4, 5)
    wanted = [("T1/jj", 0.5, 3, 40), ("T2/jm", 0.1, 0, 59), ("T1/jj", 2.0, 10, 60)]
    requests = [
        ReplicaRequest(name, ranking.regions(point, LUMI_PB), first, stop)
        for name, point, first, stop in wanted
    ]
    replicas = points_bootstrap(table_folder, ranking, requests, _exclude, 5, key, batch_size=1300)
    for (name, point, first, stop), values in zip(wanted, replicas, strict=True):
        masks, _ = stream_regions(table, point, LUMI_PB, exclude)
        stream = STREAMS.index(name.split("/")[0])
        selection = SpectrumSelection(name, masks[:, stream], first, stop)
        (expected,) = bootstrap_spectra(table.masses, table.stream_bits, [selection], 5, key)
        np.testing.assert_array_equal(values, expected, err_msg=f"{name} at {point} pb")
        assert values.sum() > 0


def test_a_ranking_cut_back_while_reading_keeps_the_best_and_refuses_deeper_points(
    table_folder,
):
    """At depth 100 every stream's buffer is cut back many times (batches of 700 rows,
    scores tied at every cut): what is kept is the exact head of the full ranking, and the
    points it can answer have the in-memory spectra."""
    table = read_event_table(table_folder)
    exclude = _exclude(table.keys())
    ranking = rank_streams(table_folder, 100, _exclude, batch_size=700)
    for k, (scores, keys) in enumerate(zip(ranking.scores, ranking.keys, strict=True)):
        rows = np.flatnonzero(table.stream_bits[:, k] & ~exclude)
        head = rows[np.lexsort((table.keys()[rows], -table.score[rows]))][:100]
        np.testing.assert_array_equal(keys, table.keys()[head], err_msg=STREAMS[k])
        np.testing.assert_array_equal(scores, table.score[head])
    assert sum(np.unique(s).size < s.size for s in ranking.scores) >= 4, "ties must be cut"
    regions = [ranking.regions(point, LUMI_PB) for point in (0.02, 0.1)]
    for point, counts in zip(
        (0.02, 0.1), points_spectra(table_folder, ranking, regions, _exclude), strict=True
    ):
        _, expected = region_spectra(table, stream_regions(table, point, LUMI_PB, exclude)[0])
        np.testing.assert_array_equal(counts, expected, err_msg=f"{point} pb")
    with pytest.raises(InvalidInputError, match=r"needs \d+ of stream T1; rank with depth >= \d+"):
        ranking.regions(0.5, LUMI_PB)
    at_depth = 100 / (LUMI_PB * (1 - ranking.training_fraction))
    assert ranking.regions(at_depth, LUMI_PB).n_pass[0] == 100  # the region fits, its cut not
    with pytest.raises(InvalidInputError, match=r"cut of stream T1 at .* needs 101"):
        ranking.cuts(at_depth, LUMI_PB)
    with pytest.raises(InvalidInputError, match="unknown spectrum 'T9/jj'"):
        points_bootstrap(
            table_folder,
            ranking,
            [ReplicaRequest("T9/jj", ranking.regions(0.1, LUMI_PB), 0, 5)],
            _exclude,
            3,
            1,
        )


def test_ranked_values_are_the_ranked_events_own_in_ranking_order(table_folder):
    """Per stream, the mass of each ranked event (NaN kept), read by key over two parts in
    batches that straddle them; a ranked event the table lacks is refused."""
    table = read_event_table(table_folder)
    ranking = rank_streams(table_folder, 1200, _exclude, batch_size=700)
    by_key = {int(key): row for row, key in enumerate(table.keys())}
    values = ranked_values(table_folder, ranking, "m_jb", batch_size=700)
    for k, keys in enumerate(ranking.keys):
        rows = [by_key[int(key)] for key in keys]
        np.testing.assert_array_equal(values[k], table.masses[rows, 1])  # jb
    assert sum(int(np.isnan(v).sum()) for v in values) > 0
    assert all(v.size == min(1200, n) for v, n in zip(values, ranking.n_search, strict=True))
    missing = dataclasses.replace(
        ranking, keys=(np.append(ranking.keys[0][:-1], -1), *ranking.keys[1:])
    )
    with pytest.raises(InvalidInputError, match="lacks 1 events of stream T1"):
        ranked_values(table_folder, missing, "m_jb")


def test_a_whole_streams_search_spectrum_equals_the_in_memory_one(table_folder):
    """Training events left out, NaN masses and masses off the binning not counted."""
    table = read_event_table(table_folder)
    exclude = _exclude(table.keys())
    for stream, pair in (("T1", "jj"), ("T7", "bg")):
        counts = search_spectrum(table_folder, stream, pair, _exclude, batch_size=700)
        expected, _ = histogram(table.masses, table.stream_bits, stream, pair, ~exclude)
        np.testing.assert_array_equal(counts, expected)
        assert 0 < counts.sum() < histogram(table.masses, table.stream_bits, stream, pair)[0].sum()


def test_an_event_counted_twice_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    columns = _columns(rng, 200, 0)
    columns["key"][:2] = 10  # kept: not excluded
    columns["T1"][:2] = True
    columns["score"][:2] = 9.0
    path = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pydict(columns, event_table_schema(with_score=True)), path)
    with pytest.raises(InvalidInputError, match="appear more than once"):
        rank_streams(path, 50, _exclude)
    unscored = tmp_path / "unscored.parquet"
    pq.write_table(pa.Table.from_pydict(columns).drop_columns(["score", "training"]), unscored)
    with pytest.raises(InvalidInputError, match="has no column 'score' \\(it is not scored"):
        rank_streams(unscored, 50, _exclude)
    assert len(SPECTRUM_NAMES) == 63


def test_an_empty_table_has_empty_regions(tmp_path):
    path = tmp_path / "events.parquet"
    empty = {name: [] for name in event_table_schema(with_score=True).names}
    pq.write_table(pa.Table.from_pydict(empty, event_table_schema(with_score=True)), path)
    ranking = rank_streams(path, 10, _exclude)
    region = ranking.regions(1.0, LUMI_PB)
    assert region.n_pass == (0,) * len(STREAMS) and all(region.whole_stream)
    (counts,) = points_spectra(path, ranking, [region], _exclude)
    assert counts.shape == (63, mass_bin_edges().size - 1) and counts.sum() == 0


def test_a_part_with_other_columns_is_named(tmp_path):
    """A table whose second part lacks the score column: reading it whole or in batches
    names that part."""
    folder = tmp_path / "events"
    folder.mkdir()
    rng = np.random.default_rng(4)
    scored = pa.Table.from_pydict(_columns(rng, 50, 0), event_table_schema(with_score=True))
    pq.write_table(scored, folder / "part-00000.parquet")
    pq.write_table(scored.drop_columns(["score", "training"]), folder / "part-00001.parquet")
    commit_table_parts(folder, ["part-00000.parquet", "part-00001.parquet"], {"scored": True})
    for read in (read_event_table, lambda path: list(iter_table_columns(path, ["key"]))):
        with pytest.raises(InvalidInputError, match=r"part .*part-00001\.parquet of event table"):
            read(folder)
