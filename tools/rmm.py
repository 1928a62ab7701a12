"""Tools of the RMM issue: `compute_rmm` (NPZ), `event_table` (one pass to Parquet), `spectra`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import ConfigDict, Field, field_validator

from core.events import (
    SchemaName,
    add_counts,
    iterate_events,
    load_events,
    non_finite_note,
    plan_read,
)
from core.files import atomic_path, exclusive_output, make_parent_folder
from core.masses import SPECTRUM_NAMES, STREAMS
from core.objects import OBJECT_FIELDS, OBJECT_TYPES, EventChunk
from core.rmm import RMMLayout, rmm_features, rmm_matrices
from core.table import table_spectra, write_event_table
from tools.common import NonFiniteReport, StrictModel
from tools.registry import ChunkSize, FilePath, PathText, PositiveEventCount, SqrtSGeV, register


def _npz_path(value: Path) -> Path:
    if value.suffix != ".npz":
        raise ValueError(f"the output must be an .npz file, got {str(value)!r}")
    return value


def _save_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Write `arrays` to `path` atomically (a temporary name unique to this writer)."""
    _make_folder(path)
    with atomic_path(path, what="NPZ output") as partial:
        np.savez_compressed(partial, **arrays)  # type: ignore[arg-type]


def _make_folder(path: Path) -> None:
    """Create the folder of an output file; InvalidInputError when that is impossible."""
    make_parent_folder(path)


