"""`anomscan acceptance` and `anomscan inject`: reinterpretation of a finished scan.

Both read the run folder and never change what the scan wrote (event table, model, spectra,
points, results.json): they write RUN/acceptance/ or RUN/injection/ (and RUN/sensitivity.json
and .csv) and append their rows to the run's audit log (a `steps` row, the tool calls, a
`decisions` row, the `artifacts`), so `anomscan audit verify` still passes. Definitions and
methods: core/reinterp.py.

Injection: signal events X -> pair of the requested mass and Gaussian width (with the
generator's extra objects) are generated (`generate_sample`, no background) and scored
with the run's model; per injected cross-section and toy a Poisson number of them (mean
sigma x L_search) is added to an in-memory copy of the run's event table, every AR point's
cut is taken again on the injected table (N = sigma_AR L_search fixed, so signal displaces
data events at the cut), and the spectra of the injected pair in the affected streams are
analysed again. The other spectra keep the run's results: they see the injected events only
through their non-resonant masses. Toys differ in the number and choice of injected events
(disjoint blocks of the generated pool) and, with `background="fit"` (the default), in the
background: the run's data of each re-analysed spectrum in its fit range are replaced by a
Poisson draw of the run's own accepted background prediction for that spectrum and AR point
(points/point-NNN.npz `background`), scaled by the data events the toy's cut keeps in the fit
range over those the run's cut kept (`core.reinterp.background_toy`); a spectrum the run
accepted no background for at that point keeps the data (its row says so). With
`background="data"` every toy has the run's data as background (one fluctuation of the data
under the peak biases every toy alike: this measures the data, not the method). Random
streams: toy t of strength i draws its signal count from numpy's generator seeded
[seed, 7, i, t] and the background of AR point p, stream k from [seed, 11, t, p, k] (the same
background for every strength), all in the driver, so serial and Ray runs are identical;
the rule rerun and the refits of a spectrum at AR point p take the seed the scan gave that
spectrum at p (`ScanRule.seed`), in every toy. With `fit`, each strength also has one
"observed" realisation: the run's data plus toy 0's signal, for the local Z and the
top-excess check on the real data (`observed`, not in the pulls).

Three recoveries per spectrum and realisation, each a Gaussian of fixed mass and width with
free yield, pull = (fitted - expected) / fit error against the expected yield:
- `signal_yield`/`pull` ("rule rerun"): the scan's rule run again on the injected spectrum
  (`core.spectrum.analyse_spectrum`, the library function of the per-spectrum rule:
  background choice, checks, bump hunt, window exclusion; no symbolic fallback) with the
  run's own settings and seeds (`ScanRule`: the check and hunt settings the run's graph gave
  its tools, read from the run's config, and the graph's per-spectrum seed of that spectrum
  and AR point), then background (the chosen function, floating) + Gaussian. Defined only
  when the rule accepts a background, which it does less often with more signal: these
  pulls are conditional on acceptance (`accepted_fraction` of the toys).
- `run_function_*`: the function the run accepted for that spectrum and point refitted to
  the injected spectrum (start: the run's parameters; no new choice), then the same fit; for
  a spectrum whose background the run found only after excluding its excess window, the
  final function of points/point-NNN.json (no start parameters).
- `fixed_shape_*`: the Gaussian over the run's own background prediction, its shape fixed
  and normalisation free (made before the injection: cannot absorb the signal; with
  `background="fit"` the toys are drawn from it, so this is the reference).

The expected Z with the AR cut and on the whole stream and dZ per AR point and pair are in
RUN/injection/NAME.json and, for all injections of the run, in RUN/sensitivity.json and
RUN/sensitivity.csv (rebuilt from every RUN/injection/*.json at each `anomscan inject`,
registered as artifacts, shown by the report). They are not added to results.json: that is
the scan's own output (its hash is in the audit and inject leaves every scan file unchanged).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.runtime.executor import Executor, map_batched
from agent.scan import ScanContext, cli_step, scan_checks, spectrum_seed
from core.anomaly import point_text, stream_anomaly_regions
from core.background import CheckOptions
from core.bumphunt import HuntOptions
from core.errors import AnomscanError, InvalidInputError
from core.files import json_text, write_bytes, write_text
from core.masses import (
    PAIRS,
    SPECTRUM_NAMES,
    STREAM_FIT_FROM_GEV,
    STREAMS,
    histogram,
    mass_bin_edges,
)
from core.reinterp import (
    RegionCut,
    ae_gain,
    background_toy,
    correctly_paired,
    fit_injected_signal,
    region_mask,
    score_sample,
    signal_sigma_gev,
    window_bins,
    window_expected_z,
)
from core.spectrum import SpectrumAnalysis, analyse_spectrum
from core.table import EventTable
from tools.registry import get_tool
from tools.reinterp import RunInputs, fit_ranges, read_run, run_region_cuts

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

BackgroundToys = Literal["fit", "data"]
"""The background of an injection toy: the run's prediction drawn anew, or the run's data."""

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_CSV = "sensitivity.csv"


def _call_logged(
    ctx: ScanContext, step_id: str, label: str, tool: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """Run one registered tool in this process and log the call (its error too), re-raising."""
    start = time.perf_counter()
    outcome: dict[str, Any] = {"output": None, "error": None, "worker": "cli"}
    try:
        outcome["output"] = get_tool(tool).call(payload)
    except AnomscanError as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
        outcome["seconds"] = time.perf_counter() - start
        ctx.log_tool_call(step_id, label, tool, payload, outcome)
        raise
    outcome["seconds"] = time.perf_counter() - start
    ctx.log_tool_call(step_id, label, tool, payload, outcome)
    output: dict[str, Any] = outcome["output"]
    return output


# ---------------------------------------------------------------- acceptance


def run_acceptance(
    run_dir: Path,
    files: Sequence[str],
    *,
    schema: str = "auto",
    name: str = "",
    tree: str | None = None,
    mapping: str | None = None,
) -> dict[str, Any]:
    """`anomscan acceptance RUN FILES...`: the `signal_acceptance` tool, audited in the run."""
    run = read_run(run_dir)
    payload: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "inputs": [str(f) for f in files],
        "schema": schema,
        "name": name,
    }
    if tree is not None:
        payload["tree"] = tree
    if mapping is not None:
        payload["mapping"] = mapping
    with cli_step(run.run_dir, "acceptance") as step:
        ctx, step_id = step.ctx, step.step_id
        output = _call_logged(ctx, step_id, name or "sample", "signal_acceptance", payload)
        for key in ("json_path", "csv_path"):
            ctx.artifact(Path(output[key]), "acceptance")
        from agent.figures.reinterp import acceptance_map

        plot = Path(output["json_path"]).with_name(f"{output['name']}-map.png")
        write_bytes(plot, acceptance_map(output), what="acceptance map")
        ctx.artifact(plot, "acceptance plot")
        best = max(output["streams"], key=lambda row: row["acceptance"])
        ctx.audit.add(
            "decisions",
            f"{step_id}:acceptance:{output['name']}",
            step_id=step_id,
            kind="acceptance",
            chosen={"name": output["name"], "n_events": output["n_events"]},
            options={"inputs": output["inputs"], "points_pb": output["points_pb"]},
            policy="rules",
            rationale=(
                f"{output['n_events']} signal events through the run's selection, RMM and "
                f"autoencoder (model {output['model_sha256'][:12]}); largest acceptance "
                f"{best['acceptance']:.3g} in {best['stream']} at {point_text(best['point_pb'])} pb"
            ),
            numbers={
                f"{row['stream']}@{row['point_pb']:g}": row["acceptance"]
                for row in output["streams"]
            },
        )
        step.summary = f"acceptance of {output['name']}"
    return output


# ---------------------------------------------------------------- injection


@dataclass(frozen=True)
class InjectionRequest:
    """What to inject: X -> pair at mass (GeV) of width fraction, at several cross-sections."""

    pair: str
    mass: float
    width: float
    xsec_pb: tuple[float, ...]
    streams: tuple[str, ...] | None = None
    toys: int = 1
    seed: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    executor: Executor = "serial"
    name: str = ""
    background: BackgroundToys = "fit"
    """Toys' background: "fit" a Poisson draw of the run's accepted prediction, "data" the
    run's data (module docstring)."""
    rule_toys: int | None = None
    """The scan's rule is rerun in the first `rule_toys` toys of each strength (None: all);
    the run-function and fixed-shape recoveries run in every toy. The rule (choice, checks,
    bump hunt) costs ~1 s a spectrum, the two fits a fraction of it."""

    def label(self) -> str:
        """The output name: NAME or pair-mass-width."""
        return self.name or f"{self.pair}-{self.mass:g}-w{self.width:g}"


