"""The Parquet event table: one pass writes it, cuts and spectra read it back exactly."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import InputFileError, InvalidInputError
from core.masses import PAIRS, STREAMS, all_spectra, leading_pair_masses, stream_bits
from core.objects import OBJECT_TYPES, EventChunk, make_collection
from core.table import (
    MASS_COLUMNS,
    SCORE_COLUMN,
    add_score_column,
    event_table_schema,
    iter_event_table,
    iter_table_columns,
    read_event_table,
    read_table_columns,
    region_spectra,
    score_histograms,
    table_spectra,
    write_event_table,
)


def random_chunk(n, seed, first_event=0):
    """Seeded events with every object type, masses in the search range."""
    rng = np.random.default_rng(seed)
    collections = {}
    for name, mean in zip(OBJECT_TYPES, (3.0, 0.8, 0.6, 0.6, 0.5), strict=True):
        counts = rng.poisson(mean, n)
        total = int(counts.sum())

        def jagged(values, counts=counts):
            return ak.unflatten(values, counts)

        collections[name] = make_collection(
            jagged(30 + rng.pareto(2.0, total) * 100),
            jagged(rng.uniform(-2.4, 2.4, total)),
            jagged(rng.uniform(-np.pi, np.pi, total)),
            jagged(rng.uniform(0, 20, total)),
        )
    met = rng.exponential(80.0, n)
    return EventChunk(
        **collections,
        met_pt=np.where(met < 30, 0.0, met),
        met_phi=rng.uniform(-np.pi, np.pi, n),
        run=np.full(n, 7, dtype=np.int64),
        event=np.arange(first_event, first_event + n, dtype=np.int64),
        weight=rng.uniform(0.5, 1.5, n),
    )


@pytest.fixture(scope="module")
def chunks():
    return [random_chunk(3000, 1, 0), random_chunk(2500, 2, 3000), random_chunk(1000, 3, 5500)]


def test_table_holds_ids_streams_and_masses_of_every_chunk(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    summary = write_event_table(iter(chunks), path)
    assert summary.path == path
    assert summary.n_events == 6500
    assert summary.n_chunks == 3
    assert not summary.has_score
    table = read_event_table(path)
    assert len(table) == 6500
    np.testing.assert_array_equal(table.event, np.arange(6500))
    np.testing.assert_array_equal(table.run, 7)
    np.testing.assert_array_equal(table.weight, np.concatenate([c.weight for c in chunks]))
    bits = np.concatenate([stream_bits(c) for c in chunks])
    masses = np.concatenate([leading_pair_masses(c) for c in chunks])
    np.testing.assert_array_equal(table.stream_bits, bits)
    np.testing.assert_array_equal(table.masses, masses)  # NaN where the pair is absent
    assert table.score is None
    assert summary.stream_counts == {s: int(bits[:, k].sum()) for k, s in enumerate(STREAMS)}
    assert all(count > 0 for count in summary.stream_counts.values())


def _none(n):
    return np.zeros(n, dtype=bool)


def _no_training(keys):
    return np.zeros(len(keys), dtype=bool)


def test_columns_names_and_types(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks[:1], path)
    schema = pq.read_schema(path)
    assert schema.names == [
        "event",
        "run",
        "weight",
        "lumi_block",
        "source_id",
        "key",
        *STREAMS,
        "m_jj",
        "m_jb",
        "m_bb",
        "m_je",
        "m_be",
        "m_jm",
        "m_bm",
        "m_jg",
        "m_bg",
    ]
    assert tuple(f"m_{p}" for p in PAIRS) == MASS_COLUMNS
    assert schema.field("T3").type == pa.bool_()
    assert schema.field("m_jm").type == pa.float64()
    assert schema.field("event").type == pa.int64()
    assert event_table_schema(with_score=True).names[-2:] == [SCORE_COLUMN, "training"]


def test_writer_streams_one_row_group_per_chunk_without_keeping_chunks(tmp_path):
    alive = []

    def generate():
        for index in range(4):
            chunk = random_chunk(500, 10 + index, 500 * index)
            alive.append(weakref.ref(chunk.met_pt))
            yield chunk
            gc.collect()
            # every chunk but the one just written has been released by the writer
            assert sum(ref() is not None for ref in alive[:-1]) == 0

    path = tmp_path / "streamed.parquet"
    write_event_table(generate(), path)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 4
    assert [metadata.row_group(k).num_rows for k in range(4)] == [500] * 4


def test_score_function_fills_the_score_column_in_the_same_pass(chunks, tmp_path):
    path = tmp_path / "scored.parquet"
    summary = write_event_table(
        chunks, path, score=lambda chunk: chunk.met_pt / 100.0, training=_no_training
    )
    assert summary.has_score
    table = read_event_table(path)
    np.testing.assert_array_equal(table.score, np.concatenate([c.met_pt for c in chunks]) / 100)


def test_progress_bar_runs_and_counts_every_event(chunks, tmp_path, capsys):
    summary = write_event_table(chunks, tmp_path / "p.parquet", progress=True, total_events=6500)
    assert summary.n_events == 6500
    assert "event table" in capsys.readouterr().err


def test_add_score_column_adds_then_replaces(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    scores = np.linspace(-5.0, 5.0, 6500)
    assert add_score_column(path, scores, _none(6500)) == path
    np.testing.assert_array_equal(read_event_table(path).score, scores)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    other = tmp_path / "rescored.parquet"
    add_score_column(path, -scores, _none(6500), output=other)
    np.testing.assert_array_equal(read_event_table(other).score, -scores)
    np.testing.assert_array_equal(read_event_table(path).score, scores)  # input untouched
    np.testing.assert_array_equal(read_event_table(other).masses, read_event_table(path).masses)


@pytest.mark.parametrize(
    ("scores", "message"),
    [(np.zeros(10), "expected 6500 anomaly scores"), (np.full(6500, np.nan), "row 0 is nan")],
)
def test_add_score_column_rejects_wrong_scores(chunks, tmp_path, scores, message):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    with pytest.raises(InvalidInputError, match=message):
        add_score_column(path, scores, _none(len(scores)))
    assert read_event_table(path).score is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet"]


def test_bad_score_function_output_is_rejected(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    with pytest.raises(InvalidInputError, match="expected 3000 anomaly scores"):
        write_event_table(chunks, path, score=lambda chunk: np.zeros(3), training=_no_training)
    assert not list(tmp_path.iterdir())  # no partial file is left behind


def test_failed_pass_leaves_no_table(chunks, tmp_path):
    bad = replace(chunks[1], met_pt=np.full(len(chunks[1]), np.nan))
    path = tmp_path / "events.parquet"
    with pytest.raises(InvalidInputError, match=r"event 3000 .*met_pt = nan"):
        write_event_table([chunks[0], bad], path)
    assert not list(tmp_path.iterdir())


def test_writer_needs_an_existing_folder(chunks, tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        write_event_table(chunks, tmp_path / "missing" / "events.parquet")


def test_iterating_in_batches_gives_the_same_rows(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    batches = list(iter_event_table(path, batch_size=1000))
    assert all(len(batch) <= 1000 for batch in batches)
    np.testing.assert_array_equal(
        np.concatenate([b.masses for b in batches]), read_event_table(path).masses
    )
    with pytest.raises(InvalidInputError, match="batch_size"):
        next(iter_event_table(path, batch_size=0))


def test_table_spectra_equal_a_cut_on_the_arrays(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    scores = np.random.default_rng(4).normal(size=6500)
    add_score_column(path, scores, _none(6500))
    masses = np.concatenate([leading_pair_masses(c) for c in chunks])
    bits = np.concatenate([stream_bits(c) for c in chunks])
    result = table_spectra(path, score_min=0.5, batch_size=700)
    expected = all_spectra(masses, bits, scores > 0.5)
    np.testing.assert_array_equal(result.spectra.counts, expected.counts)
    assert result.n_events == 6500
    assert result.n_selected == int((scores > 0.5).sum())
    everything = table_spectra(path)
    np.testing.assert_array_equal(everything.spectra.counts, all_spectra(masses, bits).counts)
    assert everything.n_selected == 6500
    assert everything.spectra.counts.sum() > result.spectra.counts.sum() > 0


def test_region_spectra_cut_each_stream_by_its_own_mask(chunks, tmp_path):
    """Spectrum STREAM/PAIR counts the events of its stream's mask column only: with every
    event in T1's region and none in the others', T1's spectra are the unmasked ones."""
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    table = read_event_table(path)
    masks = np.zeros((len(table), len(STREAMS)), dtype=bool)
    masks[:, 0] = True
    masks[::2, 1] = True
    edges, counts = region_spectra(table, masks)
    everything = all_spectra(table.masses, table.stream_bits)
    half = all_spectra(table.masses, table.stream_bits, masks[:, 1])
    n_pairs = len(PAIRS)
    assert counts.shape == everything.counts.shape
    np.testing.assert_array_equal(edges, everything.edges)
    np.testing.assert_array_equal(counts[:n_pairs], everything.counts[:n_pairs])
    np.testing.assert_array_equal(counts[n_pairs : 2 * n_pairs], half.counts[n_pairs : 2 * n_pairs])
    assert counts[2 * n_pairs :].sum() == 0 < counts[:n_pairs].sum()


