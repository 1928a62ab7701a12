"""Tools of the autoencoder: `train_autoencoder`, `score_events`, `anomaly_region`.

Features come either from NPZ files written by `compute_rmm` (arrays `features` (n, 1287)
and `key`, the event identity of `core.objects.event_keys`) or straight from ROOT files
(read, selected and turned into RMMs chunk by chunk). Scores are written into the event
table (Parquet, core/table.py) as its column `score`, with `training`: the events the model
was trained on (seed and fraction of its card, `training_selection` over event keys), left
out of the anomaly regions and spectra by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from core.anomaly import anomaly_region
from core.autoencoder import (
    N_RMM_FEATURES,
    card_path,
    events_sha256,
    export_onnx,
    feature_chunks,
    load_scorer,
    quantize_int8,
    read_model_card,
    score_agreement,
    train_autoencoder,
    training_selection,
)
from core.errors import InvalidInputError, ToolError
from core.events import SchemaName, iterate_events, refuse_duplicate_inputs
from core.files import exclusive_output
from core.objects import OBJECT_TYPES, EventChunk
from core.table import add_score_column, read_table_columns, table_is_scored
from tools.common import StrictModel, npz_integers, npz_numbers, open_npz, require_file
from tools.events import SelectionInput
from tools.registry import (
    ChunkSize,
    CrossSectionPb,
    FilePath,
    Fraction,
    LumiPb,
    PathText,
    Seed,
    Threads,
    register,
)

FeatureChunk = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


class FeatureSource(StrictModel):
    """Where features come from: `features` NPZ files, or ROOT `inputs` with their schema."""

    features: list[FilePath] | None = Field(
        None,
        max_length=100_000,
        description="NPZ files from compute_rmm with arrays 'features' and 'event'",
    )
    inputs: list[PathText] | None = Field(
        None, max_length=100_000, description="ROOT files: paths or URLs"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    tree: str | None = Field(None, min_length=1, max_length=1000)
    mapping: PathText | None = None
    selection: SelectionInput = Field(default_factory=SelectionInput)
    step_size: ChunkSize = 100_000
    prefetch: int = Field(
        2, ge=0, le=16, description="chunks read and turned into RMMs ahead in a worker thread"
    )

    @model_validator(mode="after")
    def _one_source(self) -> FeatureSource:
        if (self.features is None) == (self.inputs is None):
            raise ValueError("give either 'features' (NPZ files) or 'inputs' (ROOT files)")
        if not (self.features or self.inputs):
            raise ValueError("the list of feature or input files is empty")
        return self


class TrainAutoencoderInput(FeatureSource):
    """Train on a seeded fraction of the events and export ONNX (+ optional int8 copy)."""

    output: FilePath = Field(description="the .onnx file to write; the card goes beside it")
    seed: Seed = 0
    fraction: Fraction = 0.01
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    max_epochs: int = Field(100, ge=1, le=1000)
    patience: int = Field(5, ge=1, le=1000)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    threads: Threads = 1
    quantize_int8: bool = False


class TrainAutoencoderOutput(StrictModel):
    """The model files and how the training went (losses: mean MSE, standardised features)."""

    model: str
    card: str
    int8_model: str | None
    n_events_seen: int
    n_training_events: int
    n_validation_events: int
    training_events_sha256: str
    best_epoch: int
    stopped_early: bool
    loss_train: list[float]
    loss_validation: list[float]


class ScoreEventsInput(FeatureSource):
    """Score events with an exported model and write `score` and `training` into the table."""

    model: FilePath
    table: FilePath = Field(description="event table (Parquet) written by core.table")
    threads: Threads = 1
    batch_size: int = Field(8192, ge=1, le=10_000_000)
    compare_with: FilePath | None = Field(
        None, description="a second model (e.g. the int8 one) to measure agreement against"
    )
    lumi_pb: LumiPb | None = Field(
        None, description="luminosity in pb^-1, for the agreement's AR overlaps"
    )

    @model_validator(mode="after")
    def _lumi_for_comparison(self) -> ScoreEventsInput:
        if self.compare_with is not None and self.lumi_pb is None:
            raise ValueError("'compare_with' needs 'lumi_pb' to compare the ARs at 0.1/1/10 pb")
        return self


class AgreementOutput(StrictModel):
    """Agreement of the second model with the first on the non-training events."""

    model: str
    spearman_rho: float
    overlap: dict[str, float] = Field(description="shared fraction of the AR at each xsec (pb)")


class ScoreEventsOutput(StrictModel):
    """What was written into the table."""

    table: str
    n_scored: int
    n_training_events: int
    training_events_match_card: bool
    score_min: float
    score_median: float
    score_max: float
    agreement: AgreementOutput | None


class AnomalyRegionInput(StrictModel):
    """An AR: the N = round(xsec_pb * L_search) highest-score events of a stream.

    L_search = (1 - f) lumi_pb, f the fraction of the table's events the autoencoder was
    trained on (f = 0 with `include_training`), as in the scan (PHYSICS.md 4).
    """

    table: FilePath
    xsec_pb: Annotated[CrossSectionPb, Field(gt=0)]
    lumi_pb: LumiPb
    stream: Literal["T1", "T2", "T3", "T4", "T5", "T6", "T7", "all"] = "all"
    model: FilePath | None = Field(
        None, description="the model whose training events are excluded (its card names them)"
    )
    include_training: bool = Field(
        False, description="keep the events the autoencoder was trained on (excluded by default)"
    )


class AnomalyRegionOutput(StrictModel):
    """The AR: events with score > cut (null: the whole stream); counts of events."""

    cut: float | None
    n_pass: int
    whole_stream: bool
    n_requested: int
    n_stream: int
    n_training_excluded: int
    n_pass_at_cut: int = Field(
        description="events with score == cut that pass by the event-id tie-break (usually 0)"
    )
    lumi_search_pb: float = Field(description="(1 - f) lumi_pb: the luminosity of the AR")
    effective_xsec_pb: float = Field(description="n_pass / lumi_search_pb")


def subset_chunk(chunk: EventChunk, mask: npt.NDArray[np.bool_]) -> EventChunk:
    """The events of `chunk` where `mask` is true."""
    collections = {name: chunk.collection(name)[mask] for name in OBJECT_TYPES}
    return replace(
        chunk,
        **collections,
        met_pt=chunk.met_pt[mask],
        met_phi=chunk.met_phi[mask],
        run=chunk.run[mask],
        event=chunk.event[mask],
        weight=chunk.weight[mask],
        lumi_block=None if chunk.lumi_block is None else chunk.lumi_block[mask],
        key=chunk.keys()[mask],
    )


def _feature_chunks(
    source: FeatureSource, keep: tuple[float, int] | None = None
) -> Iterator[FeatureChunk]:
    """Yield (features, event keys) per file or chunk; only training events when `keep` is set."""
    if source.features is not None:
        refuse_duplicate_inputs(source.features)
        for path in source.features:
            require_file(path, "feature file", "; run compute_rmm first", ToolError)
            with open_npz(path) as data:
                missing = [key for key in ("features", "key") if key not in data]
                if missing:
                    raise ToolError(
                        f"feature file {path} lacks arrays {missing}; it holds "
                        f"{sorted(data.files)}: use the NPZ written by compute_rmm (rerun it "
                        "if the file is older than the event keys)"
                    )
                events = npz_integers(data, "key", path)
                mask = (
                    np.ones(len(events), dtype=np.bool_)
                    if keep is None
                    else training_selection(events, *keep)
                )
                values = npz_numbers(data, "features", path)
                if values.ndim != 2 or len(values) != len(events):
                    raise ToolError(
                        f"feature file {path}: 'features' has shape {values.shape} for "
                        f"{len(events)} event keys; use the NPZ written by compute_rmm"
                    )
                yield np.asarray(values[mask], dtype=np.float32), events[mask]
        return
    assert source.inputs is not None
    chunks = iterate_events(
        source.inputs,
        source.schema_name,
        step_size=source.step_size,
        selection=source.selection.to_core(),
        tree=source.tree,
        mapping=source.mapping,
    )
    if keep is not None:
        chunks = (subset_chunk(chunk, training_selection(chunk.keys(), *keep)) for chunk in chunks)
    for chunk, features in feature_chunks(chunks, prefetch=source.prefetch):
        if len(chunk):
            yield features, chunk.keys()


@register(
    "train_autoencoder",
    "Train the RMM autoencoder on a seeded fraction of events; export ONNX and its model card.",
    TrainAutoencoderInput,
    TrainAutoencoderOutput,
)
def train_autoencoder_tool(arguments: TrainAutoencoderInput) -> TrainAutoencoderOutput:
    """Collect the features of the training events, train, export (and quantise)."""
    with exclusive_output(arguments.output, what="autoencoder model"):
        return _train(arguments)


def _train(arguments: TrainAutoencoderInput) -> TrainAutoencoderOutput:
    keep = (arguments.fraction, arguments.seed)
    parts = list(_feature_chunks(arguments, keep))
    if not parts:
        raise InvalidInputError(
            f"no event was picked for training with fraction {arguments.fraction}; "
            "use more events or a larger fraction"
        )
    features = np.concatenate([f for f, _ in parts])
    events = np.concatenate([e for _, e in parts])
    del parts  # the chunks' features would double the training's memory
    if features.ndim != 2 or features.shape[1] != N_RMM_FEATURES:
        raise ToolError(
            f"the features have shape {features.shape}, expected (events, {N_RMM_FEATURES}) "
            "RMM features without the blinded cells: use the NPZ written by compute_rmm"
        )
    model = train_autoencoder(
        features,
        events,
        seed=arguments.seed,
        fraction=arguments.fraction,
        validation_fraction=arguments.validation_fraction,
        max_epochs=arguments.max_epochs,
        patience=arguments.patience,
        learning_rate=arguments.learning_rate,
        threads=arguments.threads,
    )
    card = export_onnx(model, arguments.output)
    int8_path = None
    if arguments.quantize_int8:
        int8_path = arguments.output.with_name(arguments.output.stem + "_int8.onnx")
        quantize_int8(arguments.output, int8_path)
    return TrainAutoencoderOutput(
        model=str(arguments.output),
        card=str(card_path(arguments.output)),
        int8_model=None if int8_path is None else str(int8_path),
        n_events_seen=len(events),
        n_training_events=card.n_training_events,
        n_validation_events=card.n_validation_events,
        training_events_sha256=card.training_events_sha256,
        best_epoch=card.best_epoch,
        stopped_early=card.stopped_early,
        loss_train=list(card.loss_train),
        loss_validation=list(card.loss_validation),
    )


def _match_events(
    table_keys: npt.NDArray[np.int64], scored_keys: npt.NDArray[np.int64]
) -> npt.NDArray[np.intp]:
    """Row of `scored_keys` for each table event; ToolError unless both are the same events.

    Keys are the full identity (source file, run, luminosity block, event): features of
    another file or run never match, even where event numbers repeat.
    """
    order = np.argsort(scored_keys, kind="stable")
    sorted_keys = scored_keys[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):
        raise ToolError(
            "the scored events repeat an event (same file, run, luminosity block and event), "
            "so they can not be matched to the table's rows; score each event once"
        )
    position = np.minimum(np.searchsorted(sorted_keys, table_keys), len(order) - 1)
    found = sorted_keys[position] == table_keys
    if not found.all():
        raise ToolError(
            f"{int((~found).sum())} of the table's {len(table_keys)} events have no features "
            "(no event with the same source file, run, luminosity block and event): the "
            "features come from other files than the table; score the files the table was "
            "built from"
        )
    if len(scored_keys) != len(table_keys):
        raise ToolError(
            f"the features hold {len(scored_keys)} events, the table {len(table_keys)}: they "
            "come from other inputs; score the files the table was built from"
        )
    return np.asarray(order[position], dtype=np.intp)


def _training_mask(model: Path, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """The events `model` was trained on, from the seed and fraction of its card."""
    card = read_model_card(model)
    return training_selection(keys, card.fraction, card.seed)


@register(
    "score_events",
    "Score events with an exported autoencoder (ln MSE) and write the scores into the table.",
    ScoreEventsInput,
    ScoreEventsOutput,
)
def score_events_tool(arguments: ScoreEventsInput) -> ScoreEventsOutput:
    """Score every event of the source, match them to the table by event id, write back."""
    with exclusive_output(arguments.table, what="event table"):
        return _score_events(arguments)


def _score_events(arguments: ScoreEventsInput) -> ScoreEventsOutput:
    table_events = read_table_columns(arguments.table, ["key"])["key"]
    scorer = load_scorer(
        arguments.model, threads=arguments.threads, batch_size=arguments.batch_size
    )
    other = (
        None
        if arguments.compare_with is None
        else load_scorer(
            arguments.compare_with, threads=arguments.threads, batch_size=arguments.batch_size
        )
    )
    scores, other_scores, events = [], [], []
    for features, event_ids in _feature_chunks(arguments):
        scores.append(scorer.score(features))
        events.append(event_ids)
        if other is not None:
            other_scores.append(other.score(features))
    if not events:
        raise ToolError("the inputs hold no events to score")
    rows = _match_events(table_events, np.concatenate(events))
    score = np.concatenate(scores)[rows]
    training = _training_mask(arguments.model, table_events)
    add_score_column(arguments.table, score, training)
    matches = events_sha256(table_events[training]) == scorer.card.training_events_sha256

    agreement = None
    if other is not None:
        assert arguments.lumi_pb is not None
        other_score = np.concatenate(other_scores)[rows]
        result = score_agreement(score[~training], other_score[~training], arguments.lumi_pb)
        agreement = AgreementOutput(
            model=str(arguments.compare_with),
            spearman_rho=result.spearman_rho,
            overlap={f"{o.xsec_pb:g}": o.fraction for o in result.overlaps},
        )
    return ScoreEventsOutput(
        table=str(arguments.table),
        n_scored=len(score),
        n_training_events=int(training.sum()),
        training_events_match_card=matches,
        score_min=float(score.min()),
        score_median=float(np.median(score)),
        score_max=float(score.max()),
        agreement=agreement,
    )


@register(
    "anomaly_region",
    "Score cut of the anomaly region at an effective cross-section (pb) in one trigger stream.",
    AnomalyRegionInput,
    AnomalyRegionOutput,
)
def anomaly_region_tool(arguments: AnomalyRegionInput) -> AnomalyRegionOutput:
    """Cut the table's scores so that exactly round(xsec_pb * L_search) stream events pass.

    Reads the key, score, training and stream columns alone.
    """
    if not table_is_scored(arguments.table):
        raise ToolError(
            f"event table {arguments.table} has no score column; run score_events first"
        )
    streams = [] if arguments.stream == "all" else [arguments.stream]
    columns = read_table_columns(arguments.table, ["key", "score", "training", *streams])
    keys, score, training = columns["key"], columns["score"], columns["training"]
    in_stream = columns[streams[0]] if streams else np.ones(len(keys), dtype=np.bool_)
    n_excluded, fraction = 0, 0.0
    if not arguments.include_training:
        if arguments.model is not None and not np.array_equal(
            training, _training_mask(arguments.model, keys)
        ):
            raise ToolError(
                f"event table {arguments.table} was scored by another model than "
                f"{arguments.model} (its training events differ from the card's); rescore "
                "the table with this model"
            )
        n_excluded = int(np.count_nonzero(in_stream & training))
        in_stream &= ~training
        fraction = float(np.mean(training)) if training.size else 0.0
    region = anomaly_region(
        score,
        arguments.xsec_pb,
        arguments.lumi_pb,
        in_stream=in_stream,
        event_ids=keys,
        training_fraction=fraction,
    )
    return AnomalyRegionOutput(
        cut=region.cut if math.isfinite(region.cut) else None,
        n_pass=region.n_pass,
        whole_stream=region.whole_stream,
        n_requested=region.n_requested,
        n_stream=region.n_stream,
        n_training_excluded=n_excluded,
        n_pass_at_cut=region.n_pass_at_cut,
        lumi_search_pb=region.lumi_pb,
        effective_xsec_pb=region.effective_xsec_pb,
    )