def check_request(request: InjectionRequest) -> list[str]:
    """The streams to analyse; InvalidInputError (what, where, what to do) for bad input."""
    if request.pair not in PAIRS:
        raise InvalidInputError(
            f"--pair {request.pair!r} is not one of the 9 pairs {list(PAIRS)}; e.g. --pair jm"
        )
    bad = [x for x in request.xsec_pb if not (math.isfinite(x) and x > 0)]
    if not request.xsec_pb or bad:
        raise InvalidInputError(
            f"--xsec must be positive cross-sections in pb, got {list(request.xsec_pb)}; e.g. "
            "--xsec 0.02,0.05,0.1"
        )
    if request.toys < 1 or request.toys > 1000:
        raise InvalidInputError(f"--toys must be in 1..1000, got {request.toys}")
    if request.seed < 0:
        raise InvalidInputError(f"--seed must be a non-negative integer, got {request.seed}")
    if request.rule_toys is not None and not 0 <= request.rule_toys <= request.toys:
        raise InvalidInputError(
            f"--rule-toys must be in 0..--toys ({request.toys}), got {request.rule_toys}"
        )
    if request.background not in ("fit", "data"):
        raise InvalidInputError(
            f"--background {request.background!r}: expected 'fit' (toys drawn from the run's "
            "background prediction) or 'data' (the run's data in every toy)"
        )
    signal_sigma_gev(request.mass, request.width)
    ranges = fit_ranges()
    if request.streams is not None:
        unknown = [s for s in request.streams if s not in STREAMS]
        if unknown:
            raise InvalidInputError(f"--stream {unknown}: not streams; give some of {STREAMS}")
        outside = [s for s in request.streams if not ranges[s][0] < request.mass < ranges[s][1]]
        if outside:
            raise InvalidInputError(
                f"--mass {request.mass:g} GeV lies outside the fit range of stream(s) "
                + ", ".join(f"{s} ({ranges[s][0]:g}-{ranges[s][1]:g} GeV)" for s in outside)
                + "; choose a mass inside or other --stream"
            )
        return list(request.streams)
    inside = [s for s in STREAMS if ranges[s][0] < request.mass < ranges[s][1]]
    if not inside:
        low = min(r[0] for r in ranges.values())
        high = max(r[1] for r in ranges.values())
        raise InvalidInputError(
            f"--mass {request.mass:g} GeV lies outside every spectrum's fit range "
            f"({low:g}-{high:g} GeV); choose a mass inside it"
        )
    return inside


@dataclass(frozen=True)
class SignalPool:
    """Generated, scored signal events (rows of an event table) and whether each is paired."""

    table: EventTable
    paired: BoolArray
    block: int

    def rows(self, toy: int, count: int) -> npt.NDArray[np.int64]:
        """The first `count` rows of toy `toy`'s block (blocks are disjoint)."""
        start = toy * self.block
        return np.arange(start, start + min(count, self.block), dtype=np.int64)


def _generate_pool(
    ctx: ScanContext,
    step_id: str,
    run: RunInputs,
    request: InjectionRequest,
    folder: Path,
    lumi_search: float,
) -> SignalPool:
    sigma = signal_sigma_gev(request.mass, request.width)
    largest = max(request.xsec_pb) * lumi_search
    block = math.ceil(largest + 5.0 * math.sqrt(largest) + 10.0)
    if block * request.toys > MAX_POOL_EVENTS:
        raise InvalidInputError(
            f"--xsec {max(request.xsec_pb):g} pb x {lumi_search:.4g} pb^-1 x --toys "
            f"{request.toys} needs {block * request.toys} generated events, more than "
            f"{MAX_POOL_EVENTS}; lower the largest cross-section or the number of toys"
        )
    payload = {
        "output_dir": str(folder / "signal"),
        "n_events": 0,
        "seed": request.seed,
        "lumi_pb": run.lumi_pb,
        "signals": [
            {
                "pair": request.pair,
                "mass": request.mass,
                "width": sigma,
                "n_events": block * request.toys,
                "extra": dict(request.extra),
                "lineshape": "gaussian",
            }
        ],
    }
    generated = _call_logged(ctx, step_id, "signal pool", "generate_sample", payload)
    table = score_sample(
        generated["files"],
        run.model,
        folder / "signal-events.parquet",
        schema="nanoaod",
        selection=run.selection,
    )
    truth = json.loads(Path(generated["truth"]).read_text())["truth"][0]
    true_mass = dict(zip(truth["events"], truth["true_mass"], strict=True))
    order = np.argsort(table.event, kind="stable")
    table = _take(table, order)
    masses = table.masses[:, PAIRS.index(request.pair)]
    truth_of_row = np.array([true_mass[int(e)] for e in table.event], dtype=np.float64)
    return SignalPool(table, correctly_paired(masses, truth_of_row), block)


