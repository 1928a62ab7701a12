"""Reinterpretation tools: `signal_acceptance` (the ADFilter use case) and the run reader.

`signal_acceptance` runs a user's signal events (any schema the readers support, or the
generator's output) through the selection, RMM and autoencoder of a finished scan (its own
model file) and reports, per stream and AR point of the run, the fraction of the sample's
events that pass the run's cut and their mass distribution in the 9 pairs (the run's
binning); the definitions are in core/reinterp.py. It writes RUN/acceptance/<name>.json and
.csv (atomically) and returns the same numbers.

Interface for limits: `spectra["T2/jm"]["points"][i]["acceptance"]` is A of spectrum T2/jm
at AR point `points_pb[i]`: a model of cross-section sigma (pb) puts sigma x A x
`lumi_search_pb` events into that spectrum, so a limit L (pb, per spectrum and point, on
sigma x A x eff counted over the same luminosity) excludes sigma_model > L / A.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from core.anomaly import luminosity_after_training, requested_count
from core.autoencoder import ModelCard, read_model_card, training_selection
from core.errors import InvalidInputError, ModelError
from core.events import ObjectSelection, SchemaName
from core.files import exclusive_output, file_sha256, json_text, write_text
from core.fitrange import default_upper_edge
from core.masses import PAIRS, STREAM_FIT_FROM_GEV, STREAMS, mass_bin_edges
from core.regions import StreamRanking, rank_streams, ranked_values, search_spectrum
from core.reinterp import AcceptanceResult, RegionCut, score_sample, signal_acceptance
from core.table import MASS_COLUMNS
from tools.common import StrictModel, require_file
from tools.registry import FilePath, PathText, register

SQRT_S_GEV = 13000.0
"""Collision energy of the scan's spectra (the scan fits at the default sqrt(s))."""


@dataclass(frozen=True)
class RunInputs:
    """What reinterpretation needs of a finished scan's run folder."""

    run_dir: Path
    lumi_pb: float
    points_pb: tuple[float, ...]
    model: Path
    model_sha256: str
    card: ModelCard
    table_path: Path
    selection: ObjectSelection
    results: dict[str, Any]
    config: dict[str, Any]

    def training_keys(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of the event `keys` the autoencoder was trained on."""
        return training_selection(keys, self.card.fraction, self.card.seed)

    def ranking(self) -> StreamRanking:
        """Every stream's search events, ranked one past the loosest AR point of the run.

        One pass over the key, score and stream columns of the run's table (never the whole
        table): the ranking holds each region and the score of the first event outside it.
        """
        depth = requested_count(max(self.points_pb), self.lumi_pb) + 1 if self.points_pb else 0
        return rank_streams(self.table_path, depth, self.training_keys)

    def ranked_masses(
        self, ranking: StreamRanking, pair: str
    ) -> tuple[npt.NDArray[np.float64], ...]:
        """Per stream, the `pair` mass (GeV, NaN without the pair) of each ranked event."""
        return ranked_values(self.table_path, ranking, MASS_COLUMNS[PAIRS.index(pair)])

    def search_spectrum(self, stream: str, pair: str) -> npt.NDArray[np.int64]:
        """The `pair` spectrum of the whole `stream`'s search events (training left out)."""
        return search_spectrum(self.table_path, stream, pair, self.training_keys)

    def lumi_search_pb(self, ranking: StreamRanking) -> float:
        """L_search = (1 - f) L_int of the run (pb^-1), f from the table's `ranking`."""
        return luminosity_after_training(self.lumi_pb, ranking.training_fraction)


