"""The autoencoder of the search: train with torch, export to ONNX, score with onnxruntime.

Architecture and score follow PHYSICS.md section 4 (PRL 132 081801): a dense
1287-800-400-200-400-800-1287 network with LeakyReLU hidden layers and a linear output,
trained with Adam on the mean squared reconstruction error, batches of 100 events and early
stopping on a validation split. The per-feature standardisation (mean, std floored) is part
of the exported graph, which takes raw RMM features and returns the per-event MSE L of the
standardised features; the anomaly score is ln(L).

The std floor (default 1e-4) is a choice PHYSICS.md leaves open. With 1 % training most of
the 1287 cells never fill in the training events (1109 of 1287 at ~1000 events) and get the
floor as their scale, so an event that fills such a cell has MSE ~ (value / floor)^2 / 1287
there. With 1e-3, a signal whose atypical cells hold masses (~0.04, e.g. an m-e pair no
background makes) gets ~1.5, comparable to the ordinary reconstruction error of the
background tail, and loses tight ARs; 1e-4 ranks it above every event that fills no unseen
cell (bench/results/ae_enrichment.md: X(500)->jm+g+e in 1L at 3.2 pb keeps 88 % of the
signal vs 5.2 % of the background, 37 % with 1e-3; larger floors, up to no
standardisation, are worse).

torch is imported only inside `train_autoencoder`, `TrainedModel` methods and `export_onnx`:
scoring needs onnxruntime alone.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from scipy import stats

from core.anomaly import anomaly_region
from core.errors import InvalidInputError, ModelError
from core.files import atomic_path, file_sha256, write_text
from core.objects import EventChunk
from core.rmm import BLINDED_CELLS, DEFAULT_LAYOUT, rmm_feature_blocks, rmm_feature_rows

N_RMM_FEATURES: Final = DEFAULT_LAYOUT.n_features
"""Width of the AE input: the 36x36 RMM flattened row-major without the 9 blinded cells."""

HIDDEN_SIZES: Final = (800, 400, 200, 400, 800)
"""Widths of the hidden layers of the PRL 132 081801 autoencoder."""

BATCH_SIZE: Final = 100
_BLOCK_ROWS: Final = 8192
"""Rows per block where training works over all its events: the features' mean and std (in
float64, one block at a time) and the validation loss."""
INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = "mse"
ONNX_OPSET: Final = 17
CARD_SUFFIX: Final = ".card.json"
CARD_FORMAT: Final = "anomscan-model-card/1"
SCORE_DEFINITION: Final = "ln(mean over features of (reconstruction - standardised input)^2)"
SELECTION_RULE: Final = "splitmix64(uint64(event id) xor splitmix64(seed)) / 2^64 < fraction"

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_GOLDEN_GAMMA: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX_1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2: Final = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class LossCurve:
    """Mean per-event MSE (standardised features) per epoch on the fit and validation events."""

    train: tuple[float, ...]
    validation: tuple[float, ...]
    best_epoch: int
    stopped_early: bool


@dataclass(frozen=True)
class TrainingSetup:
    """How an autoencoder was trained: events fitted and validated, selection, optimiser.

    Shared by the trained model and its card (the card's JSON keys are these names).
    """

    n_fit_events: int
    n_validation_events: int
    seed: int
    fraction: float
    validation_fraction: float
    std_floor: float
    learning_rate: float
    batch_size: int


@dataclass(frozen=True)
class TrainedModel(TrainingSetup):
    """A trained autoencoder: the torch module (standardisation included) and its provenance.

    `network` maps raw features (n, n_features) to the per-event MSE; `training_event_ids`
    (sorted) are all events used for fitting or validation, to be excluded from the search.
    """

    network: Any = field(repr=False, compare=False)
    n_features: int
    hidden_sizes: tuple[int, ...]
    feature_mean: Float32Array = field(repr=False, compare=False)
    feature_scale: Float32Array = field(repr=False, compare=False)
    training_event_ids: IntArray = field(repr=False, compare=False)
    loss: LossCurve

    @property
    def training_events_sha256(self) -> str:
        """SHA-256 of the sorted training event ids (little-endian int64)."""
        return events_sha256(self.training_event_ids)

    def mse(self, features: npt.ArrayLike, *, batch_size: int = 10_000) -> FloatArray:
        """Per-event MSE of the standardised features, computed by torch (for checks)."""
        torch = _import_torch()
        values = _check_features(features, self.n_features)
        with torch.no_grad():
            return _batched_mse(
                values, batch_size, lambda batch: self.network(torch.from_numpy(batch)).numpy()
            )

    def score(self, features: npt.ArrayLike) -> FloatArray:
        """Anomaly score ln(MSE) per event, computed by torch (for checks)."""
        return _log_mse(self.mse(features))


@dataclass(frozen=True)
class ModelCard(TrainingSetup):
    """What a model is and how it was made: written as JSON beside the .onnx file."""

    model_file: str
    onnx_sha256: str
    input_size: int
    hidden_sizes: tuple[int, ...]
    blinded_cells: tuple[tuple[int, int], ...]
    training_events_sha256: str
    n_training_events: int
    loss_train: tuple[float, ...]
    loss_validation: tuple[float, ...]
    best_epoch: int
    stopped_early: bool
    versions: dict[str, str]
    quantization: str = "none"
    source_onnx_sha256: str | None = None
    opset: int = ONNX_OPSET
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    score: str = SCORE_DEFINITION
    selection: str = SELECTION_RULE
    format: str = CARD_FORMAT

    def to_json(self) -> str:
        """Serialise the card as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "model card") -> ModelCard:
        """Parse a card written by `to_json`; ModelError when it is not one."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelError(
                f"{source} is not valid JSON ({error}); re-export the model to rewrite it"
            ) from error
        if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ModelError(
                f"{source} is not an anomscan model card: expected format {CARD_FORMAT!r}, "
                f"found {found!r}"
            )
        names = {f.name for f in cls.__dataclass_fields__.values()}
        missing = sorted(n for n in names if n not in raw and n not in _CARD_DEFAULTS)
        unknown = sorted(set(raw) - names)
        if missing or unknown:
            raise ModelError(
                f"{source} does not match the card format: missing fields {missing}, "
                f"unknown fields {unknown}; re-export the model to rewrite it"
            )
        try:
            raw["hidden_sizes"] = tuple(int(v) for v in raw["hidden_sizes"])
            raw["blinded_cells"] = tuple((int(r), int(c)) for r, c in raw["blinded_cells"])
            raw["loss_train"] = tuple(float(v) for v in raw["loss_train"])
            raw["loss_validation"] = tuple(float(v) for v in raw["loss_validation"])
            raw["input_size"] = int(raw["input_size"])
        except (TypeError, ValueError) as error:
            raise ModelError(f"{source} has a malformed field: {error}") from error
        return cls(**raw)


_CARD_DEFAULTS: Final = frozenset(
    (
        "quantization",
        "source_onnx_sha256",
        "opset",
        "input_name",
        "output_name",
        "score",
        "selection",
    )
)


@dataclass(frozen=True)
class Scorer:
    """An onnxruntime session of an exported autoencoder; `score` gives ln(MSE) per event."""

    session: Any = field(repr=False, compare=False)
    card: ModelCard
    path: Path
    threads: int
    batch_size: int

    @property
    def input_size(self) -> int:
        """Number of features per event the model takes."""
        return self.card.input_size

    def mse(self, features: npt.ArrayLike) -> FloatArray:
        """Per-event MSE of the standardised features, in batches of `batch_size` events."""
        values = _check_features(features, self.card.input_size)
        return _batched_mse(
            values,
            self.batch_size,
            lambda batch: self.session.run(None, {self.card.input_name: batch})[0],
        )

    def score(self, features: npt.ArrayLike) -> FloatArray:
        """Anomaly score ln(MSE) per event."""
        return _log_mse(self.mse(features))

    def score_chunk(self, chunk: EventChunk) -> FloatArray:
        """ln(MSE) of every event of `chunk`, its RMM features made a batch at a time.

        Equal to `score(rmm_feature_rows(chunk))` (the same batches of `batch_size` events)
        without holding the chunk's features: a worker of the event pass holds one batch.
        """
        mse = np.empty(len(chunk), dtype=np.float64)
        for first, stop, features in rmm_feature_blocks(chunk, self.batch_size):
            mse[first:stop] = self.mse(features)
        return _log_mse(mse)


@dataclass(frozen=True)
class XsecOverlap:
    """Overlap of the events two scores select at one effective cross-section (pb)."""

    xsec_pb: float
    n_selected: int
    n_common: int

    @property
    def fraction(self) -> float:
        """Share of the selected events that both scores select (1 when none is selected)."""
        return self.n_common / self.n_selected if self.n_selected else 1.0


@dataclass(frozen=True)
class ScoreAgreement:
    """Agreement of two scorings of the same events: Spearman rho and AR overlaps."""

    spearman_rho: float
    overlaps: tuple[XsecOverlap, ...]


def training_selection(event_ids: npt.ArrayLike, fraction: float, seed: int) -> BoolArray:
    """Mark the events used for training: a seeded hash of each event id below `fraction`.

    The choice depends on the event id alone, so it is the same in any chunking or order,
    and selecting again from the selected events keeps them all.
    """
    if not (0.0 < fraction <= 1.0):
        raise InvalidInputError(
            f"the training fraction must be in (0, 1], got {fraction}; the default is 0.01"
        )
    ids = _check_event_ids(event_ids)
    key = _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    uniform = (_splitmix64(ids.view(np.uint64) ^ key) >> np.uint64(11)).astype(np.float64)
    return np.asarray(uniform * 2.0**-53 < fraction, dtype=np.bool_)


def events_sha256(event_ids: npt.ArrayLike) -> str:
    """SHA-256 (hex) of the sorted event ids as little-endian int64."""
    ids = np.sort(_check_event_ids(event_ids)).astype("<i8")
    return hashlib.sha256(ids.tobytes()).hexdigest()


def train_autoencoder(
    features: npt.ArrayLike,
    event_ids: npt.ArrayLike,
    *,
    seed: int = 0,
    fraction: float = 0.01,
    validation_fraction: float = 0.2,
    max_epochs: int = 100,
    patience: int = 5,
    learning_rate: float = 1e-3,
    batch_size: int = BATCH_SIZE,
    std_floor: float = 1e-4,
    hidden_sizes: Sequence[int] = HIDDEN_SIZES,
    threads: int | None = None,
) -> TrainedModel:
    """Train the autoencoder on the `fraction` of events picked by `training_selection`.

    Features are raw RMM features (n, 1287). Standardisation uses the mean and std (floored
    at `std_floor`) of the fit events. A seeded `validation_fraction` of the picked events
    drives early stopping (no improvement for `patience` epochs); the best epoch is kept.
    `threads` sets torch's intra-op threads for the call (torch's setting when None).
    """
    torch = _import_torch()
    values = _check_features(features, None)
    ids = _check_event_ids(event_ids)
    if len(ids) != len(values):
        raise InvalidInputError(
            f"got {len(values)} feature rows but {len(ids)} event ids; pass one id per event"
        )
    _check_training_options(
        max_epochs, patience, batch_size, learning_rate, std_floor, validation_fraction
    )
    picked = np.flatnonzero(training_selection(ids, fraction, seed))
    rng = np.random.default_rng(seed)
    fit_rows, validation_rows = _split_training_rows(
        picked, validation_fraction, rng, fraction, len(ids)
    )
    n_validation = len(validation_rows)

    mean, scale = _feature_moments(values, fit_rows, std_floor)
    n_features = values.shape[1]
    sizes = tuple(int(s) for s in hidden_sizes)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = _build_network(n_features, sizes, mean, scale)
            loss = _fit(
                network,
                _standardised(network, values, fit_rows),
                _standardised(network, values, validation_rows),
                rng=rng,
                max_epochs=max_epochs,
                patience=patience,
                learning_rate=learning_rate,
                batch_size=batch_size,
            )
    finally:
        torch.set_num_threads(previous_threads)
    network.eval()
    return TrainedModel(
        network=network,
        n_features=n_features,
        hidden_sizes=sizes,
        feature_mean=mean.astype(np.float32),
        feature_scale=scale.astype(np.float32),
        training_event_ids=np.sort(ids[picked]),
        n_fit_events=len(fit_rows),
        n_validation_events=n_validation,
        seed=seed,
        fraction=fraction,
        validation_fraction=validation_fraction,
        std_floor=std_floor,
        learning_rate=learning_rate,
        batch_size=batch_size,
        loss=loss,
    )


def _split_training_rows(
    picked: npt.NDArray[np.int64],
    validation_fraction: float,
    rng: np.random.Generator,
    fraction: float,
    n_events: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(fit rows, validation rows): a seeded `validation_fraction` of the picked events.

    At least one event of each; InvalidInputError when fewer than 2 of the `n_events` were
    picked by the training `fraction`.
    """
    if len(picked) < 2:
        raise InvalidInputError(
            f"a fraction {fraction} of {n_events} events picks {len(picked)} events for "
            "training; at least 2 are needed (one to fit, one to validate): "
            "use more events or a larger fraction"
        )
    order = rng.permutation(picked)
    n_validation = min(len(order) - 1, max(1, round(validation_fraction * len(order))))
    return order[n_validation:], order[:n_validation]