MAX_POOL_EVENTS = 5_000_000
"""Most signal events one injection generates (toys x the largest strength's block)."""

MIN_STREAM_FRACTION = 0.05
"""Without --stream, the streams whose spectrum of the pair gets at least this fraction of
the generated events (with the pair of the decay) are analysed."""


def _reached_streams(pool: SignalPool, request: InjectionRequest, inside: list[str]) -> list[str]:
    """The streams (among those whose fit range holds the mass) the signal reaches."""
    column = PAIRS.index(request.pair)
    has_pair = pool.paired & np.isfinite(pool.table.masses[:, column])
    fractions = {
        stream: float(np.mean(has_pair & pool.table.stream_bits[:, STREAMS.index(stream)]))
        for stream in inside
    }
    reached = [stream for stream in inside if fractions[stream] >= MIN_STREAM_FRACTION]
    if not reached:
        raise InvalidInputError(
            f"the generated X({request.mass:g}) -> {request.pair} reaches none of the streams "
            f"{inside} with {MIN_STREAM_FRACTION:.0%} of its events ("
            + ", ".join(f"{s} {f:.1%}" for s, f in fractions.items())
            + "); choose --stream, or --extra objects that fire a trigger"
        )
    return reached


def _take(table: EventTable, rows: npt.NDArray[np.int64]) -> EventTable:
    def pick(value: Any) -> Any:
        return None if value is None else np.asarray(value)[rows]

    return EventTable(
        event=table.event[rows],
        run=table.run[rows],
        weight=table.weight[rows],
        stream_bits=table.stream_bits[rows],
        masses=table.masses[rows],
        score=pick(table.score),
        lumi_block=pick(table.lumi_block),
        source_id=pick(table.source_id),
        key=pick(table.key),
        training=pick(table.training),
    )