def read_run(run_dir: Path) -> RunInputs:
    """The inputs of a finished scan in `run_dir`; InvalidInputError/ModelError say what lacks."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InvalidInputError(
            f"run folder {run_dir} does not exist; give the --out folder of `anomscan scan`"
        )
    results_path = run_dir / "results.json"
    config_path = run_dir / "config.json"
    if not results_path.is_file() or not config_path.is_file():
        raise InvalidInputError(
            f"{run_dir} holds no finished scan (no results.json or config.json); run "
            "`anomscan scan --out` into it (or --resume it) first"
        )
    try:
        results = json.loads(results_path.read_text())
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(
            f"{results_path} or {config_path} is not readable JSON ({error}); rerun the scan"
        ) from error
    plan_path = run_dir / "events" / "pass.json"
    if not plan_path.is_file():
        raise InvalidInputError(
            f"{run_dir} has no event table (events/pass.json); the scan did not finish its "
            "event pass: resume it"
        )
    plan = json.loads(plan_path.read_text())
    model = Path(str(plan.get("model") or ""))
    if not plan.get("model") or not model.is_file():
        raise ModelError(
            f"the autoencoder of run {run_dir} ({plan.get('model')}) is missing; put the "
            "scan's model file back (its SHA-256 is in results.json) or rerun the scan"
        )
    card = read_model_card(model)
    digest = file_sha256(model)
    if results.get("model_sha256") not in (None, digest):
        raise ModelError(
            f"model {model} has SHA-256 {digest[:12]}..., not the {results['model_sha256'][:12]}"
            f"... the run was scored with; restore the run's model"
        )
    selection_fields: dict[str, Any] = {
        key: (tuple(value) if isinstance(value, list) else value)
        for key, value in plan.get("selection", {}).items()
    }
    selection = ObjectSelection(**selection_fields)
    return RunInputs(
        run_dir=run_dir,
        lumi_pb=float(results["luminosity_pb"]),
        points_pb=tuple(float(p) for p in results["points_pb"]),
        model=model,
        model_sha256=digest,
        card=card,
        table_path=run_dir / "events",
        selection=selection,
        results=results,
        config=config,
    )


def fit_ranges() -> dict[str, tuple[float, float]]:
    """Per stream [fit start, fixed upper edge] in GeV, the range a spectrum is fitted in."""
    upper = default_upper_edge(mass_bin_edges(), SQRT_S_GEV)
    return {stream: (STREAM_FIT_FROM_GEV[stream], upper) for stream in STREAMS}


def run_region_cuts(run: RunInputs, ranking: StreamRanking) -> list[RegionCut]:
    """The score cut of every stream at every AR point of the run (its own data set them)."""
    cuts = []
    for point in run.points_pb:
        whole = ranking.regions(point, run.lumi_pb).whole_stream
        for k, cut in enumerate(ranking.cuts(point, run.lumi_pb)):
            cuts.append(RegionCut(point, STREAMS[k], cut, whole[k]))
    return cuts


class SignalAcceptanceInput(StrictModel):
    """A signal sample and the run whose selection, model and AR cuts it goes through."""

    run_dir: FilePath = Field(description="run folder of a finished `anomscan scan`")
    inputs: list[PathText] = Field(
        min_length=1, max_length=10_000, description="ROOT files of the signal sample"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    tree: str | None = Field(None, min_length=1, max_length=1000)
    mapping: PathText | None = Field(None, description="column-mapping TOML for schema 'mapping'")
    name: str = Field(
        "",
        max_length=100,
        pattern=r"^[A-Za-z0-9_.+-]*$",
        description="output name (RUN/acceptance/NAME.json); default the first file's stem",
    )


class PointAcceptance(StrictModel):
    """A at one AR point: fraction of the sample's events in the spectrum (see the module)."""

    point_pb: float
    acceptance: float
    acceptance_interval: tuple[float, float] = Field(
        description="68.27 % Clopper-Pearson interval of the unweighted fraction"
    )
    acceptance_fit_range: float = Field(description="the same, masses in the fit range only")
    n_pass: int
    counts: list[float] = Field(description="weighted mass histogram on `edges` (GeV)")


class SpectrumAcceptanceOutput(StrictModel):
    """One spectrum (stream/pair): its acceptance at every AR point of the run."""

    stream: str
    pair: str
    fit_range_gev: tuple[float, float]
    points: list[PointAcceptance]


class StreamPointOutput(StrictModel):
    """One stream at one AR point: the run's cut and the fraction of events passing it."""

    stream: str
    point_pb: float
    cut: float | None = Field(description="score cut of the run's data; null: whole stream")
    whole_stream: bool
    n_stream: int = Field(description="sample events in the stream")
    n_pass: int
    acceptance: float = Field(description="weighted fraction of all events passing")
    acceptance_interval: tuple[float, float]
    stream_acceptance: float = Field(description="weighted fraction in the stream, no AE cut")


class SignalAcceptanceOutput(StrictModel):
    """Acceptance per stream and AR point and per spectrum; where it was written."""

    name: str
    run_dir: str
    inputs: list[str]
    json_path: str
    csv_path: str
    n_events: int
    sum_weights: float
    lumi_pb: float
    lumi_search_pb: float = Field(description="(1 - f_train) L: luminosity of the ARs, pb^-1")
    model_sha256: str
    points_pb: list[float]
    edges: list[float]
    streams: list[StreamPointOutput]
    spectra: dict[str, SpectrumAcceptanceOutput]
    definition: str


DEFINITION = (
    "acceptance = (sum of weights of the sample's events in the stream, with score above the "
    "run's AR cut and the pair) / (sum of weights of all events of the sample); expected "
    "events in the spectrum = sigma_model x acceptance x lumi_search_pb"
)