def _feature_moments(
    values: Float32Array, rows: npt.NDArray[np.int64], std_floor: float
) -> tuple[FloatArray, FloatArray]:
    """Mean and standard deviation (floored at `std_floor`) of `values[rows]`, in float64.

    Two passes over blocks of `_BLOCK_ROWS` rows, so that no float64 copy of the training
    features is ever held (at 10M events they are 0.5 GB in float32).
    """
    blocks = [rows[start : start + _BLOCK_ROWS] for start in range(0, len(rows), _BLOCK_ROWS)]
    total = np.zeros(values.shape[1], dtype=np.float64)
    for block in blocks:
        total += values[block].sum(axis=0, dtype=np.float64)
    mean = total / len(rows)
    squares = np.zeros(values.shape[1], dtype=np.float64)
    for block in blocks:
        deviation = values[block].astype(np.float64) - mean
        squares += np.einsum("ij,ij->j", deviation, deviation)
    return mean, np.maximum(np.sqrt(squares / len(rows)), std_floor)


def _standardised(network: Any, values: Float32Array, rows: npt.NDArray[np.int64]) -> Any:
    """`network.standardise(values[rows])` as a tensor, computed in place in one copy."""
    import torch

    z = torch.from_numpy(values[rows])
    return z.sub_(network.mean).mul_(network.inverse_scale)


