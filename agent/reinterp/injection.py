"""`anomscan inject RUN`: inject a signal into a finished scan, re-analyse it, recover it.

Reads the run folder and never changes what the scan wrote (event table, model, spectra,
points, results.json): writes RUN/injection/ (and RUN/sensitivity.json and .csv,
agent/reinterp/sensitivity.py) and appends its rows to the run's audit log (a `steps` row,
the tool calls, a `decisions` row per strength, the `artifacts`), so `anomscan audit verify`
still passes. Definitions and methods: core/reinterp.py.

Signal events X -> pair of the requested mass and Gaussian width (with the generator's extra
objects) are generated and scored with the run's model (agent/reinterp/pool.py); per
injected cross-section and toy a Poisson number of them (mean sigma x L_search) is added to
the run's events, every AR point's cut is taken again on the injected events and the run's
(N = sigma_AR L_search fixed, so signal displaces data events at the cut), and the spectra
of the injected pair in the affected streams are analysed again
(agent/reinterp/recovery.py). The run's table is never held: its regions are prefixes of
one ranking per stream (`core.regions`, one pass over key, score and stream bits, as deep
as the loosest AR point), and the injected pair's mass is read for the ranked events alone
(one more pass over key and that column); a region with injected events holds the
injected events and the data prefix that the merged ranking (score, then lower key) puts
in its N. The other spectra keep the run's results: they see the
injected events only through their non-resonant masses. Toys differ in the number and
choice of injected events (disjoint blocks of the generated pool) and, with
`background="fit"` (the default), in the background: the run's data of each re-analysed
spectrum in its fit range are replaced by a Poisson draw of the run's own accepted
background prediction for that spectrum and AR point (points/point-NNN.npz `background`),
scaled by the data events the toy's cut keeps in the fit range over those the run's cut kept
(`core.reinterp.background_toy`); a spectrum the run accepted no background for at that point
keeps the data (its row says so). With `background="data"` every toy has the run's data as
background (one fluctuation of the data under the peak biases every toy alike: this
measures the data, not the method). Random streams: toy t of strength i draws its signal
count from numpy's generator seeded [seed, 7, i, t] and the background of AR point p, stream
k from [seed, 11, t, p, k] (the same background for every strength), all in the driver, so
serial and Ray runs are identical; the rule rerun and the refits of a spectrum at AR point p
take the seed the scan gave that spectrum at p (`ScanRule.seed`), in every toy. With `fit`,
each strength also has one "observed" realisation: the run's data plus toy 0's signal, for
the local Z and the top-excess check on the real data (`observed`, not in the pulls).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.figures.reinterp import linearity_plot
from agent.reinterp.pool import (
    SignalPool,
    generate_signal_pool,
    reached_streams,
    take_rows,
)
from agent.reinterp.recovery import InjectedSpectrumJob, analyse_injected, with_pulls
from agent.reinterp.request import InjectionRequest, check_request
from agent.reinterp.rule import ScanRule, scan_rule
from agent.reinterp.run_points import RunPoint, read_run_points, run_accepted_backgrounds
from agent.reinterp.sensitivity import expected_z_rows, write_sensitivity
from agent.reinterp.summaries import strength_summaries
from agent.runtime.executor import Executor, map_batched
from agent.scan import ScanContext, cli_step
from core.anomaly import requested_count
from core.files import json_text, write_bytes, write_text
from core.masses import (
    PAIRS,
    SPECTRUM_NAMES,
    STREAMS,
    histogram,
    mass_bin_edges,
    mass_counts,
)
from core.regions import StreamRanking
from core.reinterp import RegionCut, background_toy, region_mask, signal_sigma_gev
from core.table import EventTable
from tools.reinterp import RunInputs, read_run, run_region_cuts

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


METHOD = (
    "per injected cross-section and toy: Poisson(sigma x L_search) generated events "
    "(Gaussian lineshape, scored with the run's model) added to the run's events; "
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
"""The method of every RUN/injection/NAME.json (`method`), its background part filled in."""
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
"""How the toys' background is made, by `InjectionRequest.background`."""


@dataclass(frozen=True)
class Realisation:
    """One injection: toy `toy` of strength `strength` (or the observed one)."""

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
    ranking: StreamRanking
    """Every stream's search events, ranked one past the loosest AR point."""
    ranked_masses: tuple[FloatArray, ...]
    """Per stream, the injected pair's mass of each ranked event (NaN without the pair)."""
    lumi_search: float
    pool: SignalPool
    run_points: dict[float, RunPoint]
    run_backgrounds: dict[tuple[float, str], dict[str, Any]]
    rule: ScanRule
    pool_paired: BoolArray
    """The pool's events that have the pair and whose pair is the decay's."""


def _realisations(request: InjectionRequest) -> list[Realisation]:
    """Every strength's toys, then (background "fit") its observed realisation."""
    found = []
    for i, xsec in enumerate(request.xsec_pb):
        found += [Realisation(i, xsec, toy) for toy in range(request.toys)]
        if request.background == "fit":
            found.append(Realisation(i, xsec, 0, observed=True))
    return found