def _joined(data: EventTable, signal: EventTable) -> EventTable:
    """A new table: the run's rows, then the injected ones (no array of `data` is changed)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(EventTable):
        a, b = getattr(data, item.name), getattr(signal, item.name)
        values[item.name] = None if a is None or b is None else np.concatenate([a, b])
    return EventTable(**values)


@dataclass(frozen=True)
class ScanRule:
    """The per-spectrum rule as the run's scan ran it: its settings and its seeds.

    `checks` are the robustness-check settings the graph gives `choose_background`
    (`agent.scan.scan_checks` of the run's config), `hunt` those of its
    `search_spectrum` calls (the tool's defaults, which the graph leaves unset) and
    `min_events` the config's fit threshold; `seed` is the graph's per-spectrum seed, from
    the config's seed. The symbolic fallback is not run (its budget is the scan's).
    """

    checks: CheckOptions
    hunt: HuntOptions
    min_events: int
    config_seed: int

    def seed(self, point_index: int, name: str) -> int:
        """The seed the scan gave spectrum `name` at its AR point number `point_index`."""
        return spectrum_seed(self.config_seed, point_index, name)

    def analyse(
        self, name: str, edges: FloatArray, counts: FloatArray, seed: int
    ) -> SpectrumAnalysis:
        """`core.spectrum.analyse_spectrum` on one spectrum, from its stream's fit start."""
        stream = name.split("/", maxsplit=1)[0]
        return analyse_spectrum(
            edges,
            counts,
            STREAM_FIT_FROM_GEV[stream],
            checks=self.checks,
            hunt=self.hunt,
            min_events=self.min_events,
            seed=seed,
        )


def scan_rule(ctx: ScanContext) -> ScanRule:
    """The rule of the run whose config `ctx` holds, with the settings its graph used."""
    from tools.fits import CheckSettings
    from tools.spectrum import HuntSettings

    return ScanRule(
        checks=CheckSettings.model_validate(scan_checks(ctx.config)).to_core(),
        hunt=HuntSettings().to_core(),
        min_events=ctx.config.min_events,
        config_seed=ctx.config.seed,
    )


@dataclass(frozen=True)
class SpectrumJob:
    """One injected spectrum at one AR point, analysed with the scan's rule (any worker)."""

    name: str
    edges: FloatArray
    counts: FloatArray
    point_pb: float
    seed: int
    mass: float
    sigma: float
    rule: ScanRule
    whole_stream: bool
    run_background: dict[str, Any] | None = None
    """The run's accepted background of this spectrum at this point (function, fit_range)."""
    run_expected: FloatArray | None = None
    """The run's final expected background per bin (0 outside its fit range), if accepted."""
    rerun_rule: bool = True
    """Whether the scan's rule runs again here (else only the two fixed recoveries)."""


def _fixed_shape_fit(job: SpectrumJob) -> dict[str, Any]:
    """The yield over the run's own background prediction (shape fixed, normalisation free).

    The run fitted its background before anything was injected, so this recovery is free of
    the background absorbing the signal: the reference of the injection test.
    """
    from core.significance import signal_fit

    if job.run_expected is None:
        return {"fixed_shape_status": "the run accepted no background here"}
    inside = np.flatnonzero(job.run_expected > 0)
    first, stop = int(inside[0]), int(inside[-1]) + 1
    try:
        fit = signal_fit(
            job.counts[first:stop],
            job.run_expected[first:stop],
            job.edges[first : stop + 1],
            job.mass,
            job.sigma,
            background_normalisation="floating",
        )
    except AnomscanError as error:
        return {"fixed_shape_status": f"fit failed: {str(error).splitlines()[0]}"}
    return {
        "fixed_shape_status": "fitted",
        "fixed_shape_yield": fit.signal_yield,
        "fixed_shape_yield_error": fit.signal_yield_error,
        "fixed_shape_local_z": fit.local_z,
    }


def _fixed_function_fit(job: SpectrumJob) -> dict[str, Any]:
    """The yield with the run's own accepted function refitted (no new choice): every toy."""
    from core.fit import fit_background
    from core.fitfunctions import FUNCTIONS

    entry = job.run_background
    if entry is None:
        return {"run_function_status": "the run accepted no background here"}
    if entry["name"] not in FUNCTIONS:
        return {"run_function_status": f"symbolic background {entry['function']!r}: not refitted"}
    try:
        fit = fit_background(
            job.edges,
            job.counts,
            entry["name"],
            tuple(entry["fit_range"]),
            starts=None if entry["parameters"] is None else [entry["parameters"]],
            seed=job.seed,
        )
        recovered = fit_injected_signal(job.edges, job.counts, fit, job.mass, job.sigma)
    except AnomscanError as error:
        return {"run_function_status": f"fit failed: {str(error).splitlines()[0]}"}
    return {
        "run_function_status": "fitted",
        "run_function": entry["name"],
        "run_function_yield": recovered.signal_yield,
        "run_function_yield_error": recovered.signal_yield_error,
        "run_function_local_z": recovered.local_z,
    }


RULE_NOT_RERUN = "rule not rerun"
"""The status of a toy beyond --rule-toys (its spectrum only refitted, module docstring)."""


def analyse_injected(job: SpectrumJob) -> dict[str, Any]:
    """Background choice + bump hunt (the scan's rule), then the background + Gaussian fit.

    Also the same Gaussian fit on the run's own accepted function (refitted to the injected
    spectrum, no new choice): the rule's checks reject more often the toys with more signal,
    so its yields are conditional on acceptance, the fixed function's are not.
    """
    fixed = _fixed_function_fit(job) | _fixed_shape_fit(job)
    if not job.rerun_rule:
        return {
            "status": RULE_NOT_RERUN,
            "reason": "the rule runs in the first --rule-toys toys",
        } | fixed
    result = job.rule.analyse(job.name, job.edges, job.counts, job.seed)
    row: dict[str, Any] = {"status": result.status, "reason": result.reason, **fixed}
    if result.status != "accepted" or result.search is None:
        return row
    bump = result.search.bump
    row.update(
        function=result.search.function,
        window_gev=[bump.mass_low, bump.mass_high],
        bump_local_z=bump.local_z,
        bump_global_p=bump.global_p,
    )
    try:
        fit = fit_injected_signal(job.edges, job.counts, result.search.fit, job.mass, job.sigma)
    except AnomscanError as error:
        row["fit_error"] = str(error).splitlines()[0]
        return row
    row.update(
        signal_yield=fit.signal_yield,
        signal_yield_error=fit.signal_yield_error,
        local_z=fit.local_z,
        fraction_in_range=fit.fraction_in_range,
    )
    return row


@dataclass(frozen=True)
class RunPoint:
    """One AR point as the run wrote it (points/point-NNN.json and its NPZ).

    `counts` and `background` are (63, bins) over the whole histogram, rows in
    SPECTRUM_NAMES order: the data under the run's AR cut and the final accepted background
    (0 where none); `spectra` the JSON's per-spectrum records.
    """

    point_pb: float
    edges: FloatArray
    counts: FloatArray
    background: FloatArray
    spectra: list[dict[str, Any]]

    def status(self, name: str) -> str | None:
        """The spectrum's status at this point ("excess": a background was accepted)."""
        return next((s["status"] for s in self.spectra if s["spectrum"] == name), None)

    def accepted_background(self, name: str) -> FloatArray | None:
        """The run's final background of `name` here when it was accepted, else None."""
        if self.status(name) != "excess":
            return None
        return np.asarray(self.background[SPECTRUM_NAMES.index(name)], dtype=np.float64)


def _run_points(run: RunInputs) -> dict[float, RunPoint]:
    """Every AR point of the run (points/point-NNN.json), read once."""
    found = {}
    for path in sorted((run.run_dir / "points").glob("point-[0-9][0-9][0-9].json")):
        record = json.loads(path.read_text())
        with np.load(path.with_name(record["arrays"])) as data:
            found[float(record["point_pb"])] = RunPoint(
                float(record["point_pb"]),
                np.asarray(data["edges"], dtype=np.float64),
                np.asarray(data["counts"], dtype=np.float64),
                np.asarray(data["background"], dtype=np.float64),
                list(record["spectra"]),
            )
    return found


def _run_accepted_backgrounds(
    run: RunInputs, points: dict[float, RunPoint]
) -> dict[tuple[float, str], dict[str, Any]]:
    """(point, spectrum) -> the background the run accepted there (function, fit range).

    From points/*-backgrounds.json (with the fitted parameters as the refit's start); a
    spectrum whose first background was provisional and whose window exclusion found the
    final one (status "excess" in points/point-NNN.json) takes that final function and the
    bins of its fit range, without start parameters.
    """
    found = {}
    for path in sorted((run.run_dir / "points").glob("point-*-backgrounds.json")):
        record = json.loads(path.read_text())
        for name, entry in record["backgrounds"].items():
            if entry.get("status") == "accepted":
                found[(float(record["point_pb"]), name)] = entry
    for point, record in points.items():
        edges = record.edges
        for entry in record.spectra:
            key = (point, entry["spectrum"])
            if key in found or entry["status"] != "excess" or not entry.get("function"):
                continue
            first, stop = (int(v) for v in entry["bins"])
            found[key] = {
                "name": entry["function"],
                "function": entry["function"],
                "fit_range": [float(edges[first]), float(edges[stop])],
                "parameters": None,
                "status": "accepted after the window exclusion",
            }
    return found


def _window_overlaps(window: Sequence[float], mass: float, sigma: float) -> bool:
    return bool(window[0] < mass + 2 * sigma and window[1] > mass - 2 * sigma)


def _whole_stream_background(
    run: RunInputs,
    table: EventTable,
    stream: str,
    pair: str,
    rule: ScanRule,
) -> tuple[FloatArray | None, str]:
    """The accepted background of the whole stream (training events left out), fitted here.

    The scan's rule with the seed the scan would give the spectrum at one AR point past its
    last (the whole stream is not one of the run's points here).
    """
    mask = ~run.training(table)
    counts, edges = histogram(table.masses, table.stream_bits, stream, pair, mask)
    name = f"{stream}/{pair}"
    result = rule.analyse(name, edges, counts.astype(float), rule.seed(len(run.points_pb), name))
    if result.status != "accepted" or result.search is None:
        return None, result.status
    background = np.zeros(len(edges) - 1)
    background[result.search.first_bin : result.search.stop_bin] = result.search.background
    return background, "accepted"


def _sensitivity(
    run: RunInputs,
    table: EventTable,
    cuts: list[RegionCut],
    pool: SignalPool,
    request: InjectionRequest,
    streams: list[str],
    lumi_search: float,
    backgrounds: dict[float, RunPoint],
    rule: ScanRule,
) -> list[dict[str, Any]]:
    """Expected Z with the AR cut and on the whole stream, dZ, per strength, stream and point."""
    sigma = signal_sigma_gev(request.mass, request.width)
    edges = mass_bin_edges()
    first, stop = window_bins(edges, request.mass, sigma)
    column = PAIRS.index(request.pair)
    signal = pool.table
    assert signal.score is not None
    values = signal.masses[:, column]
    in_window = np.isfinite(values) & (values >= edges[first]) & (values < edges[stop])
    n_pool = len(signal)
    rows = []
    for stream in streams:
        name = f"{stream}/{request.pair}"
        k = list(STREAMS).index(stream)
        whole_bits = signal.stream_bits[:, k] & in_window
        whole_fraction = float(np.count_nonzero(whole_bits)) / n_pool
        whole_b, whole_status = None, "not fitted"
        for cut in cuts:
            if cut.stream == stream and cut.whole_stream and cut.point_pb in backgrounds:
                whole_b = backgrounds[cut.point_pb].accepted_background(name)
                if whole_b is not None:
                    whole_status = "run point"
                    break
        if whole_b is None:
            whole_b, whole_status = _whole_stream_background(run, table, stream, request.pair, rule)
        b_whole = None if whole_b is None else float(whole_b[first:stop].sum())
        for cut in cuts:
            if cut.stream != stream:
                continue
            passed = region_mask(signal.score, signal.stream_bits, cut) & in_window
            fraction = float(np.count_nonzero(passed)) / n_pool
            b_ae = None
            status = "not in the run"
            if cut.point_pb in backgrounds:
                status = backgrounds[cut.point_pb].status(name) or "not in the run"
                accepted = backgrounds[cut.point_pb].accepted_background(name)
                if accepted is not None:
                    b_ae = float(accepted[first:stop].sum())
                    status = "accepted"
            for xsec in request.xsec_pb:
                mu = xsec * lumi_search
                z_ae = None if b_ae is None else window_expected_z(mu * fraction, b_ae)
                z_whole = (
                    None if b_whole is None else window_expected_z(mu * whole_fraction, b_whole)
                )
                rows.append(
                    {
                        "spectrum": name,
                        "point_pb": cut.point_pb,
                        "whole_stream": cut.whole_stream,
                        "xsec_pb": xsec,
                        "window_gev": [float(edges[first]), float(edges[stop])],
                        "signal_ae": mu * fraction,
                        "background_ae": b_ae,
                        "background_ae_status": status,
                        "z_ae": z_ae,
                        "signal_whole_stream": mu * whole_fraction,
                        "background_whole_stream": b_whole,
                        "background_whole_stream_status": whole_status,
                        "z_whole_stream": z_whole,
                        "dz_percent": ae_gain(z_ae, z_whole),
                        "dz_note": dz_note(z_ae, z_whole, status, whole_status),
                    }
                )
    return rows


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
    }