def _check_training_options(
    max_epochs: int,
    patience: int,
    batch_size: int,
    learning_rate: float,
    std_floor: float,
    validation_fraction: float,
) -> None:
    """InvalidInputError naming the first training option out of its range."""
    for name, number in (("max_epochs", max_epochs), ("patience", patience)):
        if number < 1:
            raise InvalidInputError(f"{name} must be >= 1, got {number}")
    if batch_size < 1 or learning_rate <= 0 or std_floor <= 0:
        raise InvalidInputError(
            f"batch_size, learning_rate and std_floor must be positive, got {batch_size}, "
            f"{learning_rate}, {std_floor}"
        )
    if not (0.0 < validation_fraction < 1.0):
        raise InvalidInputError(
            f"validation_fraction must be in (0, 1), got {validation_fraction}; try 0.2"
        )


def card_path(model_path: Path) -> Path:
    """Path of the model card beside an ONNX file: model.onnx -> model.card.json."""
    return model_path.with_suffix(CARD_SUFFIX)


def export_onnx(model: TrainedModel, path: Path) -> ModelCard:
    """Write `model` to `path` as ONNX (opset 17, dynamic batch) and its card beside it.

    Each file is written atomically; the card holds the ONNX file's SHA-256, so a model
    whose card is from another export is refused when loaded.
    """
    torch = _import_torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(model.feature_mean.reshape(1, -1).repeat(2, axis=0))
    with atomic_path(path, what="ONNX model") as partial, warnings.catch_warnings():
        # torch 2.13 deprecates the TorchScript exporter that dynamo=False selects.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model.network,
            (example,),
            str(partial),
            opset_version=ONNX_OPSET,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "events"}, OUTPUT_NAME: {0: "events"}},
        )
    card = ModelCard(
        model_file=path.name,
        onnx_sha256=file_sha256(path),
        input_size=model.n_features,
        hidden_sizes=model.hidden_sizes,
        blinded_cells=BLINDED_CELLS if model.n_features == N_RMM_FEATURES else (),
        training_events_sha256=model.training_events_sha256,
        n_training_events=len(model.training_event_ids),
        n_fit_events=model.n_fit_events,
        n_validation_events=model.n_validation_events,
        seed=model.seed,
        fraction=model.fraction,
        validation_fraction=model.validation_fraction,
        std_floor=model.std_floor,
        learning_rate=model.learning_rate,
        batch_size=model.batch_size,
        loss_train=model.loss.train,
        loss_validation=model.loss.validation,
        best_epoch=model.loss.best_epoch,
        stopped_early=model.loss.stopped_early,
        versions=_versions(),
    )
    write_text(card_path(path), card.to_json(), what="model card")
    return card