@dataclass(frozen=True)
class _Injected:
    """One realisation's injected events."""

    rows: IntArray
    """The pool rows injected."""
    events: EventTable
    """The injected events (never training events)."""
    paired: BoolArray
    """The injected events that have the pair and whose pair is the decay's."""


@dataclass(frozen=True)
class _Region:
    """A stream's anomaly region on the run's events with the injected ones added."""

    n_data: int
    """The run's events it holds: the first `n_data` of the stream's ranking."""
    injected: BoolArray
    """The injected events it holds."""
    cut: float
    """The highest score outside it (-inf for the whole stream), as `anomaly_region`'s."""
    whole_stream: bool


def _injected_events(inputs: InjectionInputs, realisation: Realisation) -> _Injected:
    """Poisson(sigma x L_search) events of the toy's pool block, never training events."""
    request, pool = inputs.request, inputs.pool
    signal_rng = np.random.default_rng([request.seed, 7, realisation.strength, realisation.toy])
    count = int(signal_rng.poisson(realisation.xsec_pb * inputs.lumi_search))
    rows = pool.rows(realisation.toy, count)
    injected = dataclasses.replace(
        take_rows(pool.table, rows), training=np.zeros(len(rows), dtype=np.bool_)
    )
    column = PAIRS.index(request.pair)
    return _Injected(rows, injected, pool.paired[rows] & np.isfinite(injected.masses[:, column]))


def _injected_region(
    ranking: StreamRanking, injected: EventTable, k: int, n_requested: int
) -> _Region:
    """Stream k's region of N = `n_requested` events over the run's and `injected` events.

    The order of `core.anomaly.anomaly_region` on the joined events (score, then lower key,
    then the run's event first): the merge of the stream's ranking, as deep as the region
    plus one, with the injected events in the stream.
    """
    assert injected.score is not None
    rows = np.flatnonzero(injected.stream_bits[:, k])
    n_stream = ranking.n_search[k] + rows.size
    n_pass = min(n_requested, n_stream)
    depth = min(n_pass + 1, ranking.n_search[k])
    assert ranking.scores[k].size >= depth, "the run's points are inside its ranking"
    scores = np.concatenate([ranking.scores[k][:depth], injected.score[rows]])
    keys = np.concatenate([ranking.keys[k][:depth], injected.keys()[rows]])
    from_injection = np.arange(scores.size) >= depth
    order = np.lexsort((from_injection, keys, -scores))
    held = order[:n_pass]
    selected = np.zeros(len(injected), dtype=np.bool_)
    selected[rows[held[held >= depth] - depth]] = True
    whole_stream = n_requested >= n_stream
    return _Region(
        n_data=int(np.count_nonzero(held < depth)),
        injected=selected,
        cut=-math.inf if n_pass == n_stream else float(scores[order[n_pass]]),
        whole_stream=whole_stream,
    )


def _toy_background(
    inputs: InjectionInputs,
    realisation: Realisation,
    indices: tuple[int, int],
    data: npt.NDArray[Any],
    run_point: RunPoint | None,
    expected: FloatArray | None,
) -> tuple[FloatArray, dict[str, Any]]:
    """The spectrum's background in this realisation, and its row's `background*` numbers.

    `indices` are the AR point's and the stream's (the background's random stream); the
    data where the background is not drawn (module docstring).
    """
    request = inputs.request
    p, k = indices
    name = f"{STREAMS[k]}/{request.pair}"
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
    return background, {
        "background": draw,
        "background_scale": scale,
        "background_data_kept": kept,
        "background_data_kept_run": kept_run,
    }


def _spectrum_job(
    inputs: InjectionInputs,
    realisation: Realisation,
    injected: _Injected,
    p: int,
    region: _Region,
    stream: str,
) -> tuple[InjectedSpectrumJob, dict[str, Any]]:
    """The injected spectrum of `stream` at AR point number `p`, with its row's known numbers."""
    run, request, pool = inputs.run, inputs.request, inputs.pool
    point = run.points_pb[p]
    column = PAIRS.index(request.pair)
    sigma = signal_sigma_gev(request.mass, request.width)
    assert pool.table.score is not None
    k = STREAMS.index(stream)
    name = f"{stream}/{request.pair}"
    edges = mass_bin_edges()
    data = mass_counts(inputs.ranked_masses[k][: region.n_data])
    events = injected.events
    signal, _ = histogram(events.masses, events.stream_bits, stream, request.pair, region.injected)
    run_point = inputs.run_points.get(point)
    expected = None if run_point is None else run_point.accepted_background(name)
    if expected is not None and not np.any(expected > 0):
        expected = None  # nothing predicted: as if no background was accepted
    background, drawn = _toy_background(inputs, realisation, (p, k), data, run_point, expected)
    in_spectrum = region.injected & events.stream_bits[:, k] & np.isfinite(events.masses[:, column])
    pool_passes = region_mask(
        pool.table.score,
        pool.table.stream_bits,
        RegionCut(point, stream, region.cut, region.whole_stream),
    )
    acceptance = float(np.mean(pool_passes & inputs.pool_paired))
    job = InjectedSpectrumJob(
        name,
        edges,
        background + signal,
        point,
        inputs.rule.seed(p, name),
        request.mass,
        sigma,
        inputs.rule,
        region.whole_stream,
        inputs.run_backgrounds.get((point, name)),
        expected,
        realisation.observed or request.rule_toys is None or realisation.toy < request.rule_toys,
    )
    key = {
        "expected_yield": realisation.xsec_pb * inputs.lumi_search * acceptance,
        "xsec_pb": realisation.xsec_pb,
        "toy": realisation.toy,
        "realisation": "observed" if realisation.observed else "toy",
        "spectrum": name,
        "point_pb": point,
        "whole_stream": region.whole_stream,
        **drawn,
        "n_injected_total": len(injected.rows),
        "n_injected_in_spectrum": int(np.count_nonzero(in_spectrum)),
        "injected_yield": int(np.count_nonzero(in_spectrum & injected.paired)),
    }
    return job, key