@dataclass(frozen=True)
class Realisation:
    """One injected event table: toy `toy` of strength `strength` (or the observed one)."""

    strength: int
    xsec_pb: float
    toy: int
    observed: bool = False


@dataclass(frozen=True)
class InjectionInputs:
    """What every realisation of one injection shares (read once in the driver)."""

    run: RunInputs
    request: InjectionRequest
    streams: list[str]
    table: EventTable
    exclude: BoolArray
    training_fraction: float
    lumi_search: float
    pool: SignalPool
    run_points: dict[float, RunPoint]
    run_backgrounds: dict[tuple[float, str], dict[str, Any]]
    rule: ScanRule


def _realisations(request: InjectionRequest) -> list[Realisation]:
    """Every strength's toys, then (background "fit") its observed realisation."""
    found = []
    for i, xsec in enumerate(request.xsec_pb):
        found += [Realisation(i, xsec, toy) for toy in range(request.toys)]
        if request.background == "fit":
            found.append(Realisation(i, xsec, 0, observed=True))
    return found


def _realisation_jobs(
    inputs: InjectionInputs, realisation: Realisation
) -> list[tuple[SpectrumJob, dict[str, Any]]]:
    """The spectra of one realisation to analyse again, each with its row's known numbers."""
    run, request, pool, table = inputs.run, inputs.request, inputs.pool, inputs.table
    signal_rng = np.random.default_rng([request.seed, 7, realisation.strength, realisation.toy])
    count = int(signal_rng.poisson(realisation.xsec_pb * inputs.lumi_search))
    rows = pool.rows(realisation.toy, count)
    injected = dataclasses.replace(
        _take(pool.table, rows), training=np.zeros(len(rows), dtype=np.bool_)
    )
    combined = _joined(table, injected)
    combined_exclude = np.concatenate([inputs.exclude, np.zeros(len(rows), dtype=np.bool_)])
    n_data = len(table)
    column = PAIRS.index(request.pair)
    sigma = signal_sigma_gev(request.mass, request.width)
    assert pool.table.score is not None
    pool_paired = pool.paired & np.isfinite(pool.table.masses[:, column])
    injected_paired = pool.paired[rows] & np.isfinite(injected.masses[:, column])
    found = []
    for p, point in enumerate(run.points_pb):
        regions = stream_anomaly_regions(
            combined, point, run.lumi_pb, combined_exclude, inputs.training_fraction
        )
        for stream in inputs.streams:
            k = STREAMS.index(stream)
            name = f"{stream}/{request.pair}"
            mask = regions[k].selected
            data, edges = histogram(
                table.masses, table.stream_bits, stream, request.pair, mask[:n_data]
            )
            signal, _ = histogram(
                injected.masses, injected.stream_bits, stream, request.pair, mask[n_data:]
            )
            run_point = inputs.run_points.get(point)
            expected = None if run_point is None else run_point.accepted_background(name)
            if expected is not None and not np.any(expected > 0):
                expected = None  # nothing predicted: as if no background was accepted
            background = data.astype(np.float64)
            draw, scale, kept, kept_run = "data", None, None, None
            if request.background == "fit" and realisation.observed:
                draw = "data (observed realisation)"
            elif request.background == "fit" and expected is None:
                draw = "data (the run accepted no background here)"
            elif request.background == "fit" and expected is not None:
                inside = np.flatnonzero(expected > 0)
                first, stop = int(inside[0]), int(inside[-1]) + 1
                assert run_point is not None  # expected came from it
                run_counts = run_point.counts[SPECTRUM_NAMES.index(name)]
                kept_run = float(run_counts[first:stop].sum())
                kept = float(data[first:stop].sum())
                rng = np.random.default_rng([request.seed, 11, realisation.toy, p, k])
                drawn, scale = background_toy(expected[first:stop], kept, kept_run, rng)
                background[first:stop] = drawn
                draw = "fit"
            in_spectrum = mask[n_data:] & injected.stream_bits[:, k]
            in_spectrum &= np.isfinite(injected.masses[:, column])
            pool_passes = region_mask(
                pool.table.score,
                pool.table.stream_bits,
                RegionCut(point, stream, regions[k].cut, bool(regions[k].whole_stream)),
            )
            acceptance = float(np.mean(pool_passes & pool_paired))
            job = SpectrumJob(
                name,
                edges,
                background + signal,
                point,
                inputs.rule.seed(p, name),
                request.mass,
                sigma,
                inputs.rule,
                bool(regions[k].whole_stream),
                inputs.run_backgrounds.get((point, name)),
                expected,
                realisation.observed
                or request.rule_toys is None
                or realisation.toy < request.rule_toys,
            )
            key = {
                "expected_yield": realisation.xsec_pb * inputs.lumi_search * acceptance,
                "xsec_pb": realisation.xsec_pb,
                "toy": realisation.toy,
                "realisation": "observed" if realisation.observed else "toy",
                "spectrum": name,
                "point_pb": point,
                "whole_stream": bool(regions[k].whole_stream),
                "background": draw,
                "background_scale": scale,
                "background_data_kept": kept,
                "background_data_kept_run": kept_run,
                "n_injected_total": len(rows),
                "n_injected_in_spectrum": int(np.count_nonzero(in_spectrum)),
                "injected_yield": int(np.count_nonzero(in_spectrum & injected_paired)),
            }
            found.append((job, key))
    return found