def quantize_int8(model_path: Path, output_path: Path) -> ModelCard:
    """Write an int8 dynamically quantised copy of an exported model, with its own card."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    source = read_model_card(model_path)
    if source.quantization != "none":
        raise InvalidInputError(
            f"{model_path} is already quantised ({source.quantization}); quantise the fp32 model"
        )
    _check_file_matches_card(model_path, source)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = output_path.with_name(f".{output_path.name}.prepared")
    try:
        quant_pre_process(model_path, prepared)
        quantize_dynamic(prepared, output_path, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    card = replace(
        source,
        model_file=output_path.name,
        onnx_sha256=file_sha256(output_path),
        quantization="int8-dynamic",
        source_onnx_sha256=source.onnx_sha256,
        versions=_versions(),
    )
    write_text(card_path(output_path), card.to_json(), what="model card")
    return card


MIN_TRAINING_EVENTS: Final = 2000
"""Below this many training events the learned typicality is noisy: the card warns."""

MAX_VALIDATION_RATIO: Final = 3.0
"""A validation loss above this multiple of the training loss (best epoch) warns of
overfitting: the model learned its training events, not what is typical."""


def training_warnings(card: ModelCard) -> tuple[str, ...]:
    """What a reader of the model card should know before trusting its scores (may be empty).

    Warns when the autoencoder learned from fewer than `MIN_TRAINING_EVENTS` events, and
    when its validation loss at the best epoch exceeds `MAX_VALIDATION_RATIO` times its
    training loss (losses are the mean squared error of the standardised features).
    """
    warnings = []
    if card.n_training_events < MIN_TRAINING_EVENTS:
        warnings.append(
            f"the autoencoder learned from {card.n_training_events} events (fewer than "
            f"{MIN_TRAINING_EVENTS}): its scores are noisy; train it on a larger sample "
            "(a larger --events, or --model with a model trained on more data)"
        )
    best = card.best_epoch
    if best < len(card.loss_train) and best < len(card.loss_validation):
        train, validation = card.loss_train[best], card.loss_validation[best]
        if train > 0 and validation > MAX_VALIDATION_RATIO * train:
            warnings.append(
                f"at its best epoch the validation loss ({validation:.3g}) is "
                f"{validation / train:.0f} times the training loss ({train:.3g}): the model "
                "learned its training events rather than what is typical (too few events, "
                "or too many epochs)"
            )
    return tuple(warnings)


def read_model_card(model_path: Path) -> ModelCard:
    """Read the card beside `model_path`; ModelError when it is missing or malformed."""
    path = card_path(model_path)
    if not path.is_file():
        raise ModelError(
            f"no model card {path} beside {model_path}; a model is used with the card "
            "export_onnx wrote next to it"
        )
    return ModelCard.from_json(path.read_text(), source=f"model card {path}")


def load_scorer(
    path: Path,
    *,
    threads: int = 1,
    batch_size: int = 8192,
    expected_input_size: int = N_RMM_FEATURES,
) -> Scorer:
    """Open an exported model with onnxruntime after checking it against its card.

    ModelError when the file is missing or unreadable, differs from the card (SHA-256),
    or takes another number of features than `expected_input_size` (1287 RMM features).
    """
    if threads < 1 or batch_size < 1:
        raise InvalidInputError(
            f"threads and batch_size must be >= 1, got {threads} and {batch_size}"
        )
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; train and export a model first")
    card = read_model_card(path)
    _check_file_matches_card(path, card)
    if card.input_size != expected_input_size:
        raise ModelError(
            f"model {path} takes {card.input_size} features per event, expected "
            f"{expected_input_size} (RMM features without the blinded cells); "
            "retrain it on features of this RMM"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(
            path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own pybind exception types
        raise ModelError(
            f"onnxruntime can not read model {path} ({type(error).__name__}: {error}); "
            "the file is corrupt or not an ONNX model: re-export it"
        ) from error
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if (
        shape is None
        or inputs[0].name != card.input_name
        or len(shape) != 2
        or shape[1] != card.input_size
        or [o.name for o in outputs] != [card.output_name]
    ):
        found = [(i.name, i.shape) for i in inputs], [o.name for o in outputs]
        raise ModelError(
            f"model {path} does not match its card: expected one input {card.input_name!r} "
            f"of shape (events, {card.input_size}) and output {card.output_name!r}, "
            f"found inputs and outputs {found}; re-export the model"
        )
    return Scorer(session=session, card=card, path=path, threads=threads, batch_size=batch_size)


def feature_chunks(
    chunks: Iterable[EventChunk], *, prefetch: int = 0
) -> Iterator[tuple[EventChunk, Float32Array]]:
    """Yield (chunk, RMM features (n, 1287)) in order.

    With `prefetch` > 0 a worker thread reads the next `prefetch` chunks and computes their
    RMMs while the caller works on the current one (e.g. onnxruntime scoring, which releases
    the GIL); this pays only when a core is free (see bench/bench_autoencoder.py).
    """
    if prefetch < 0:
        raise InvalidInputError(f"prefetch must be >= 0 chunks, got {prefetch}")
    if prefetch == 0:
        for chunk in chunks:
            yield chunk, rmm_feature_rows(chunk)
        return
    iterator = iter(chunks)

    def next_features() -> tuple[EventChunk, Float32Array] | None:
        chunk = next(iterator, None)
        if chunk is None:
            return None
        return chunk, rmm_feature_rows(chunk)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomscan-rmm") as pool:
        pending: deque[Future[tuple[EventChunk, Float32Array] | None]] = deque(
            pool.submit(next_features) for _ in range(prefetch)
        )
        while pending:
            item = pending.popleft().result()
            if item is None:
                break
            pending.append(pool.submit(next_features))
            yield item


def scored_chunks(
    chunks: Iterable[EventChunk], scorer: Scorer, *, prefetch: int = 0
) -> Iterator[tuple[EventChunk, FloatArray]]:
    """Yield (chunk, ln(MSE) per event) in order; see `feature_chunks` for `prefetch`."""
    for chunk, features in feature_chunks(chunks, prefetch=prefetch):
        yield chunk, scorer.score(features)


def score_agreement(
    reference: npt.ArrayLike,
    other: npt.ArrayLike,
    lumi_pb: float,
    xsec_points_pb: Sequence[float] = (0.1, 1.0, 10.0),
) -> ScoreAgreement:
    """Spearman rho of two scorings and the overlap of their ARs at each cross-section (pb)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise InvalidInputError(
            f"two 1-d score arrays of the same length (>= 2) are needed, got {a.shape} "
            f"and {b.shape}"
        )
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise InvalidInputError("the Spearman correlation is undefined: one scoring is constant")
    overlaps = []
    for xsec_pb in xsec_points_pb:
        selected_a = anomaly_region(a, xsec_pb, lumi_pb).selected
        selected_b = anomaly_region(b, xsec_pb, lumi_pb).selected
        overlaps.append(
            XsecOverlap(
                xsec_pb=float(xsec_pb),
                n_selected=int(selected_a.sum()),
                n_common=int(np.count_nonzero(selected_a & selected_b)),
            )
        )
    rho = float(stats.spearmanr(a, b).statistic)
    return ScoreAgreement(spearman_rho=rho, overlaps=tuple(overlaps))


