"""The cached event table: one Parquet row per event with its streams, masses and score.

One pass over the events writes it (chunk by chunk, one row group per chunk, so memory is
bounded by the chunk size); every anomaly-region threshold afterwards is a cut on this
table, never a re-read of the ROOT files. Columns: `event`, `run`, `weight`, the stream bits
`T1`..`T7` (bool), the masses `m_jj`..`m_bg` in GeV (NaN where the pair does not exist) and,
once the autoencoder has run, `score` (ln of the reconstruction error).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import InputFileError, InvalidInputError
from core.masses import (
    DEFAULT_STREAM_REQUIREMENTS,
    PAIRS,
    STREAM_FIT_FROM_GEV,
    STREAM_LABELS,
    STREAMS,
    Spectra,
    StreamRequirements,
    all_spectra,
    leading_pair_masses,
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
    "TableSpectra",
    "add_score_column",
    "chunk_columns",
    "event_table_schema",
    "iter_event_table",
    "read_event_table",
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

_ID_COLUMNS: Final = ("event", "run", "weight")


def event_table_schema(*, with_score: bool = False) -> pa.Schema:
    """Arrow schema of the event table, with or without the `score` column."""
    fields = [
        pa.field("event", pa.int64(), nullable=False),
        pa.field("run", pa.int64(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
        *(pa.field(stream, pa.bool_(), nullable=False) for stream in STREAMS),
        *(pa.field(column, pa.float64(), nullable=False) for column in MASS_COLUMNS),
    ]
    if with_score:
        fields.append(pa.field(SCORE_COLUMN, pa.float64(), nullable=False))
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
) -> pa.Table:
    """The event-table rows of one chunk (streams, masses and, if `score` is given, scores)."""
    check_kinematics(chunk)
    bits = stream_bits(chunk, requirements, validate=False)
    masses = leading_pair_masses(chunk, validate=False)
    columns: dict[str, Any] = {
        "event": np.asarray(chunk.event, dtype=np.int64),
        "run": np.asarray(chunk.run, dtype=np.int64),
        "weight": np.asarray(chunk.weight, dtype=np.float64),
    }
    columns.update({stream: bits[:, k] for k, stream in enumerate(STREAMS)})
    columns.update({column: masses[:, k] for k, column in enumerate(MASS_COLUMNS)})
    if score is not None:
        where = f"scores of the chunk at entry {chunk.entry_start} of {chunk.source or 'input'}"
        columns[SCORE_COLUMN] = _checked_scores(score(chunk), len(chunk), where)
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


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda advance: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
) -> EventTableSummary:
    """Write the event table of all `chunks` (e.g. from `iterate_events`) to Parquet at `path`.

    One row group per chunk: memory is bounded by the chunk size. `score(chunk)` fills the
    `score` column in the same pass when given. The file appears only when complete.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise InvalidInputError(
            f"cannot write the event table to {target}: folder {target.parent} does not exist"
        )
    partial = _temporary_path(target)
    schema = event_table_schema(with_score=score is not None)
    stream_counts = dict.fromkeys(STREAMS, 0)
    n_events = n_chunks = 0
    try:
        with (
            pq.ParquetWriter(partial, schema) as writer,
            _progress_bar(progress, total_events) as advance,
        ):
            for chunk in chunks:
                rows = chunk_columns(chunk, score=score, requirements=requirements)
                writer.write_table(rows)
                for stream in STREAMS:
                    stream_counts[stream] += int(np.count_nonzero(rows[stream].to_numpy()))
                n_events += len(chunk)
                n_chunks += 1
                advance(len(chunk))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
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

    def __len__(self) -> int:
        return len(self.event)

    def spectra(self, mask: BoolArray | None = None) -> Spectra:
        """The 63 spectra of the events in `mask` (all events if None)."""
        return all_spectra(self.masses, self.stream_bits, mask)


PART_GLOB: Final = "part-*.parquet"
"""Parts of a partitioned event table (a folder written by the parallel event pass)."""