def _with_pulls(row: dict[str, Any]) -> dict[str, Any]:
    """Bias and pull against the expected yield for each recovery the row holds."""
    for prefix, yield_key in (
        ("", "signal_yield"),
        ("fixed_shape_", "fixed_shape_yield"),
        ("run_function_", "run_function_yield"),
    ):
        if yield_key in row:
            bias = row[yield_key] - row["expected_yield"]
            row[f"{prefix}bias"] = bias
            row[f"{prefix}pull"] = bias / row[f"{yield_key}_error"]
    return row


METHOD = (
    "per injected cross-section and toy: Poisson(sigma x L_search) generated events "
    "(Gaussian lineshape, scored with the run's model) added to a copy of the run's table; "
    "AR cuts retaken on it; background of each re-analysed spectrum: {background}; "
    "injected yield = injected events in the spectrum whose pair is the decay's; expected "
    "yield = sigma x L_search x the fraction of the whole pool that enters the spectrum so "
    "(under the toy's AR cut); bias = fitted - expected, pull = bias / fit error (the fit "
    "error holds the signal's Poisson spread, so the pull is taken against the "
    "expectation). Three fits of a Gaussian of fixed mass and width, free yield: "
    "signal_yield/pull = the scan's rule rerun (background choice, checks, bump hunt), "
    "then its accepted function floating + Gaussian; defined only when the rule accepts, "
    "which it does less often with more signal, so conditional on acceptance "
    "(accepted_fraction of the toys); run_function_* = the function the run accepted for "
    "the spectrum and point refitted (no new choice) + Gaussian, in every toy; "
    "fixed_shape_* = the Gaussian over the run's own background prediction (made before the "
    "injection; shape fixed, normalisation free), the reference free of the background "
    "absorbing signal. Local Z = sqrt(q0) of the rule's fit; expected Z in the +-2 sigma "
    "window (Asimov), dZ = (Z_AE / Z - 1) x 100 %"
)
BACKGROUND_METHOD = {
    "fit": (
        "in its fit range a Poisson draw of the run's accepted background prediction for "
        "that spectrum and AR point, scaled by (data events the toy's AR cut keeps in the "
        "fit range) / (data events the run's cut kept there), the same draw for every "
        "strength; the run's data outside the fit range and where the run accepted no "
        "background (row 'background' says which); plus one 'observed' realisation per "
        "strength on the run's data with toy 0's signal (local Z, top excess; not in the "
        "pulls)"
    ),
    "data": (
        "the run's data, the same in every toy (a fluctuation of the data under the peak "
        "shifts every toy's pull alike)"
    ),
}