def _check_file_matches_card(path: Path, card: ModelCard) -> None:
    actual = file_sha256(path)
    if actual != card.onnx_sha256:
        raise ModelError(
            f"model {path} does not match its card {card_path(path)}: SHA-256 {actual[:12]}... "
            f"but the card records {card.onnx_sha256[:12]}... (for {card.model_file}); "
            "the file was changed or the card belongs to another model: re-export it"
        )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ModelError(
            "training and exporting the autoencoder need torch, which is not installed; "
            "install the `train` extra (pip install 'anomscan[train]'); scoring an exported "
            "model needs only onnxruntime"
        ) from error
    return torch


def _build_network(
    n_features: int, hidden_sizes: tuple[int, ...], mean: FloatArray, scale: FloatArray
) -> Any:
    import torch
    from torch import nn

    class StandardisedAutoencoder(nn.Module):
        """Raw features -> per-event MSE of the reconstruction of the standardised features."""

        def __init__(self) -> None:
            super().__init__()
            widths = (n_features, *hidden_sizes, n_features)
            layers: list[nn.Module] = []
            for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
                layers.append(nn.Linear(width_in, width_out))
                if index < len(widths) - 2:
                    layers.append(nn.LeakyReLU())
            self.layers = nn.Sequential(*layers)
            self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
            self.register_buffer("inverse_scale", torch.from_numpy(1.0 / scale.astype(np.float32)))

        def standardise(self, x: Any) -> Any:
            return (x - self.mean) * self.inverse_scale

        def forward(self, x: Any) -> Any:
            z = self.standardise(x)
            return torch.mean((self.layers(z) - z) ** 2, dim=1)

    return StandardisedAutoencoder()