class ComputeRMMInput(StrictModel):
    """ROOT files to read (schema auto-detected by default) and the NPZ to write."""

    inputs: list[PathText] = Field(
        min_length=1, max_length=100_000, description="ROOT files: paths or URLs"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    max_events: PositiveEventCount | None = Field(None, description="read at most this many events")
    output: FilePath = Field(description="NPZ file to write (.npz)")
    sqrt_s: SqrtSGeV = 13000.0

    _check_output = field_validator("output")(_npz_path)


class ComputeRMMOutput(NonFiniteReport):
    """Where the RMMs went and how many events they cover."""

    model_config = ConfigDict(serialize_by_alias=True)

    output: Path
    n_events: int
    schema_name: str = Field(alias="schema")


def padded_objects(chunk: EventChunk, layout: RMMLayout) -> dict[str, npt.NDArray[np.float64]]:
    """The objects that enter the RMM, (n, block size) per type and field, NaN-padded (GeV)."""
    arrays: dict[str, npt.NDArray[np.float64]] = {}
    for name, size in zip(OBJECT_TYPES, layout.block_sizes, strict=True):
        collection = ak.pad_none(chunk.collection(name), size, axis=1, clip=True)
        for field in OBJECT_FIELDS:
            values = ak.to_numpy(ak.fill_none(collection[field], np.nan))
            arrays[f"{name}_{field}"] = np.asarray(values, dtype=np.float64).reshape(
                len(chunk), size
            )
    return arrays


@register(
    "compute_rmm",
    "Read ROOT files, select objects and write their Rapidity-Mass Matrices and RMM features "
    "(with the objects that went in) to an NPZ file.",
    ComputeRMMInput,
    ComputeRMMOutput,
)
def compute_rmm(arguments: ComputeRMMInput) -> ComputeRMMOutput:
    """Compute the RMMs of the (first `max_events`) events of the inputs.

    The output is locked for the whole computation: a second writer of the same NPZ fails at
    once (OutputInUseError) instead of both reporting success for one file.
    """
    with exclusive_output(arguments.output, what="NPZ output"):
        return _compute_rmm(arguments)


def _compute_rmm(arguments: ComputeRMMInput) -> ComputeRMMOutput:
    schemas = sorted({plan_read(path, arguments.schema_name).schema for path in arguments.inputs})
    chunk = load_events(arguments.inputs, arguments.schema_name, arguments.max_events)
    layout = RMMLayout(sqrt_s=arguments.sqrt_s)
    matrices = rmm_matrices(chunk, layout=layout)
    met = np.where(chunk.met_pt < layout.met_threshold_gev, 0.0, chunk.met_pt)
    arrays: dict[str, npt.NDArray[Any]] = {
        "rmm": matrices,
        "features": rmm_features(matrices, layout=layout),
        "event": np.asarray(chunk.event, dtype=np.int64),
        "run": np.asarray(chunk.run, dtype=np.int64),
        "lumi_block": (
            np.zeros(len(chunk), dtype=np.int64)
            if chunk.lumi_block is None
            else np.asarray(chunk.lumi_block, dtype=np.int64)
        ),
        "key": chunk.keys(),
        **padded_objects(chunk, layout),
        "met_pt": np.asarray(met, dtype=np.float64),
        "met_phi": np.asarray(chunk.met_phi, dtype=np.float64),
    }
    _save_npz(arguments.output, arrays)
    note = non_finite_note(chunk.non_finite, chunk.dropped_non_finite)
    return ComputeRMMOutput(
        output=arguments.output,
        n_events=len(chunk),
        schema=",".join(schemas),
        non_finite=dict(chunk.non_finite),
        dropped_non_finite=dict(chunk.dropped_non_finite),
        notes=[note] if note else [],
    )


class EventTableInput(StrictModel):
    """ROOT files to pass over once, and the Parquet event table to write."""

    inputs: list[PathText] = Field(
        min_length=1, max_length=100_000, description="ROOT files: paths or URLs"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    max_events: PositiveEventCount | None = Field(None, description="read at most this many events")
    output: FilePath = Field(description="event table to write (.parquet)")
    step_size: ChunkSize = Field(100_000, description="events per chunk (bounds the memory)")
    progress: bool = Field(False, description="show a progress bar on stderr")

    @field_validator("output")
    @classmethod
    def _parquet(cls, value: Path) -> Path:
        if value.suffix != ".parquet":
            raise ValueError(f"the output must be a .parquet file, got {str(value)!r}")
        return value


class EventTableOutput(NonFiniteReport):
    """The table written: events, chunks (row groups) and events per trigger stream."""

    output: Path
    n_events: int
    n_chunks: int
    streams: dict[str, int]


@register(
    "event_table",
    "Pass once over ROOT files and write the event table (Parquet): event id, run, weight, "
    "the 7 stream bits and the 9 leading-pair masses of every selected event.",
    EventTableInput,
    EventTableOutput,
)
def event_table(arguments: EventTableInput) -> EventTableOutput:
    """Read, select and write the streams and masses of every event, chunk by chunk."""
    with exclusive_output(arguments.output, what="event table"):
        return _event_table(arguments)


def _event_table(arguments: EventTableInput) -> EventTableOutput:
    total = sum(plan_read(path, arguments.schema_name).num_entries for path in arguments.inputs)
    if arguments.max_events is not None:
        total = min(total, arguments.max_events)
    chunks = iterate_events(
        arguments.inputs,
        arguments.schema_name,
        step_size=arguments.step_size,
        max_events=arguments.max_events,
    )
    non_finite: dict[str, int] = {}
    dropped: dict[str, int] = {}

    def counted(chunks: Iterator[EventChunk]) -> Iterator[EventChunk]:
        for chunk in chunks:
            add_counts(non_finite, chunk.non_finite)
            add_counts(dropped, chunk.dropped_non_finite)
            yield chunk

    summary = write_event_table(
        counted(chunks), arguments.output, progress=arguments.progress, total_events=total
    )
    note = non_finite_note(non_finite, dropped)
    return EventTableOutput(
        output=summary.path,
        n_events=summary.n_events,
        n_chunks=summary.n_chunks,
        streams={stream: summary.stream_counts[stream] for stream in STREAMS},
        non_finite=non_finite,
        dropped_non_finite=dropped,
        notes=[note] if note else [],
    )


class SpectraInput(StrictModel):
    """An event table, an optional score cut and the NPZ to write the 63 histograms to."""

    table: FilePath = Field(description="event table (Parquet) written by write_event_table")
    score_min: float | None = Field(
        None,
        ge=-1e6,
        le=1e6,
        description="keep events with score > score_min; None keeps every event",
    )
    include_training: bool = Field(
        False,
        description="keep the events the autoencoder was trained on (left out by default, "
        "as in anomaly_region and the scan)",
    )
    output: FilePath = Field(
        description="NPZ file to write (.npz): counts (63, n_bins), edges, names"
    )

    _check_output = field_validator("output")(_npz_path)


class SpectrumSummary(StrictModel):
    """One spectrum: its name (e.g. "T2/jm") and its number of entries in the binning."""

    name: str
    entries: int


class SpectraOutput(StrictModel):
    """The NPZ written, the event counts before and after the cut, entries per spectrum."""

    output: Path
    n_events: int
    n_selected: int
    score_min: float | None
    n_bins: int
    spectra: list[SpectrumSummary]


@register(
    "spectra",
    "Fill the 63 invariant-mass spectra (7 streams x 9 pairs) of an event table after an "
    "optional anomaly-score cut, and write them to an NPZ file.",
    SpectraInput,
    SpectraOutput,
)
def spectra(arguments: SpectraInput) -> SpectraOutput:
    """Cut the event table on the score and histogram every stream and pair."""
    with exclusive_output(arguments.output, what="spectra NPZ"):
        return _spectra(arguments)


def _spectra(arguments: SpectraInput) -> SpectraOutput:
    result = table_spectra(
        arguments.table, arguments.score_min, include_training=arguments.include_training
    )
    counts = result.spectra.counts
    _save_npz(
        arguments.output,
        {
            "counts": counts,
            "edges": result.spectra.edges,
            "names": np.array(SPECTRUM_NAMES, dtype=np.str_),
        },
    )
    return SpectraOutput(
        output=arguments.output,
        n_events=result.n_events,
        n_selected=result.n_selected,
        score_min=arguments.score_min,
        n_bins=counts.shape[1],
        spectra=[
            SpectrumSummary(name=name, entries=int(row.sum()))
            for name, row in zip(result.spectra.names, counts, strict=True)
        ],
    )