def acceptance_output(
    result: AcceptanceResult,
    run: RunInputs,
    name: str,
    inputs: list[str],
    lumi_search_pb: float,
    json_path: Path,
    csv_path: Path,
) -> SignalAcceptanceOutput:
    """The tool's output (and the JSON file's content) from a core acceptance result."""
    ranges = fit_ranges()
    spectra: dict[str, SpectrumAcceptanceOutput] = {}
    for stream in STREAMS:
        for k, pair in enumerate(PAIRS):
            spectra[f"{stream}/{pair}"] = SpectrumAcceptanceOutput(
                stream=stream,
                pair=pair,
                fit_range_gev=ranges[stream],
                points=[
                    PointAcceptance(
                        point_pb=row.point_pb,
                        acceptance=row.pairs[k].acceptance,
                        acceptance_interval=row.pairs[k].acceptance_interval,
                        acceptance_fit_range=row.pairs[k].acceptance_fit_range,
                        n_pass=row.pairs[k].n_pass,
                        counts=row.pairs[k].counts.tolist(),
                    )
                    for row in result.streams
                    if row.stream == stream
                ],
            )
    return SignalAcceptanceOutput(
        name=name,
        run_dir=str(run.run_dir),
        inputs=inputs,
        json_path=str(json_path),
        csv_path=str(csv_path),
        n_events=result.n_events,
        sum_weights=result.sum_weights,
        lumi_pb=run.lumi_pb,
        lumi_search_pb=lumi_search_pb,
        model_sha256=run.model_sha256,
        points_pb=list(dict.fromkeys(row.point_pb for row in result.streams)),
        edges=result.edges.tolist(),
        streams=[
            StreamPointOutput(
                stream=row.stream,
                point_pb=row.point_pb,
                cut=None if row.whole_stream or not math.isfinite(row.cut) else row.cut,
                whole_stream=row.whole_stream,
                n_stream=row.n_stream,
                n_pass=row.n_pass,
                acceptance=row.acceptance,
                acceptance_interval=row.acceptance_interval,
                stream_acceptance=row.stream_acceptance,
            )
            for row in result.streams
        ],
        spectra=spectra,
        definition=DEFINITION,
    )


def acceptance_csv(output: SignalAcceptanceOutput) -> str:
    """One row per spectrum and AR point: the acceptances and counts (no histograms)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        (
            "spectrum",
            "point_pb",
            "whole_stream",
            "acceptance",
            "acceptance_lo68",
            "acceptance_hi68",
            "acceptance_fit_range",
            "n_pass",
            "stream_acceptance_ae",
        )
    )
    rows = {(s.stream, s.point_pb): s for s in output.streams}
    for name, spectrum in output.spectra.items():
        for point in spectrum.points:
            stream_row = rows[(spectrum.stream, point.point_pb)]
            writer.writerow(
                (
                    name,
                    f"{point.point_pb:.6g}",
                    stream_row.whole_stream,
                    f"{point.acceptance:.6g}",
                    f"{point.acceptance_interval[0]:.6g}",
                    f"{point.acceptance_interval[1]:.6g}",
                    f"{point.acceptance_fit_range:.6g}",
                    point.n_pass,
                    f"{stream_row.acceptance:.6g}",
                )
            )
    return buffer.getvalue()


def _checked_inputs(inputs: list[str]) -> list[str]:
    files = []
    for text in inputs:
        if "://" in text:
            files.append(text)
            continue
        path = Path(text)
        require_file(path, "signal file", "; give ROOT files of the signal sample")
        files.append(str(path.resolve()))
    return files


@register(
    "signal_acceptance",
    "Acceptance of a signal sample through a run's selection, autoencoder and AR cuts.",
    SignalAcceptanceInput,
    SignalAcceptanceOutput,
)
def signal_acceptance_tool(arguments: SignalAcceptanceInput) -> SignalAcceptanceOutput:
    """Score the sample with the run's model, apply its AR cuts, write JSON and CSV."""
    run = read_run(arguments.run_dir)
    files = _checked_inputs(list(arguments.inputs))
    name = arguments.name or Path(files[0]).stem
    folder = run.run_dir / "acceptance"
    folder.mkdir(exist_ok=True)
    with exclusive_output(folder / f"{name}.json", what="acceptance"):
        return _signal_acceptance(arguments, run, files, name, folder)


def _signal_acceptance(
    arguments: SignalAcceptanceInput, run: RunInputs, files: list[str], name: str, folder: Path
) -> SignalAcceptanceOutput:
    ranking = run.ranking()
    cuts = run_region_cuts(run, ranking)
    lumi_search = run.lumi_search_pb(ranking)
    sample = score_sample(
        files,
        run.model,
        folder / f"{name}.events.parquet",
        schema=arguments.schema_name,
        selection=run.selection,
        tree=arguments.tree,
        mapping=arguments.mapping,
    )
    assert sample.score is not None
    result = signal_acceptance(
        sample.masses,
        sample.stream_bits,
        sample.score,
        sample.weight,
        cuts,
        mass_bin_edges(),
        fit_ranges(),
    )
    json_path = folder / f"{name}.json"
    csv_path = folder / f"{name}.csv"
    output = acceptance_output(result, run, name, files, lumi_search, json_path, csv_path)
    write_text(json_path, json_text(output.model_dump(mode="json"), indent=1), what="acceptance")
    write_text(csv_path, acceptance_csv(output), what="acceptance table")
    return output