def _analyse_all(
    jobs: list[SpectrumJob],
    executor: Executor,
    progress: Callable[[int, int], None] | None,
) -> list[Any]:
    """`analyse_injected` on every job, in order; serially in 50 chunks to show progress.

    Each result depends on its job alone, so chunking changes nothing; a parallel executor
    gets every job at once (one Ray session) and reports progress when all are done.
    """
    if executor != "serial":
        outcomes = map_batched(analyse_injected, jobs, executor)
    else:
        outcomes = []
        chunk = max(1, len(jobs) // 50)
        for start in range(0, len(jobs), chunk):
            outcomes += map_batched(analyse_injected, jobs[start : start + chunk], "serial")
            if progress is not None:
                progress(len(outcomes), len(jobs))
    if progress is not None:
        progress(len(outcomes), len(jobs))
    return outcomes


def run_injection(
    run_dir: Path,
    request: InjectionRequest,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`anomscan inject RUN ...`: inject, re-analyse, recover; RUN/injection/NAME.json."""
    run = read_run(Path(run_dir).resolve())
    streams = check_request(request)
    folder = run.run_dir / "injection" / request.label()
    with cli_step(run.run_dir, "inject") as step:
        ctx, step_id = step.ctx, step.step_id
        folder.mkdir(parents=True, exist_ok=True)
        table = run.read_table()
        lumi_search = run.lumi_search_pb(table)
        exclude = run.training(table)
        training_fraction = float(np.mean(exclude))
        cuts = run_region_cuts(run, table)
        pool = _generate_pool(ctx, step_id, run, request, folder, lumi_search)
        if request.streams is None:
            streams = _reached_streams(pool, request, streams)
        sigma = signal_sigma_gev(request.mass, request.width)
        run_points = _run_points(run)
        inputs = InjectionInputs(
            run,
            request,
            streams,
            table,
            exclude,
            training_fraction,
            lumi_search,
            pool,
            run_points,
            _run_accepted_backgrounds(run, run_points),
            scan_rule(ctx),
        )
        pairs = [pair for r in _realisations(request) for pair in _realisation_jobs(inputs, r)]
        outcomes = _analyse_all([job for job, _ in pairs], request.executor, progress)
        rows = [
            _with_pulls(key | outcome) for (_, key), outcome in zip(pairs, outcomes, strict=True)
        ]
        fits = [row for row in rows if row["realisation"] == "toy"]
        observed = [row for row in rows if row["realisation"] == "observed"]
        strengths = _strength_summaries(run, request, fits, observed, sigma)
        sensitivity = _sensitivity(
            run, table, cuts, pool, request, streams, lumi_search, run_points, inputs.rule
        )
        output: dict[str, Any] = {
            "name": request.label(),
            "run_dir": str(run.run_dir),
            "request": dataclasses.asdict(request),
            "sigma_gev": sigma,
            "lumi_pb": run.lumi_pb,
            "lumi_search_pb": lumi_search,
            "streams": streams,
            "points_pb": list(run.points_pb),
            "pool": {
                "n_events": len(pool.table),
                "block": pool.block,
                "paired_fraction": float(np.mean(pool.paired)),
            },
            "method": METHOD.format(background=BACKGROUND_METHOD[request.background]),
            "strengths": strengths,
            "fits": fits,
            "observed": observed,
            "sensitivity": sensitivity,
        }
        json_path = run.run_dir / "injection" / f"{request.label()}.json"
        output["json_path"] = str(json_path)
        output["plots"] = {}
        from agent.figures.reinterp import linearity_plot

        plot_path = json_path.with_name(f"{request.label()}-linearity.png")
        write_bytes(plot_path, linearity_plot(output), what="linearity plot")
        output["plots"]["linearity"] = str(plot_path)
        write_text(json_path, json_text(output, indent=1), what="injection results")
        ctx.artifact(json_path, "injection")
        ctx.artifact(plot_path, "injection plot")
        for path in write_sensitivity(run.run_dir):
            ctx.artifact(path, "sensitivity")
        for summary in strengths:
            ctx.audit.add(
                "decisions",
                f"{step_id}:injection:{summary['xsec_pb']:g}",
                step_id=step_id,
                kind="injection",
                spectrum=summary.get("reference_spectrum"),
                point_pb=summary.get("reference_point_pb"),
                chosen={"top_is_injected": summary["top_is_injected_fraction"]},
                policy="rules",
                rationale=summary["text"],
                numbers={k: v for k, v in summary.items() if k not in ("text", "observed")},
            )
        step.summary = f"injection {request.label()}"
    return output


SENSITIVITY_COLUMNS = (
    "injection",
    "pair",
    "mass_gev",
    "width",
    "sigma_gev",
    "spectrum",
    "point_pb",
    "whole_stream",
    "xsec_pb",
    "window_lo_gev",
    "window_hi_gev",
    "signal_ae",
    "background_ae",
    "z_ae",
    "signal_whole_stream",
    "background_whole_stream",
    "z_whole_stream",
    "dz_percent",
    "dz_note",
)
"""RUN/sensitivity.csv columns (sensitivity.json rows hold the same keys and the statuses)."""


def dz_note(z_ae: float | None, z_whole: float | None, status_ae: str, status_whole: str) -> str:
    """Why a sensitivity row has no dZ (empty when it has one): dZ needs both Z, Z > 0."""
    if z_whole is None:
        return f"no dZ: the whole stream has no Z ({status_whole})"
    if z_ae is None:
        return f"no dZ: the AE region has no Z ({status_ae})"
    if not z_whole > 0:
        return "no dZ: Z = 0 without the AE cut"
    return ""


def sensitivity_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every injection's expected-Z rows (RUN/injection/*.json), with what was injected."""
    rows = []
    for path in sorted((run_dir / "injection").glob("*.json")):
        output = json.loads(path.read_text())
        request = output["request"]
        for row in output.get("sensitivity", []):
            window = row["window_gev"]
            rows.append(
                {
                    "injection": output["name"],
                    "pair": request["pair"],
                    "mass_gev": request["mass"],
                    "width": request["width"],
                    "sigma_gev": output["sigma_gev"],
                    **{k: v for k, v in row.items() if k != "window_gev"},
                    "window_lo_gev": window[0],
                    "window_hi_gev": window[1],
                }
            )
    return rows


def write_sensitivity(run_dir: Path) -> tuple[Path, Path]:
    """RUN/sensitivity.json and .csv from all injections of the run (rebuilt each time)."""
    rows = sensitivity_rows(run_dir)
    document = {
        "definition": (
            "expected Z = sqrt(2((s + b) ln(1 + s/b) - s)) in the +-2 sigma window around the "
            "injected mass, s = sigma x L_search x the signal's acceptance into the window, b "
            "the accepted background there: with the AR cut (z_ae) and on the whole stream "
            "(z_whole_stream); dz_percent = (Z_AE / Z - 1) x 100 % (PHYSICS.md 6). One row "
            "per injection, spectrum, AR point and injected cross-section"
        ),
        "sources": sorted(
            str(p.relative_to(run_dir)) for p in (run_dir / "injection").glob("*.json")
        ),
        "rows": rows,
    }
    json_path = write_text(
        run_dir / SENSITIVITY_JSON, json_text(document, indent=1), what="sensitivity"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SENSITIVITY_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in SENSITIVITY_COLUMNS])
    csv_path = write_text(run_dir / SENSITIVITY_CSV, buffer.getvalue(), what="sensitivity table")
    return json_path, csv_path


def _spectrum_summary(group: list[dict[str, Any]]) -> dict[str, Any]:
    """The toys of one spectrum and point: yields, pulls of the three recoveries."""
    fitted = [f for f in group if "signal_yield" in f]
    ruled = [f for f in group if f["status"] != RULE_NOT_RERUN]

    def values(key: str) -> list[float]:
        return [float(f[key]) for f in group if key in f]

    return {
        "spectrum": group[0]["spectrum"],
        "point_pb": group[0]["point_pb"],
        "whole_stream": group[0]["whole_stream"],
        "n_toys": len(group),
        "n_rule_toys": len(ruled),
        "n_fitted": len(fitted),
        "accepted_fraction": len(fitted) / len(ruled) if ruled else None,
        "n_background_drawn": sum(f["background"] == "fit" for f in group),
        "backgrounds": sorted({f["background"] for f in group}),
        "injected_yield": _summary(values("injected_yield")),
        "expected_yield": _summary(values("expected_yield")),
        "fitted_yield": _summary(values("signal_yield")),
        "bias": _summary(values("bias")),
        "pull": _summary(values("pull")),
        "local_z": _summary(values("local_z")),
        "n_fixed_shape": sum("fixed_shape_yield" in f for f in group),
        "fixed_shape_yield": _summary(values("fixed_shape_yield")),
        "fixed_shape_pull": _summary(values("fixed_shape_pull")),
        "fixed_shape_bias": _summary(values("fixed_shape_bias")),
        "n_run_function": sum("run_function_yield" in f for f in group),
        "run_function_yield": _summary(values("run_function_yield")),
        "run_function_pull": _summary(values("run_function_pull")),
        "run_function_bias": _summary(values("run_function_bias")),
        "statuses": sorted({f["status"] for f in group}),
    }


def _top_is_injected(
    rows: list[dict[str, Any]], mass: float, sigma: float, best_other: float
) -> tuple[bool, bool]:
    """Whether the largest bump of these spectra is the injected one, and tops the scan."""
    candidates = [f for f in rows if "bump_local_z" in f]
    if not candidates:
        return False, False
    top = max(candidates, key=lambda f: f["bump_local_z"])
    hit = _window_overlaps(top["window_gev"], mass, sigma)
    return hit, hit and top["bump_local_z"] > best_other


def _strength_summaries(
    run: RunInputs,
    request: InjectionRequest,
    fits: list[dict[str, Any]],
    observed: list[dict[str, Any]],
    sigma: float,
) -> list[dict[str, Any]]:
    """Per injected cross-section: yields and pulls per spectrum/point, the top excess."""
    others = [
        e
        for e in run.results.get("excesses", [])
        if not (e["spectrum"].endswith("/" + request.pair) and e["spectrum"] in _affected(fits))
    ]
    best_other = max((e["local_z"] for e in others), default=-math.inf)
    summaries = []
    for xsec in request.xsec_pb:
        rows = [f for f in fits if f["xsec_pb"] == xsec]
        per_spectrum = [
            _spectrum_summary([f for f in rows if f["spectrum"] == name and f["point_pb"] == point])
            for name, point in dict.fromkeys((f["spectrum"], f["point_pb"]) for f in rows)
        ]
        n_ruled = request.toys if request.rule_toys is None else request.rule_toys
        tops = [
            _top_is_injected([f for f in rows if f["toy"] == toy], request.mass, sigma, best_other)
            for toy in range(n_ruled)
        ]
        top_injected = [hit for hit, _ in tops]
        top_scan = [scan for _, scan in tops]
        seen = [f for f in observed if f["xsec_pb"] == xsec]
        observed_summary = None
        if seen:
            hit, scan = _top_is_injected(seen, request.mass, sigma, best_other)
            observed_summary = {
                "top_is_injected": hit,
                "top_of_scan_is_injected": scan,
                "spectra": [
                    {
                        key: f.get(key)
                        for key in (
                            "spectrum",
                            "point_pb",
                            "status",
                            "expected_yield",
                            "injected_yield",
                            "signal_yield",
                            "signal_yield_error",
                            "local_z",
                            "bump_local_z",
                            "run_function_yield",
                            "fixed_shape_yield",
                        )
                    }
                    for f in seen
                ],
            }
        reference = max(
            (s for s in per_spectrum if s["n_run_function"] or s["n_fitted"]),
            key=lambda s: s["expected_yield"]["mean"] or 0.0,
            default=None,
        )
        summaries.append(
            {
                "xsec_pb": xsec,
                "spectra": per_spectrum,
                "reference_spectrum": None if reference is None else reference["spectrum"],
                "reference_point_pb": None if reference is None else reference["point_pb"],
                "n_rule_toys": n_ruled,
                "top_is_injected_fraction": sum(top_injected) / n_ruled if n_ruled else None,
                "top_of_scan_is_injected_fraction": sum(top_scan) / n_ruled if n_ruled else None,
                "largest_other_local_z": None if not math.isfinite(best_other) else best_other,
                "observed": observed_summary,
                "text": _strength_text(
                    xsec, reference, request.toys, top_injected, top_scan, observed_summary
                ),
            }
        )
    return summaries


def _pull_text(summary: dict[str, Any], key: str) -> str:
    pull = summary[key]
    if pull["mean"] is None:
        return "-"
    spread = "" if pull["std"] is None else f", width {pull['std']:.2f}"
    return f"{pull['mean']:+.2f}{spread}"


def _strength_text(
    xsec: float,
    reference: dict[str, Any] | None,
    toys: int,
    top_injected: list[bool],
    top_scan: list[bool],
    observed: dict[str, Any] | None,
) -> str:
    if reference is None:
        return f"{xsec:g} pb: no spectrum of the injected pair"
    fitted = reference["fitted_yield"]["mean"]
    ruled = len(top_injected)
    text = (
        f"{xsec:g} pb: {reference['spectrum']} at {point_text(reference['point_pb'])} pb: injected "
        f"{reference['injected_yield']['mean']:.1f} (expected "
        f"{reference['expected_yield']['mean']:.1f}) over {toys} toy(s); mean pull: rule rerun "
        f"{_pull_text(reference, 'pull')} (accepted in {reference['n_fitted']}/{ruled} toys"
        + ("" if fitted is None else f", fitted {fitted:.1f}")
        + f"), run's function {_pull_text(reference, 'run_function_pull')}, run's background "
        f"fixed {_pull_text(reference, 'fixed_shape_pull')}"
    )
    if ruled:
        text += (
            f"; top excess of the injected spectra is the injected one in "
            f"{sum(top_injected)}/{ruled} toys, of the scan in {sum(top_scan)}/{ruled}"
        )
    if observed is not None:
        row = next(
            (
                r
                for r in observed["spectra"]
                if r["spectrum"] == reference["spectrum"] and r["point_pb"] == reference["point_pb"]
            ),
            None,
        )
        z = None if row is None else row.get("local_z")
        text += (
            "; on the run's data: "
            + ("no accepted background" if z is None else f"local Z {z:.2f}")
            + (", the top excess of the scan" if observed["top_of_scan_is_injected"] else "")
        )
    return text


def _affected(fits: list[dict[str, Any]]) -> set[str]:
    return {f["spectrum"] for f in fits}
