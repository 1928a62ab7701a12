"""`anomscan acceptance` and `anomscan inject`: reinterpretation of a finished scan.

Both read the run folder and never change what the scan wrote (event table, model, spectra,
points, results.json): they write RUN/acceptance/ or RUN/injection/ and append their rows to
the run's audit log (a `steps` row, the tool calls, a `decisions` row, the `artifacts`),
so `anomscan audit verify` still passes. Definitions and methods: core/reinterp.py.

Injection: signal events X -> pair of the requested mass and Gaussian width (with the
generator's extra objects) are generated (`generate_sample`, no background) and scored
with the run's model; per injected cross-section and toy a Poisson number of them (mean
sigma x L_search) is added to an in-memory copy of the run's event table, every AR point's
cut is taken again on the injected table (N = sigma_AR L_search fixed, so signal displaces
data events at the cut), and the spectra of the injected pair in the affected streams are
analysed again with the scan's rule (`agent.pipeline.analyse_spectrum`: background choice,
checks, bump hunt, window exclusion). The other spectra keep the run's results: they see
the injected events only through their non-resonant masses. Toys vary the number and the
choice of injected events (disjoint blocks of the generated pool); the run's data are the
same in every toy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.audit import AuditLog
from agent.executor import Executor, FanOut, map_batched
from agent.runlock import run_folder_lock
from agent.scan import ScanConfig, ScanContext
from core.anomaly import stream_anomaly_regions
from core.errors import AnomscanError, InvalidInputError
from core.files import json_text, write_bytes, write_text
from core.masses import PAIRS, SPECTRUM_NAMES, STREAMS, histogram, mass_bin_edges
from core.reinterp import (
    RegionCut,
    ae_gain,
    correctly_paired,
    fit_injected_signal,
    region_mask,
    score_sample,
    signal_sigma_gev,
    window_bins,
    window_expected_z,
)
from core.table import EventTable
from tools.registry import get_tool
from tools.reinterp import RunInputs, fit_ranges, read_run, run_region_cuts

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@contextlib.contextmanager
def _run_step(run: RunInputs, node: str, folder: Path) -> Iterator[tuple[ScanContext, str]]:
    """The output folder locked, the run's audit log open, one step id for this command."""
    folder.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(folder, f"anomscan {node}"), FanOut("serial") as fan_out:
        audit = AuditLog(run.run_dir / "audit.sqlite")
        try:
            config = ScanConfig.model_validate(run.config)
            ctx = ScanContext(config, audit, fan_out)
            step_id = f"{len(audit.rows('steps')):04d}-{node}-{time.strftime('%Y%m%dT%H%M%S')}"
            ctx.step_id = step_id
            yield ctx, step_id
        finally:
            audit.close()


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


def _step_row(ctx: ScanContext, step_id: str, node: str, started: float, summary: str) -> None:
    ended = time.time()
    ctx.audit.add(
        "steps",
        step_id,
        step_id=step_id,
        node=node,
        started_at=round(started, 3),
        ended_at=round(ended, 3),
        seconds=round(ended - started, 3),
        summary=summary,
    )


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
    started = time.time()
    folder = run.run_dir / "acceptance"
    with _run_step(run, "acceptance", folder) as (ctx, step_id), ctx.audit.transaction():
        output = _call_logged(ctx, step_id, name or "sample", "signal_acceptance", payload)
        for key in ("json_path", "csv_path"):
            ctx.artifact(Path(output[key]), "acceptance")
        from agent.reinterp_plots import acceptance_map

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
                f"{best['acceptance']:.3g} in {best['stream']} at {best['point_pb']:g} pb"
            ),
            numbers={
                f"{row['stream']}@{row['point_pb']:g}": row["acceptance"]
                for row in output["streams"]
            },
        )
        _step_row(ctx, step_id, "acceptance", started, f"acceptance of {output['name']}")
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
class SpectrumJob:
    """One injected spectrum at one AR point, analysed with the scan's rule (any worker)."""

    name: str
    edges: FloatArray
    counts: FloatArray
    point_pb: float
    seed: int
    mass: float
    sigma: float
    gof_toys: int
    whole_stream: bool
    run_background: dict[str, Any] | None = None
    """The run's accepted background of this spectrum at this point (function, fit_range)."""
    run_expected: FloatArray | None = None
    """The run's final expected background per bin (0 outside its fit range), if accepted."""


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
            starts=[entry["parameters"]],
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