def table_parts(path: str | Path) -> list[Path]:
    """The Parquet files of an event table: the file itself, or a folder's parts in order."""
    source = Path(path)
    if source.is_dir():
        parts = sorted(source.glob(PART_GLOB))
        if not parts:
            raise InputFileError(
                f"event table folder {source} holds no {PART_GLOB} files; run the event pass"
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
    parts = [_open_file(p) for p in table_parts(path)]
    first = parts[0].schema_arrow.names
    for part, source in zip(parts[1:], table_parts(path)[1:], strict=True):
        if part.schema_arrow.names != first:
            raise InvalidInputError(
                f"part {source} of event table {path} has columns {part.schema_arrow.names}, "
                f"unlike the first part ({first}); rerun the event pass"
            )
    return parts


def _as_event_table(batch: pa.Table | pa.RecordBatch) -> EventTable:
    def column(name: str) -> npt.NDArray[Any]:
        return np.asarray(batch.column(name).to_numpy(zero_copy_only=False))

    n = batch.num_rows
    bits = np.column_stack([column(s) for s in STREAMS]) if n else np.zeros((0, len(STREAMS)))
    masses = np.column_stack([column(c) for c in MASS_COLUMNS]) if n else np.zeros((0, 9))
    has_score = SCORE_COLUMN in batch.schema.names
    return EventTable(
        event=column("event").astype(np.int64),
        run=column("run").astype(np.int64),
        weight=column("weight").astype(np.float64),
        stream_bits=np.asarray(bits, dtype=np.bool_).reshape(n, len(STREAMS)),
        masses=np.asarray(masses, dtype=np.float64).reshape(n, len(MASS_COLUMNS)),
        score=column(SCORE_COLUMN).astype(np.float64) if has_score else None,
    )


def read_event_table(path: str | Path) -> EventTable:
    """Read a whole event table into arrays (about 100 bytes per event)."""
    tables = [part.read().replace_schema_metadata(None) for part in _open(path)]
    return _as_event_table(pa.concat_tables(tables))


def iter_event_table(path: str | Path, batch_size: int = 1_000_000) -> Iterator[EventTable]:
    """Read an event table in batches of at most `batch_size` rows (bounded memory)."""
    if batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive number of rows, got {batch_size}")
    for parquet in _open(path):
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield _as_event_table(batch)


def _rewrite_with_scores(parquet: pq.ParquetFile, values: FloatArray, target: Path) -> None:
    partial = _temporary_path(target)
    try:
        with pq.ParquetWriter(partial, event_table_schema(with_score=True)) as writer:
            start = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group).replace_schema_metadata(None)
                if SCORE_COLUMN in rows.schema.names:
                    rows = rows.drop_columns([SCORE_COLUMN])
                stop = start + rows.num_rows
                rows = rows.append_column(SCORE_COLUMN, pa.array(values[start:stop]))
                writer.write_table(rows.cast(event_table_schema(with_score=True)))
                start = stop
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def add_score_column(
    path: str | Path, scores: npt.ArrayLike, *, output: str | Path | None = None
) -> Path:
    """Add or replace the `score` column (one finite score per row, in row order).

    Rewrites the table (every part of a folder) row group by row group into `output`
    (default: in place, each file atomically).
    """
    parts = _open(path)
    sources = table_parts(path)
    n_rows = sum(part.metadata.num_rows for part in parts)
    values = _checked_scores(scores, n_rows, f"add_score_column({path})")
    target = Path(output) if output is not None else Path(path)
    if Path(path).is_dir():
        target.mkdir(parents=True, exist_ok=True)
        targets = [target / source.name for source in sources]
    else:
        targets = [target]
    start = 0
    for part, destination in zip(parts, targets, strict=True):
        stop = start + part.metadata.num_rows
        _rewrite_with_scores(part, values[start:stop], destination)
        start = stop
    return target


@dataclass(frozen=True)
class TableSpectra:
    """The 63 spectra of an event table after a score cut, with the event counts."""

    spectra: Spectra
    n_events: int
    n_selected: int
    score_min: float | None


def table_spectra(
    path: str | Path, score_min: float | None = None, *, batch_size: int = 1_000_000
) -> TableSpectra:
    """Fill the 63 spectra from an event table, keeping events with score > `score_min`.

    All events are kept when `score_min` is None. Reads in batches (bounded memory).
    """
    if score_min is not None and math.isnan(score_min):
        raise InvalidInputError("score_min is NaN; give a number or None for no score cut")
    parquet = _open(path)[0]
    if score_min is not None and SCORE_COLUMN not in parquet.schema_arrow.names:
        raise InvalidInputError(
            f"event table {path} has no score column, so score_min={score_min} can not be "
            "applied; score the events first (add_score_column)"
        )
    total: Spectra | None = None
    n_events = n_selected = 0
    for table in iter_event_table(path, batch_size):
        mask = None
        if score_min is not None and table.score is not None:
            mask = table.score > score_min
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