def _fit(
    network: Any,
    fit_z: Any,
    validation_z: Any,
    *,
    rng: np.random.Generator,
    max_epochs: int,
    patience: int,
    learning_rate: float,
    batch_size: int,
) -> LossCurve:
    import torch

    optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
    train_curve: list[float] = []
    validation_curve: list[float] = []
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(network.state_dict())
    n_fit = fit_z.shape[0]
    for epoch in range(max_epochs):
        network.train()
        order = torch.from_numpy(rng.permutation(n_fit))
        total = 0.0
        for start in range(0, n_fit, batch_size):
            batch = fit_z[order[start : start + batch_size]]
            optimiser.zero_grad()
            loss = torch.mean((network.layers(batch) - batch) ** 2)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * batch.shape[0]
        network.eval()
        validation = _mean_loss(network, validation_z)
        train_curve.append(total / n_fit)
        validation_curve.append(validation)
        if not (math.isfinite(validation) and math.isfinite(train_curve[-1])):
            raise ModelError(
                f"training diverged at epoch {epoch}: loss {train_curve[-1]}, validation "
                f"{validation}; lower the learning rate (now {learning_rate})"
            )
        if validation < best_loss:
            best_loss, best_epoch = validation, epoch
            best_state = copy.deepcopy(network.state_dict())
        elif epoch - best_epoch >= patience:
            break
    network.load_state_dict(best_state)
    stopped_early = len(train_curve) < max_epochs
    return LossCurve(tuple(train_curve), tuple(validation_curve), best_epoch, stopped_early)