def analyse_injected(job: SpectrumJob) -> dict[str, Any]:
    """Background choice + bump hunt (the scan's rule), then the background + Gaussian fit.

    Also the same Gaussian fit on the run's own accepted function (refitted to the injected
    spectrum, no new choice): the rule's checks reject more often the toys with more signal,
    so its yields are conditional on acceptance, the fixed function's are not.
    """
    from agent.pipeline import FAST_CHECKS, analyse_spectrum

    fixed = _fixed_function_fit(job) | _fixed_shape_fit(job)
    checks = dataclasses.replace(FAST_CHECKS, n_gof_toys=job.gof_toys)
    result = analyse_spectrum(
        job.name,
        job.edges,
        job.counts,
        job.point_pb,
        seed=job.seed,
        checks=checks,
        fallback=False,
        whole_stream=job.whole_stream,
    )
    row: dict[str, Any] = {"status": result.status, "reason": result.reason, **fixed}
    if result.status != "accepted" or result.search is None or result.bump is None:
        return row
    bump = result.bump
    row.update(
        function=result.function,
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


def _run_row(
    rows: dict[float, tuple[FloatArray, dict[str, str]]], point: float, name: str
) -> FloatArray | None:
    """The run's final background of `name` at `point` when it was accepted there."""
    if point not in rows or rows[point][1].get(name) != "excess":
        return None
    return np.asarray(rows[point][0][SPECTRUM_NAMES.index(name)], dtype=np.float64)


def _run_accepted_backgrounds(run: RunInputs) -> dict[tuple[float, str], dict[str, Any]]:
    """(point, spectrum) -> the background the run accepted there (points/*-backgrounds.json)."""
    found = {}
    for path in sorted((run.run_dir / "points").glob("point-*-backgrounds.json")):
        record = json.loads(path.read_text())
        for name, entry in record["backgrounds"].items():
            if entry.get("status") == "accepted":
                found[(float(record["point_pb"]), name)] = entry
    return found


def _window_overlaps(window: Sequence[float], mass: float, sigma: float) -> bool:
    return bool(window[0] < mass + 2 * sigma and window[1] > mass - 2 * sigma)


def _run_backgrounds(run: RunInputs) -> dict[float, tuple[FloatArray, dict[str, str]]]:
    """The run's accepted background rows (63, bins) per AR point, and each spectrum's status."""
    found: dict[float, tuple[FloatArray, dict[str, str]]] = {}
    for path in sorted((run.run_dir / "points").glob("point-[0-9][0-9][0-9].json")):
        record = json.loads(path.read_text())
        with np.load(path.with_name(record["arrays"])) as data:
            background = np.asarray(data["background"], dtype=np.float64)
        statuses = {s["spectrum"]: s["status"] for s in record["spectra"]}
        found[float(record["point_pb"])] = (background, statuses)
    return found


def _whole_stream_background(
    run: RunInputs,
    table: EventTable,
    stream: str,
    pair: str,
    seed: int,
) -> tuple[FloatArray | None, str]:
    """The accepted background of the whole stream (training events left out), fitted here."""
    from agent.pipeline import FAST_CHECKS, analyse_spectrum

    mask = ~run.training(table)
    counts, edges = histogram(table.masses, table.stream_bits, stream, pair, mask)
    checks = dataclasses.replace(FAST_CHECKS, n_gof_toys=int(run.config.get("gof_toys", 100)))
    result = analyse_spectrum(
        f"{stream}/{pair}",
        edges,
        counts.astype(float),
        0.0,
        seed=seed,
        checks=checks,
        fallback=False,
        whole_stream=True,
    )
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
    backgrounds = _run_backgrounds(run)
    rows = []
    for stream in streams:
        name = f"{stream}/{request.pair}"
        k = list(STREAMS).index(stream)
        whole_bits = signal.stream_bits[:, k] & in_window
        whole_fraction = float(np.count_nonzero(whole_bits)) / n_pool
        whole_b, whole_status = None, "not fitted"
        for cut in cuts:
            if cut.stream == stream and cut.whole_stream and cut.point_pb in backgrounds:
                rows_b, statuses = backgrounds[cut.point_pb]
                if statuses.get(name) == "excess":
                    whole_b, whole_status = rows_b[list(SPECTRUM_NAMES).index(name)], "run point"
                    break
        if whole_b is None:
            whole_b, whole_status = _whole_stream_background(
                run, table, stream, request.pair, request.seed
            )
        b_whole = None if whole_b is None else float(whole_b[first:stop].sum())
        for cut in cuts:
            if cut.stream != stream:
                continue
            passed = region_mask(signal.score, signal.stream_bits, cut) & in_window
            fraction = float(np.count_nonzero(passed)) / n_pool
            b_ae = None
            status = "not in the run"
            if cut.point_pb in backgrounds:
                rows_b, statuses = backgrounds[cut.point_pb]
                status = statuses.get(name, "not in the run")
                if status == "excess":
                    b_ae = float(rows_b[list(SPECTRUM_NAMES).index(name)][first:stop].sum())
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


def run_injection(run_dir: Path, request: InjectionRequest) -> dict[str, Any]:
    """`anomscan inject RUN ...`: inject, re-analyse, recover; RUN/injection/NAME.json."""
    run = read_run(run_dir)
    streams = check_request(request)
    started = time.time()
    folder = run.run_dir / "injection" / request.label()
    with _run_step(run, "inject", folder) as (ctx, step_id), ctx.audit.transaction():
        table = run.read_table()
        lumi_search = run.lumi_search_pb(table)
        exclude = run.training(table)
        training_fraction = float(np.mean(exclude))
        cuts = run_region_cuts(run, table)
        pool = _generate_pool(ctx, step_id, run, request, folder, lumi_search)
        if request.streams is None:
            streams = _reached_streams(pool, request, streams)
        sigma = signal_sigma_gev(request.mass, request.width)
        column = PAIRS.index(request.pair)
        rng = np.random.default_rng([request.seed, 7])
        assert pool.table.score is not None
        pool_score = pool.table.score
        pool_paired = pool.paired & np.isfinite(pool.table.masses[:, column])
        gof_toys = int(run.config.get("gof_toys", 100))
        run_backgrounds = _run_accepted_backgrounds(run)
        run_rows = _run_backgrounds(run)
        jobs: list[SpectrumJob] = []
        keys: list[dict[str, Any]] = []
        for xsec in request.xsec_pb:
            for toy in range(request.toys):
                count = int(rng.poisson(xsec * lumi_search))
                rows = pool.rows(toy, count)
                injected = _take(pool.table, rows)
                injected = dataclasses.replace(
                    injected, training=np.zeros(len(rows), dtype=np.bool_)
                )
                combined = _joined(table, injected)
                combined_exclude = np.concatenate([exclude, np.zeros(len(rows), dtype=np.bool_)])
                is_injected = np.concatenate(
                    [np.zeros(len(table), dtype=np.bool_), np.ones(len(rows), dtype=np.bool_)]
                )
                paired = np.concatenate([np.zeros(len(table), dtype=np.bool_), pool.paired[rows]])
                for point in run.points_pb:
                    regions = stream_anomaly_regions(
                        combined, point, run.lumi_pb, combined_exclude, training_fraction
                    )
                    for stream in streams:
                        k = list(STREAMS).index(stream)
                        mask = regions[k].selected
                        counts, edges = histogram(
                            combined.masses, combined.stream_bits, stream, request.pair, mask
                        )
                        in_spectrum = mask & combined.stream_bits[:, k]
                        in_spectrum &= np.isfinite(combined.masses[:, column])
                        name = f"{stream}/{request.pair}"
                        jobs.append(
                            SpectrumJob(
                                name,
                                edges,
                                counts.astype(float),
                                point,
                                request.seed * 1000 + toy,
                                request.mass,
                                sigma,
                                gof_toys,
                                bool(regions[k].whole_stream),
                                run_backgrounds.get((point, name)),
                                _run_row(run_rows, point, name),
                            )
                        )
                        pool_passes = region_mask(
                            pool_score,
                            pool.table.stream_bits,
                            RegionCut(point, stream, regions[k].cut, bool(regions[k].whole_stream)),
                        )
                        acceptance = float(np.mean(pool_passes & pool_paired))
                        keys.append(
                            {
                                "expected_yield": xsec * lumi_search * acceptance,
                                "xsec_pb": xsec,
                                "toy": toy,
                                "spectrum": name,
                                "point_pb": point,
                                "whole_stream": bool(regions[k].whole_stream),
                                "n_injected_total": len(rows),
                                "n_injected_in_spectrum": int(
                                    np.count_nonzero(in_spectrum & is_injected)
                                ),
                                "injected_yield": int(
                                    np.count_nonzero(in_spectrum & is_injected & paired)
                                ),
                            }
                        )
        outcomes = map_batched(analyse_injected, jobs, request.executor)
        fits = []
        for key, outcome in zip(keys, outcomes, strict=True):
            row = key | outcome
            if "signal_yield" in row:
                row["bias"] = row["signal_yield"] - row["expected_yield"]
                row["pull"] = row["bias"] / row["signal_yield_error"]
            if "fixed_shape_yield" in row:
                row["fixed_shape_bias"] = row["fixed_shape_yield"] - row["expected_yield"]
                row["fixed_shape_pull"] = row["fixed_shape_bias"] / row["fixed_shape_yield_error"]
            if "run_function_yield" in row:
                row["run_function_bias"] = row["run_function_yield"] - row["expected_yield"]
                row["run_function_pull"] = (
                    row["run_function_bias"] / row["run_function_yield_error"]
                )
            fits.append(row)
        strengths = _strength_summaries(run, request, fits, sigma)
        sensitivity = _sensitivity(run, table, cuts, pool, request, streams, lumi_search)
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
            "method": (
                "per injected cross-section and toy: Poisson(sigma x L_search) generated "
                "events (Gaussian lineshape, scored with the run's model) added to a copy of "
                "the run's table; AR cuts retaken; the injected pair's spectra analysed with "
                "the scan's rule; yield from a binned extended Poisson fit of the accepted "
                "background (normalisation and shape floating) plus a Gaussian of fixed mass "
                "and width; injected yield = injected events in the spectrum whose pair is the "
                "decay's; expected yield = sigma x L_search x the fraction of the whole pool "
                "that enters the spectrum so (under the toy's AR cut); bias = fitted - expected, "
                "pull = bias / fit error (the fit error holds the signal's Poisson spread, so "
                "the pull is taken against the expectation); these follow the rule, which "
                "rejects more often the toys with more signal, so they are conditional on an "
                "accepted background; run_function_* refit the function the run accepted for "
                "the spectrum and point (no new choice) in every toy; fixed_shape_* fit the "
                "Gaussian over the run's own background prediction (made before the injection; "
                "shape fixed, normalisation free), the reference free of the background "
                "absorbing signal; local Z = sqrt(q0) of that "
                "fit; expected Z in the +-2 sigma window (Asimov), dZ = (Z_AE / Z - 1) x 100 %"
            ),
            "strengths": strengths,
            "fits": fits,
            "sensitivity": sensitivity,
        }
        json_path = run.run_dir / "injection" / f"{request.label()}.json"
        output["json_path"] = str(json_path)
        output["plots"] = {}
        from agent.reinterp_plots import linearity_plot

        plot_path = json_path.with_name(f"{request.label()}-linearity.png")
        write_bytes(plot_path, linearity_plot(output), what="linearity plot")
        output["plots"]["linearity"] = str(plot_path)
        write_text(json_path, json_text(output, indent=1), what="injection results")
        ctx.artifact(json_path, "injection")
        ctx.artifact(plot_path, "injection plot")
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
                numbers={k: v for k, v in summary.items() if k != "text"},
            )
        _step_row(ctx, step_id, "inject", started, f"injection {request.label()}")
    return output