def _realisation_jobs(
    inputs: InjectionInputs, realisation: Realisation
) -> list[tuple[InjectedSpectrumJob, dict[str, Any]]]:
    """The spectra of one realisation to analyse again, each with its row's known numbers."""
    injected = _injected_events(inputs, realisation)
    found = []
    for p, point in enumerate(inputs.run.points_pb):
        n_requested = requested_count(point, inputs.lumi_search)
        for stream in inputs.streams:
            k = STREAMS.index(stream)
            region = _injected_region(inputs.ranking, injected.events, k, n_requested)
            found.append(_spectrum_job(inputs, realisation, injected, p, region, stream))
    return found


def _analyse_all(
    jobs: list[InjectedSpectrumJob],
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


def _shared_inputs(
    ctx: ScanContext,
    step_id: str,
    run: RunInputs,
    request: InjectionRequest,
    streams: list[str],
    folder: Path,
) -> tuple[InjectionInputs, list[RegionCut]]:
    """Read the run once and generate the signal pool; the run's AR cuts of every stream."""
    ranking = run.ranking()
    cuts = run_region_cuts(run, ranking)
    lumi_search = run.lumi_search_pb(ranking)
    pool = generate_signal_pool(ctx, step_id, run, request, folder, lumi_search)
    if request.streams is None:
        streams = reached_streams(pool, request, streams)
    run_points = read_run_points(run)
    inputs = InjectionInputs(
        run,
        request,
        streams,
        ranking,
        run.ranked_masses(ranking, request.pair),
        lumi_search,
        pool,
        run_points,
        run_accepted_backgrounds(run, run_points),
        scan_rule(ctx),
        pool.paired & np.isfinite(pool.table.masses[:, PAIRS.index(request.pair)]),
    )
    return inputs, cuts


def _injection_output(
    inputs: InjectionInputs,
    cuts: list[RegionCut],
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """Every realisation analysed and recovered: the RUN/injection/NAME.json document."""
    run, request, pool = inputs.run, inputs.request, inputs.pool
    sigma = signal_sigma_gev(request.mass, request.width)
    pairs = [pair for r in _realisations(request) for pair in _realisation_jobs(inputs, r)]
    outcomes = _analyse_all([job for job, _ in pairs], request.executor, progress)
    rows = [with_pulls(key | outcome) for (_, key), outcome in zip(pairs, outcomes, strict=True)]
    fits = [row for row in rows if row["realisation"] == "toy"]
    observed = [row for row in rows if row["realisation"] == "observed"]
    strengths = strength_summaries(run, request, fits, observed, sigma)
    sensitivity = expected_z_rows(
        run,
        cuts,
        pool,
        request,
        inputs.streams,
        inputs.lumi_search,
        inputs.run_points,
        inputs.rule,
    )
    return {
        "name": request.label(),
        "run_dir": str(run.run_dir),
        "request": dataclasses.asdict(request),
        "sigma_gev": sigma,
        "lumi_pb": run.lumi_pb,
        "lumi_search_pb": inputs.lumi_search,
        "streams": inputs.streams,
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


def _record(ctx: ScanContext, step_id: str, run_dir: Path, output: dict[str, Any]) -> None:
    """Write the linearity plot and RUN/injection/NAME.json; their artifacts and decisions."""
    json_path = run_dir / "injection" / f"{output['name']}.json"
    output["json_path"] = str(json_path)
    output["plots"] = {}
    plot_path = json_path.with_name(f"{output['name']}-linearity.png")
    write_bytes(plot_path, linearity_plot(output), what="linearity plot")
    output["plots"]["linearity"] = str(plot_path)
    write_text(json_path, json_text(output, indent=1), what="injection results")
    ctx.artifact(json_path, "injection")
    ctx.artifact(plot_path, "injection plot")
    for path in write_sensitivity(run_dir):
        ctx.artifact(path, "sensitivity")
    for summary in output["strengths"]:
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
        inputs, cuts = _shared_inputs(ctx, step_id, run, request, streams, folder)
        output = _injection_output(inputs, cuts, progress)
        _record(ctx, step_id, run.run_dir, output)
        step.summary = f"injection {request.label()}"
    return output