def _mean_loss(network: Any, z: Any) -> float:
    """Mean squared reconstruction error of standardised `z`, `_BLOCK_ROWS` rows at a time.

    One batch would hold the activations of every row at once (0.3 GB for 20k events).
    """
    import torch

    total = 0.0
    with torch.no_grad():
        for start in range(0, z.shape[0], _BLOCK_ROWS):
            batch = z[start : start + _BLOCK_ROWS]
            total += float(torch.sum((network.layers(batch) - batch) ** 2, dtype=torch.float64))
    return float(total / (z.shape[0] * z.shape[1]))


def _check_features(features: npt.ArrayLike, n_features: int | None) -> Float32Array:
    values = np.ascontiguousarray(features, dtype=np.float32)
    if values.ndim != 2 or (n_features is not None and values.shape[1] != n_features):
        width = "n_features" if n_features is None else str(n_features)
        raise InvalidInputError(
            f"features must have shape (events, {width}), got {values.shape}; "
            "pass rmm_features(...) of the events"
        )
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(
            f"{int((~finite).sum())} events have non-finite features (first at row {first}); "
            "the RMM must be finite: check the inputs of those events"
        )
    return values


def _check_event_ids(event_ids: npt.ArrayLike) -> IntArray:
    ids = np.asarray(event_ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise InvalidInputError(
            f"event ids must be a 1-d integer array, got dtype {ids.dtype} and shape {ids.shape}"
        )
    return np.ascontiguousarray(ids, dtype=np.int64)


def _splitmix64(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = values + _GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def _batched_mse(
    values: Float32Array, batch_size: int, mse_of: Callable[[Float32Array], npt.ArrayLike]
) -> FloatArray:
    """Per-event MSE, `mse_of` applied to consecutive batches of `batch_size` events."""
    out = np.empty(len(values), dtype=np.float64)
    for start in range(0, len(values), batch_size):
        out[start : start + batch_size] = mse_of(values[start : start + batch_size])
    return out


def _log_mse(mse: FloatArray) -> FloatArray:
    bad = ~(np.isfinite(mse) & (mse > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ModelError(
            f"{int(bad.sum())} events have a reconstruction error that is not a positive "
            f"number (first at row {first}: {mse[first]}); ln(MSE) is undefined: "
            "check the model file"
        )
    return np.log(mse)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "numpy", "anomscan"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