def _strength_summaries(
    run: RunInputs, request: InjectionRequest, fits: list[dict[str, Any]], sigma: float
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
        per_spectrum = []
        for name, point in dict.fromkeys((f["spectrum"], f["point_pb"]) for f in rows):
            group = [f for f in rows if f["spectrum"] == name and f["point_pb"] == point]
            fitted = [f for f in group if "signal_yield" in f]
            per_spectrum.append(
                {
                    "spectrum": name,
                    "point_pb": point,
                    "whole_stream": group[0]["whole_stream"],
                    "n_toys": len(group),
                    "n_fitted": len(fitted),
                    "injected_yield": _summary([float(f["injected_yield"]) for f in group]),
                    "expected_yield": _summary([f["expected_yield"] for f in group]),
                    "fitted_yield": _summary([f["signal_yield"] for f in fitted]),
                    "bias": _summary([f["bias"] for f in fitted]),
                    "pull": _summary([f["pull"] for f in fitted]),
                    "local_z": _summary([f["local_z"] for f in fitted]),
                    "n_fixed_shape": sum("fixed_shape_yield" in f for f in group),
                    "fixed_shape_yield": _summary(
                        [f["fixed_shape_yield"] for f in group if "fixed_shape_yield" in f]
                    ),
                    "fixed_shape_pull": _summary(
                        [f["fixed_shape_pull"] for f in group if "fixed_shape_pull" in f]
                    ),
                    "n_run_function": sum("run_function_yield" in f for f in group),
                    "run_function_yield": _summary(
                        [f["run_function_yield"] for f in group if "run_function_yield" in f]
                    ),
                    "run_function_pull": _summary(
                        [f["run_function_pull"] for f in group if "run_function_pull" in f]
                    ),
                    "statuses": sorted({f["status"] for f in group}),
                }
            )
        top_injected, top_scan = [], []
        for toy in range(request.toys):
            candidates = [f for f in rows if f["toy"] == toy and "bump_local_z" in f]
            if not candidates:
                top_injected.append(False)
                top_scan.append(False)
                continue
            top = max(candidates, key=lambda f: f["bump_local_z"])
            hit = _window_overlaps(top["window_gev"], request.mass, sigma)
            top_injected.append(hit)
            top_scan.append(hit and top["bump_local_z"] > best_other)
        reference = max(
            (s for s in per_spectrum if s["n_fitted"]),
            key=lambda s: s["local_z"]["mean"] or 0.0,
            default=None,
        )
        text = f"{xsec:g} pb: " + (
            "no spectrum with an accepted background"
            if reference is None
            else (
                f"{reference['spectrum']} at {reference['point_pb']:g} pb: injected "
                f"{reference['injected_yield']['mean']:.1f} (expected "
                f"{reference['expected_yield']['mean']:.1f}), fitted "
                f"{reference['fitted_yield']['mean']:.1f} events, local Z "
                f"{reference['local_z']['mean']:.2f}; top excess of the injected spectra is "
                f"the injected one in {sum(top_injected)}/{request.toys} toys, of the scan in "
                f"{sum(top_scan)}/{request.toys}"
            )
        )
        summaries.append(
            {
                "xsec_pb": xsec,
                "spectra": per_spectrum,
                "reference_spectrum": None if reference is None else reference["spectrum"],
                "reference_point_pb": None if reference is None else reference["point_pb"],
                "top_is_injected_fraction": sum(top_injected) / request.toys,
                "top_of_scan_is_injected_fraction": sum(top_scan) / request.toys,
                "largest_other_local_z": None if not math.isfinite(best_other) else best_other,
                "text": text,
            }
        )
    return summaries


def _affected(fits: list[dict[str, Any]]) -> set[str]:
    return {f["spectrum"] for f in fits}