def test_score_cut_needs_a_score_column(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    with pytest.raises(InvalidInputError, match="has no score column"):
        table_spectra(path, score_min=0.0)
    with pytest.raises(InvalidInputError, match="score_min is nan"):
        table_spectra(path, score_min=float("nan"))


def test_missing_unreadable_and_foreign_tables_are_rejected(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        read_event_table(tmp_path / "nothing.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(InputFileError, match="not a readable Parquet file"):
        read_event_table(garbage)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"event": [1, 2], "x": [0.1, 0.2]}), foreign)
    with pytest.raises(InvalidInputError, match="not an anomscan event table"):
        table_spectra(foreign)


def test_empty_input_writes_an_empty_table(tmp_path):
    path = tmp_path / "empty.parquet"
    summary = write_event_table([], path)
    assert summary.n_events == 0
    assert len(read_event_table(path)) == 0
    assert table_spectra(path).spectra.counts.shape == (63, 178)


def test_score_histograms_and_columns_read_in_batches_equal_the_whole_table(chunks, tmp_path):
    path = tmp_path / "events.parquet"
    write_event_table(chunks, path)
    scores = np.random.default_rng(8).normal(size=6500)
    add_score_column(path, scores, _none(6500))
    table = read_event_table(path)
    histograms = score_histograms(path, n_bins=20, batch_size=700)
    in_a_stream = scores[table.stream_bits.any(axis=1)]
    assert in_a_stream.size < scores.size, "events in no stream must not set the range"
    assert histograms.edges[0] == in_a_stream.min()
    assert histograms.edges[-1] == in_a_stream.max() + 1
    for k, stream in enumerate(STREAMS):
        expected, _ = np.histogram(scores[table.stream_bits[:, k]], bins=histograms.edges)
        np.testing.assert_array_equal(histograms.counts[stream], expected)
    assert sum(int(c.sum()) for c in histograms.counts.values()) > 0
    keys = np.concatenate([b["key"] for b in iter_table_columns(path, ["key"], batch_size=700)])
    np.testing.assert_array_equal(keys, table.keys())
    with pytest.raises(InvalidInputError, match="has no column 'm_xx'"):
        next(iter_table_columns(path, ["key", "m_xx"]))
    columns = read_table_columns(path, ["score", "T3"])
    np.testing.assert_array_equal(columns["score"], scores)
    np.testing.assert_array_equal(columns["T3"], table.stream_bits[:, 2])


def test_the_columns_of_an_empty_table_are_empty_and_typed(tmp_path):
    path = tmp_path / "events.parquet"
    schema = event_table_schema(with_score=True)
    pq.write_table(pa.Table.from_pydict({name: [] for name in schema.names}, schema), path)
    columns = read_table_columns(path, ["key", "score", "T1"])
    assert [(c.size, c.dtype) for c in columns.values()] == [
        (0, np.int64),
        (0, np.float64),
        (0, np.bool_),
    ]
