"""The cached event table: one Parquet row per event with its streams, masses and score.

One pass over the events writes it (chunk by chunk, one row group per chunk, so memory is
bounded by the chunk size); every anomaly-region threshold afterwards is a cut on this
table, never a re-read of the ROOT files. Columns: `event`, `run`, `weight`, the stream bits
`T1`..`T7` (bool), the masses `m_jj`..`m_bg` in GeV (NaN where the pair does not exist),
the identity `lumi_block`, `source_id` (the input file) and `key` (`core.objects.event_keys`
of source, run, luminosity block and event: the one key of every join, tie-break and
training selection) and, once the autoencoder has run, `score` (ln of the reconstruction
error) with `training` (the event was one the autoencoder was trained on; every path from
scores to spectra leaves these out unless told otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from core.errors import InputFileError, InvalidInputError
from core.files import atomic_path, write_json
from core.masses import (
    DEFAULT_STREAM_REQUIREMENTS,
    PAIRS,
    STREAM_FIT_FROM_GEV,
    STREAM_LABELS,
    STREAMS,
    Spectra,
    StreamRequirements,
    all_spectra,
    histogram,
    leading_pair_masses,
    mass_bin_edges,
    stream_bits,
)
from core.objects import EventChunk
from core.rmm import check_kinematics

__all__ = [
    "MASS_COLUMNS",
    "SCORE_COLUMN",
    "STREAMS",
    "STREAM_FIT_FROM_GEV",
    "STREAM_LABELS",
    "EventTable",
    "EventTableSummary",
    "ScoreHistograms",
    "TableSpectra",
    "add_score_column",
    "chunk_columns",
    "event_table_schema",
    "iter_event_table",
    "iter_table_columns",
    "read_event_table",
    "region_spectra",
    "score_histograms",
    "table_is_scored",
    "table_spectra",
    "write_event_table",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ScoreFunction = Callable[[EventChunk], npt.NDArray[np.floating]]

MASS_COLUMNS: Final = tuple(f"m_{pair}" for pair in PAIRS)
"""Mass columns (GeV) in `PAIRS` order: m_jj, m_jb, m_bb, m_je, m_be, m_jm, m_bm, m_jg, m_bg."""

SCORE_COLUMN: Final = "score"
"""The anomaly-score column, present once the autoencoder has scored the events."""

TRAINING_COLUMN: Final = "training"
"""True for the events the autoencoder was trained on; written together with `score`."""

_ID_COLUMNS: Final = ("event", "run", "weight", "lumi_block", "source_id", "key")
TrainingFunction = Callable[[IntArray], BoolArray]


def event_table_schema(*, with_score: bool = False) -> pa.Schema:
    """Arrow schema of the event table, with or without the `score` column."""
    fields = [
        pa.field("event", pa.int64(), nullable=False),
        pa.field("run", pa.int64(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("lumi_block", pa.int64(), nullable=False),
        pa.field("source_id", pa.int64(), nullable=False),
        pa.field("key", pa.int64(), nullable=False),
        *(pa.field(stream, pa.bool_(), nullable=False) for stream in STREAMS),
        *(pa.field(column, pa.float64(), nullable=False) for column in MASS_COLUMNS),
    ]
    if with_score:
        fields.append(pa.field(SCORE_COLUMN, pa.float64(), nullable=False))
        fields.append(pa.field(TRAINING_COLUMN, pa.bool_(), nullable=False))
    return pa.schema(fields)


def _checked_scores(scores: npt.ArrayLike, n_events: int, where: str) -> FloatArray:
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (n_events,):
        raise InvalidInputError(
            f"{where}: expected {n_events} anomaly scores (one per event), found shape "
            f"{values.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InvalidInputError(
            f"{where}: score of row {int(bad[0])} is {values[bad[0]]}; expected finite scores; "
            "check the autoencoder output"
        )
    return values


def chunk_columns(
    chunk: EventChunk,
    *,
    score: ScoreFunction | None = None,
    requirements: StreamRequirements = DEFAULT_STREAM_REQUIREMENTS,
    training: TrainingFunction | None = None,
) -> pa.Table:
    """The event-table rows of one chunk (streams, masses and, if `score` is given, scores).

    With `score`, `training(keys)` must say which events the autoencoder was trained on.
    """
    check_kinematics(chunk)
    bits = stream_bits(chunk, requirements, validate=False)
    masses = leading_pair_masses(chunk, validate=False)
    keys = chunk.keys()
    columns: dict[str, Any] = {
        "event": np.asarray(chunk.event, dtype=np.int64),
        "run": np.asarray(chunk.run, dtype=np.int64),
        "weight": np.asarray(chunk.weight, dtype=np.float64),
        "lumi_block": (
            np.zeros(len(chunk), dtype=np.int64)
            if chunk.lumi_block is None
            else np.asarray(chunk.lumi_block, dtype=np.int64)
        ),
        "source_id": np.full(len(chunk), chunk.source_id, dtype=np.int64),
        "key": keys,
    }
    columns.update({stream: bits[:, k] for k, stream in enumerate(STREAMS)})
    columns.update({column: masses[:, k] for k, column in enumerate(MASS_COLUMNS)})
    if score is not None:
        if training is None:
            raise InvalidInputError(
                "scores go into the event table together with the training flag: pass "
                "training= (the model card's training_selection)"
            )
        where = f"scores of the chunk at entry {chunk.entry_start} of {chunk.source or 'input'}"
        columns[SCORE_COLUMN] = _checked_scores(score(chunk), len(chunk), where)
        columns[TRAINING_COLUMN] = np.asarray(training(keys), dtype=np.bool_)
    schema = event_table_schema(with_score=score is not None)
    return pa.Table.from_pydict(columns, schema=schema)


@dataclass(frozen=True)
class EventTableSummary:
    """What `write_event_table` wrote: the file, events, row groups and events per stream."""

    path: Path
    n_events: int
    n_chunks: int
    stream_counts: Mapping[str, int]
    has_score: bool


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda advance: None
        return
    with Progress(
        TextColumn("event table"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("events", total=total)
        yield lambda advance: progress.advance(task, advance)


def write_event_table(
    chunks: Iterable[EventChunk],
    path: str | Path,
    *,
    score: ScoreFunction | None = None,
    progress: bool = False,
    total_events: int | None = None,
    requirements: StreamRequirements = DEFAULT_STREAM_REQUIREMENTS,
    training: TrainingFunction | None = None,
) -> EventTableSummary:
    """Write the event table of all `chunks` (e.g. from `iterate_events`) to Parquet at `path`.

    One row group per chunk: memory is bounded by the chunk size. `score(chunk)` fills the
    `score` column in the same pass when given. The file appears only when complete.
    """
    target = Path(path)
    schema = event_table_schema(with_score=score is not None)
    stream_counts = dict.fromkeys(STREAMS, 0)
    n_events = n_chunks = 0
    with (
        atomic_path(target, what="event table") as partial,
        pq.ParquetWriter(partial, schema) as writer,
        _progress_bar(progress, total_events) as advance,
    ):
        for chunk in chunks:
            rows = chunk_columns(chunk, score=score, requirements=requirements, training=training)
            writer.write_table(rows)
            for stream in STREAMS:
                stream_counts[stream] += int(np.count_nonzero(rows[stream].to_numpy()))
            n_events += len(chunk)
            n_chunks += 1
            advance(len(chunk))
    return EventTableSummary(target, n_events, n_chunks, stream_counts, score is not None)


@dataclass(frozen=True)
class EventTable:
    """Columns of an event table as arrays: ids, weights, stream bits (n, 7), masses (n, 9) GeV.

    `score` is None when the table has not been scored yet.
    """

    event: IntArray
    run: IntArray
    weight: FloatArray
    stream_bits: BoolArray
    masses: FloatArray
    score: FloatArray | None
    lumi_block: IntArray | None = None
    source_id: IntArray | None = None
    key: IntArray | None = None
    """The identity of each event (`core.objects.event_keys`); always set when read."""
    training: BoolArray | None = None
    """Events the autoencoder was trained on (set with `score`)."""

    def keys(self) -> IntArray:
        """The identity key of every row."""
        if self.key is None:
            raise InvalidInputError("this event table carries no event keys; rewrite it")
        return self.key

    def search_mask(self, include_training: bool = False) -> BoolArray:
        """Rows that may enter an anomaly region: all but the training events by default."""
        if include_training or self.training is None:
            return np.ones(len(self), dtype=np.bool_)
        return ~self.training

    def __len__(self) -> int:
        return len(self.event)

    def spectra(self, mask: BoolArray | None = None) -> Spectra:
        """The 63 spectra of the events in `mask` (all events if None)."""
        return all_spectra(self.masses, self.stream_bits, mask)


def region_spectra(table: EventTable, masks: BoolArray) -> tuple[FloatArray, IntArray]:
    """The 63 spectra of the per-stream anomaly regions `masks` (n, 7): edges (GeV), counts.

    Spectrum STREAM/PAIR (in `SPECTRUM_NAMES` order) counts the events of column k = STREAM
    of `masks` with the pair's mass on `mass_bin_edges()`; counts has shape (63, n_bins).
    """
    counts = [
        histogram(table.masses, table.stream_bits, stream, pair, masks[:, k])[0]
        for k, stream in enumerate(STREAMS)
        for pair in PAIRS
    ]
    return mass_bin_edges(), np.array(counts, dtype=np.int64)


PART_GLOB: Final = "part-*.parquet"
"""Parts of a partitioned event table (a folder written by the parallel event pass)."""

TABLE_MANIFEST: Final = "table.json"
"""The commit record of a partitioned table: the parts it is made of, in order, written last.

