"""Tools over events: `read_events`, `event_table` (one pass to Parquet), `generate_sample`.

`read_events` summarises what files hold after selection; `generate_sample` writes a
synthetic NanoAOD-schema sample with injected resonances.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import awkward as ak
import numpy as np
from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import Progress

from core.events import (
    ObjectSelection,
    SchemaName,
    add_counts,
    iterate_events,
    non_finite_note,
    plan_read,
)
from core.files import exclusive_output
from core.masses import STREAMS, stream_bits
from core.objects import OBJECT_TYPES, EventChunk
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import write_event_table
from tools.common import NonFiniteReport, StrictModel
from tools.registry import (
    AbsEta,
    ChunkSize,
    CrossSectionPb,
    DeltaR,
    EnergyGeV,
    EventCount,
    FilePath,
    LumiPb,
    MassGeV,
    PathText,
    PositiveEventCount,
    Seed,
    SqrtSGeV,
    WidthGeV,
    register,
)


class SelectionInput(StrictModel):
    """Overrides of the default object selection (GeV); unset fields keep the defaults."""

    jet_pt_min: EnergyGeV = 30.0
    jet_abs_eta_max: AbsEta = 2.4
    muon_pt_min: EnergyGeV = 30.0
    electron_pt_min: EnergyGeV = 30.0
    photon_pt_min: EnergyGeV = 30.0
    lepton_abs_eta_max: AbsEta = 2.4
    photon_abs_eta_max: AbsEta = 2.4
    overlap_delta_r: DeltaR = 0.4
    met_min: EnergyGeV = 30.0
    use_identification: bool = True
    btag_branch: str = Field("auto", min_length=1, max_length=200)
    btag_working_point: float | None = Field(None, ge=-1e3, le=1e3)

    def to_core(self) -> ObjectSelection:
        """The core selection these fields describe."""
        return ObjectSelection(**self.model_dump())


class ReadEventsInput(StrictModel):
    """Files to summarise, with their schema (auto-detected by default)."""

    inputs: list[PathText] = Field(
        min_length=1, max_length=100_000, description="ROOT files: paths or URLs"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    max_events: PositiveEventCount | None = None
    tree: str | None = Field(None, min_length=1, max_length=1000)
    mapping: PathText | None = Field(None, description="column-mapping TOML for schema 'mapping'")
    selection: SelectionInput = Field(default_factory=SelectionInput)
    step_size: ChunkSize = 100_000


class FileSummary(StrictModel):
    """How one file was read."""

    path: str
    tree: str
    schema_name: str = Field(alias="schema")
    entries: int
    btag_branch: str | None
    btag_working_point: float | None = Field(
        description="b-tag cut of `btag_branch`; null when the file has no filled b-tagger "
        "(every jet is a light jet)"
    )
    notes: list[str]


class ReadEventsOutput(NonFiniteReport):
    """Counts after selection: objects per type, events with at least one, events per stream."""

    n_events: int
    files: list[FileSummary]
    objects: dict[str, int]
    events_with: dict[str, int]
    met_nonzero: int
    streams: dict[str, int]
    selection: dict[str, Any]


@register(
    "read_events",
    "Summarise ROOT files after selection: schema, objects per type, events per trigger stream.",
    ReadEventsInput,
    ReadEventsOutput,
)
def read_events_tool(arguments: ReadEventsInput) -> ReadEventsOutput:
    """Read the inputs chunk by chunk and count what the selection keeps."""
    selection = arguments.selection.to_core()
    files = []
    for path in arguments.inputs:
        plan = plan_read(
            path, arguments.schema_name, selection, tree=arguments.tree, mapping=arguments.mapping
        )
        files.append(
            FileSummary(
                path=plan.path,
                tree=plan.tree,
                schema=plan.schema,
                entries=plan.num_entries,
                btag_branch=plan.btag_branch,
                btag_working_point=finite_or_none(plan.btag_working_point),
                notes=list(plan.notes),
            )
        )
    objects = dict.fromkeys(OBJECT_TYPES, 0)
    events_with = dict.fromkeys(OBJECT_TYPES, 0)
    streams = dict.fromkeys(STREAMS, 0)
    n_events = met_nonzero = 0
    non_finite: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for chunk in iterate_events(
        arguments.inputs,
        arguments.schema_name,
        step_size=arguments.step_size,
        max_events=arguments.max_events,
        selection=selection,
        tree=arguments.tree,
        mapping=arguments.mapping,
    ):
        n_events += len(chunk)
        add_counts(non_finite, chunk.non_finite)
        add_counts(dropped, chunk.dropped_non_finite)
        met_nonzero += int(np.count_nonzero(chunk.met_pt))
        for name in OBJECT_TYPES:
            counts = ak.to_numpy(ak.num(chunk.collection(name)))
            objects[name] += int(counts.sum())
            events_with[name] += int(np.count_nonzero(counts))
        bits = stream_bits(chunk)
        for k, name in enumerate(STREAMS):
            streams[name] += int(np.count_nonzero(bits[:, k]))
    return ReadEventsOutput(
        n_events=n_events,
        files=files,
        objects=objects,
        events_with=events_with,
        met_nonzero=met_nonzero,
        streams=streams,
        selection=selection.as_dict(),
        non_finite=non_finite,
        dropped_non_finite=dropped,
        notes=[note] if (note := non_finite_note(non_finite, dropped)) else [],
    )


def finite_or_none(value: float) -> float | None:
    """`value`, or None for infinity (a cut that nothing passes, e.g. no b-tagger)."""
    return value if math.isfinite(value) else None


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
def event_table_tool(arguments: EventTableInput) -> EventTableOutput:
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


class SignalInput(StrictModel):
    """An injected resonance X -> pair (mass and width in GeV; n_events or xsec_pb)."""

    pair: Literal["jj", "jb", "bb", "je", "be", "jm", "bm", "jg", "bg"]
    mass: MassGeV
    width: WidthGeV
    n_events: EventCount | None = None
    xsec_pb: CrossSectionPb | None = None
    extra: dict[
        Literal["jets", "bjets", "muons", "electrons", "photons"],
        Annotated[int, Field(ge=0, le=10)],
    ] = Field(default_factory=dict)
    name: str = Field("", max_length=200)
    lineshape: Literal["breit-wigner", "gaussian"] = Field(
        "breit-wigner",
        description="true-mass distribution: width = BW full width or Gaussian sigma",
    )


class GenerateSampleInput(StrictModel):
    """A synthetic NanoAOD-schema sample: background size, signals, seed, luminosity."""

    output_dir: FilePath
    n_events: EventCount = 100_000
    seed: Seed = 1
    signals: list[SignalInput] = Field(default_factory=list, max_length=100)
    lumi_pb: LumiPb = 1000.0
    sqrt_s: SqrtSGeV = 13000.0
    events_per_file: PositiveEventCount = 1_000_000
    progress: bool = Field(False, description="show a progress bar on stderr")


class GenerateSampleOutput(StrictModel):
    """What was written."""

    files: list[str]
    truth: str
    n_background: int
    n_signal: list[int]
    lumi_pb: float


@register(
    "generate_sample",
    "Write a synthetic NanoAOD-schema sample with injected resonances and truth.json.",
    GenerateSampleInput,
    GenerateSampleOutput,
)
def generate_sample_tool(arguments: GenerateSampleInput) -> GenerateSampleOutput:
    """Generate the sample described by the input (its folder locked while it is written)."""
    with exclusive_output(arguments.output_dir, what="synthetic sample"):
        return _generate_sample(arguments)


def _generate_sample(arguments: GenerateSampleInput) -> GenerateSampleOutput:
    config = SampleConfig(
        n_events=arguments.n_events,
        seed=arguments.seed,
        signals=tuple(SignalSpec(**s.model_dump()) for s in arguments.signals),
        lumi_pb=arguments.lumi_pb,
        sqrt_s=arguments.sqrt_s,
        events_per_file=arguments.events_per_file,
    )
    if arguments.progress:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("generating events", total=None)
            info = generate_sample(
                arguments.output_dir,
                config,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
    else:
        info = generate_sample(arguments.output_dir, config)
    return GenerateSampleOutput(
        files=[str(p) for p in info.files],
        truth=str(info.truth_path),
        n_background=info.n_background,
        n_signal=list(info.n_signal),
        lumi_pb=info.lumi_pb,
    )