A folder is read through it only: parts left by another or an unfinished pass are never
read, and a folder without it is an unfinished table.
"""


def commit_table_parts(folder: str | Path, parts: Sequence[str], info: Mapping[str, Any]) -> Path:
    """Record `parts` (file names in `folder`, in order) as the table; atomic, written last."""
    target = Path(folder)
    missing = [name for name in parts if not (target / name).is_file()]
    if missing:
        raise InputFileError(f"event table {target}: parts {missing[:3]} are missing; rerun")
    return write_json(
        target / TABLE_MANIFEST, {"parts": list(parts), **dict(info)}, what="table manifest"
    )


def table_parts(path: str | Path) -> list[Path]:
    """The Parquet files of an event table: the file itself, or a folder's committed parts."""
    source = Path(path)
    if source.is_dir():
        record = source / TABLE_MANIFEST
        if not record.is_file():
            raise InputFileError(
                f"event table folder {source} has no {TABLE_MANIFEST}: the event pass that "
                "writes it did not finish; rerun it"
            )
        try:
            names = json.loads(record.read_text(encoding="utf-8"))["parts"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputFileError(
                f"{record} is not a table manifest ({error}); rerun the event pass"
            ) from error
        parts = [source / str(name) for name in names]
        missing = [p.name for p in parts if not p.is_file()]
        if missing or not parts:
            raise InputFileError(
                f"event table folder {source} lacks parts {missing[:3]} named in "
                f"{TABLE_MANIFEST}; rerun the event pass"
            )
        return parts
    if not source.is_file():
        raise InputFileError(
            f"event table {source} does not exist; write it with write_event_table first"
        )
    return [source]


def _open_file(source: Path) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputFileError(
            f"event table {source} is not a readable Parquet file ({error}); rewrite it"
        ) from error
    names = set(parquet.schema_arrow.names)
    missing = [c for c in (*_ID_COLUMNS, *STREAMS, *MASS_COLUMNS) if c not in names]
    if missing:
        raise InvalidInputError(
            f"{source} is not an anomscan event table: columns {missing} are missing "
            f"(found {sorted(names)}); write it with write_event_table"
        )
    return parquet


def _open(path: str | Path) -> list[pq.ParquetFile]:
    """Every part of the table, checked to be event tables with the same columns."""
    sources = table_parts(path)
    parts = [_open_file(p) for p in sources]
    for part, source in zip(parts, sources, strict=True):
        _check_columns(part, parts[0], source, path)
    return parts


def _check_columns(
    part: pq.ParquetFile, first: pq.ParquetFile, source: Path, path: str | Path
) -> None:
    """InvalidInputError unless `part` (file `source`) has the columns of the first part."""
    if part.schema_arrow.names != first.schema_arrow.names:
        raise InvalidInputError(
            f"part {source} of event table {path} has columns {part.schema_arrow.names}, "
            f"unlike the first part ({first.schema_arrow.names}); rerun the event pass"
        )


def _as_event_table(batch: pa.Table | pa.RecordBatch) -> EventTable:
    def column(name: str) -> npt.NDArray[Any]:
        return np.asarray(batch.column(name).to_numpy(zero_copy_only=False))

    n = batch.num_rows
    bits = np.column_stack([column(s) for s in STREAMS]) if n else np.zeros((0, len(STREAMS)))
    masses = np.column_stack([column(c) for c in MASS_COLUMNS]) if n else np.zeros((0, 9))
    has_score = SCORE_COLUMN in batch.schema.names
    if has_score and TRAINING_COLUMN not in batch.schema.names:
        raise InvalidInputError(
            "the event table has scores but no training column, so the autoencoder's "
            "training events can not be left out; rescore it with score_events"
        )
    return EventTable(
        event=column("event").astype(np.int64),
        run=column("run").astype(np.int64),
        weight=column("weight").astype(np.float64),
        stream_bits=np.asarray(bits, dtype=np.bool_).reshape(n, len(STREAMS)),
        masses=np.asarray(masses, dtype=np.float64).reshape(n, len(MASS_COLUMNS)),
        score=column(SCORE_COLUMN).astype(np.float64) if has_score else None,
        lumi_block=column("lumi_block").astype(np.int64),
        source_id=column("source_id").astype(np.int64),
        key=column("key").astype(np.int64),
        training=column(TRAINING_COLUMN).astype(np.bool_) if has_score else None,
    )


def refuse_duplicate_events(keys: IntArray, where: str) -> None:
    """InvalidInputError when two rows carry the same event key (an event counted twice)."""
    ordered = np.sort(keys)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        raise InvalidInputError(
            f"{where}: {repeated.size} events appear more than once (same source file, run, "
            "luminosity block and event); an input was read twice: rebuild it from distinct files"
        )


def _each_part(path: str | Path) -> Iterator[tuple[pq.ParquetFile, Path]]:
    """Every part of the table, checked, each opened in turn and closed when done.

    A part is let go once read: a ParquetFile keeps the pages it has read buffered until it
    is closed, so holding every part open while reading one after another would keep the
    whole table in memory.
    """
    sources = table_parts(path)
    with _open_file(sources[0]) as first:
        for source in sources:
            with _open_file(source) as parquet:
                _check_columns(parquet, first, source, path)
                yield parquet, source


def read_event_table(path: str | Path) -> EventTable:
    """Read a whole event table into arrays (about 100 bytes per event)."""
    tables = [part.read().replace_schema_metadata(None) for part in _open(path)]
    table = _as_event_table(pa.concat_tables(tables))
    refuse_duplicate_events(table.keys(), f"event table {path}")
    return table


def iter_event_table(path: str | Path, batch_size: int = 1_000_000) -> Iterator[EventTable]:
    """Read an event table in batches of at most `batch_size` rows (bounded memory)."""
    if batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive number of rows, got {batch_size}")
    for parquet, _ in _each_part(path):
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield _as_event_table(batch)


def iter_table_columns(
    path: str | Path, columns: Sequence[str], batch_size: int = 1_000_000
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    """The named columns of an event table in batches of at most `batch_size` rows.

    Reads those columns alone (bounded memory, a few bytes per event and column); a column
    the table lacks is an InvalidInputError naming it.
    """
    if batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive number of rows, got {batch_size}")
    for parquet, source in _each_part(path):
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise InvalidInputError(
                f"event table {source} has no column {missing[0]!r}"
                + (
                    " (it is not scored: run the scored event pass)"
                    if SCORE_COLUMN in missing
                    else "; rewrite it with write_event_table"
                )
            )
        for batch in parquet.iter_batches(batch_size=batch_size, columns=list(columns)):
            yield {
                name: np.asarray(batch.column(name).to_numpy(zero_copy_only=False))
                for name in columns
            }


def read_table_columns(path: str | Path, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The named columns of every row of an event table, and no other column."""
    batches = list(iter_table_columns(path, columns))
    if not batches:
        empty = event_table_schema(with_score=True).empty_table()
        return {name: np.asarray(empty.column(name).to_numpy()) for name in columns}
    return {name: np.concatenate([batch[name] for batch in batches]) for name in columns}


@dataclass(frozen=True)
class ScoreHistograms:
    """Per stream, the histogram of its events' anomaly scores on common `edges`."""

    edges: FloatArray
    counts: Mapping[str, IntArray]


def table_is_scored(path: str | Path) -> bool:
    """Whether the event table at `path` has its score column."""
    return SCORE_COLUMN in _open(path)[0].schema_arrow.names


def score_histograms(
    path: str | Path, n_bins: int = 59, batch_size: int = 1_000_000
) -> ScoreHistograms:
    """Histograms of the score per stream (training events included); two passes.

    The bins span the scores of the events in some stream: geometric when all are positive,
    else linear.
    """
    columns = [SCORE_COLUMN, *STREAMS]
    low, high = math.inf, -math.inf
    for batch in iter_table_columns(path, columns, batch_size):
        in_a_stream = np.logical_or.reduce([batch[stream] for stream in STREAMS])
        if in_a_stream.any():
            low = min(low, float(batch[SCORE_COLUMN][in_a_stream].min()))
            high = max(high, float(batch[SCORE_COLUMN][in_a_stream].max()))
    if not math.isfinite(low):
        low, high = 0.0, 1.0
    edges = (
        np.geomspace(low, high, n_bins + 1)
        if low > 0 and high > low
        else np.linspace(low, high + 1, n_bins + 1)
    )
    counts = {stream: np.zeros(n_bins, dtype=np.int64) for stream in STREAMS}
    for batch in iter_table_columns(path, columns, batch_size):
        for stream in STREAMS:
            counts[stream] += np.histogram(batch[SCORE_COLUMN][batch[stream]], bins=edges)[0]
    return ScoreHistograms(edges, counts)


def _rewrite_with_scores(
    parquet: pq.ParquetFile, values: FloatArray, training: BoolArray, target: Path
) -> None:
    schema = event_table_schema(with_score=True)
    with (
        atomic_path(target, what="event table") as partial,
        pq.ParquetWriter(partial, schema) as writer,
    ):
        start = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group).replace_schema_metadata(None)
            rows = rows.drop_columns(
                [c for c in (SCORE_COLUMN, TRAINING_COLUMN) if c in rows.schema.names]
            )
            stop = start + rows.num_rows
            rows = rows.append_column(SCORE_COLUMN, pa.array(values[start:stop]))
            rows = rows.append_column(TRAINING_COLUMN, pa.array(training[start:stop]))
            writer.write_table(rows.cast(schema))
            start = stop


def add_score_column(
    path: str | Path,
    scores: npt.ArrayLike,
    training: npt.ArrayLike,
    *,
    output: str | Path | None = None,
) -> Path:
    """Add or replace the `score` and `training` columns (one per row, in row order).

    `training` marks the events the autoencoder was trained on. Rewrites the table (every
    part of a folder) row group by row group into `output` (default: in place, each file
    atomically, the folder's manifest last).
    """
    sources = table_parts(path)
    n_rows = sum(part.metadata.num_rows for part in _open(path))
    values = _checked_scores(scores, n_rows, f"add_score_column({path})")
    flags = np.asarray(training)
    if flags.dtype != np.bool_ or flags.shape != (n_rows,):
        raise InvalidInputError(
            f"add_score_column({path}): training must be {n_rows} booleans (one per row), got "
            f"{flags.dtype} of shape {flags.shape}"
        )
    target = Path(output) if output is not None else Path(path)
    if Path(path).is_dir():
        target.mkdir(parents=True, exist_ok=True)
        targets = [target / source.name for source in sources]
    else:
        targets = [target]
    start = 0
    for (part, _), destination in zip(_each_part(path), targets, strict=True):
        stop = start + part.metadata.num_rows
        _rewrite_with_scores(part, values[start:stop], flags[start:stop], destination)
        start = stop
    if Path(path).is_dir():
        commit_table_parts(target, [t.name for t in targets], {"scored": True})
    return target


@dataclass(frozen=True)
class TableSpectra:
    """The 63 spectra of an event table after a score cut, with the event counts."""

    spectra: Spectra
    n_events: int
    n_selected: int
    score_min: float | None


def table_spectra(
    path: str | Path,
    score_min: float | None = None,
    *,
    batch_size: int = 1_000_000,
    include_training: bool = False,
) -> TableSpectra:
    """Fill the 63 spectra from an event table, keeping events with score > `score_min`.

    All events are kept when `score_min` is None. In a scored table the autoencoder's
    training events are left out (the same rows `anomaly_region` and the scan leave out)
    unless `include_training`. Reads in batches (bounded memory).
    """
    if score_min is not None and not math.isfinite(score_min):
        raise InvalidInputError(
            f"score_min is {score_min}; give a finite number, or None for no score cut"
        )
    parquet = _open(path)[0]
    if score_min is not None and SCORE_COLUMN not in parquet.schema_arrow.names:
        raise InvalidInputError(
            f"event table {path} has no score column, so score_min={score_min} can not be "
            "applied; score the events first (add_score_column)"
        )
    total: Spectra | None = None
    n_events = n_selected = 0
    for table in iter_event_table(path, batch_size):
        mask = None if table.training is None else table.search_mask(include_training)
        if score_min is not None and table.score is not None:
            mask = (table.score > score_min) & table.search_mask(include_training)
        spectra = table.spectra(mask)
        n_events += len(table)
        n_selected += len(table) if mask is None else int(np.count_nonzero(mask))
        total = (
            spectra
            if total is None
            else Spectra(total.names, total.counts + spectra.counts, total.edges)
        )
    if total is None:
        total = all_spectra(np.zeros((0, len(PAIRS))), np.zeros((0, len(STREAMS)), dtype=np.bool_))
    return TableSpectra(total, n_events, n_selected, score_min)
