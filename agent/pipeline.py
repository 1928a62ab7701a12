"""The deterministic scan: the reference behaviour the agent's `rules` policy follows.

generate (optional) -> train the autoencoder on 1 % -> one event pass (masses, RMM, score)
-> for each anomaly-region point: per stream the N = sigma L highest-score events
-> 63 spectra -> background choice (F-test + checks) -> BumpHunter
-> scan-wide look-elsewhere over every spectrum and point -> ranked excesses.

Each step is a plain function of its inputs and an explicit seed; the tools do the work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.eventpass import PassSpec, event_pass
from agent.executor import Executor, map_batched
from agent.runlock import run_folder_lock
from core.anomaly import anomaly_region, log_uniform_xsec_grid
from core.autoencoder import read_model_card, training_selection
from core.bumphunt import BumpHuntResult, bump_hunt
from core.errors import AnomscanError
from core.files import write_json
from core.fit import FitResult
from core.lookelsewhere import NestedSpectrum, ScanSignificance, nested_spectrum, scan_significance
from core.masses import PAIRS, STREAM_FIT_FROM_GEV, STREAMS, histogram
from core.selection import BackgroundDecision, CheckOptions, choose_background
from core.synth import SampleConfig, SignalSpec, generate_sample, load_truth
from core.table import EventTable, read_event_table
from tools.registry import get_tool

FloatArray = npt.NDArray[np.float64]

MIN_EVENTS_IN_FIT_RANGE = 40
"""Spectra with fewer events above the stream's fit start are recorded, not fitted."""

DEMO_SIGNALS = (
    SignalSpec("jm", 1500.0, 30.0, n_events=80, extra={"photons": 1, "electrons": 1}),
    SignalSpec("bg", 900.0, 20.0, n_events=80, extra={"muons": 1}),
)
"""The demo's injected truth: X -> jet muon at 1.5 TeV and X -> b photon at 0.9 TeV."""

WINDOW_EXCLUSION_P = 0.01
"""A local excess below this p is masked and the background chosen again (PHYSICS.md 5)."""

FAST_CHECKS = CheckOptions(spurious_method="asimov", n_gof_toys=50)
"""Robustness checks of the scan: spurious signal on the Asimov data set (30x cheaper than
toys and agreeing with their median, see tests/core/test_robustness.py)."""


@dataclass(frozen=True)
class SpectrumResult:
    """One spectrum at one anomaly-region point: the background chosen and the bump found."""

    name: str
    xsec_pb: float
    n_events: int
    n_in_range: int
    status: str
    function: str | None = None
    gof_p: float | None = None
    bump: BumpHuntResult | None = None
    first_bin: int = 0
    stop_bin: int = 0
    trail: tuple[str, ...] = ()
    background: FloatArray | None = field(default=None, repr=False)
    counts: FloatArray | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """Plain data for results.json."""
        bump = None
        if self.bump is not None:
            bump = {
                "window_gev": [self.bump.mass_low, self.bump.mass_high],
                "data": self.bump.data,
                "background": self.bump.background,
                "local_p": self.bump.local_p,
                "local_z": self.bump.local_z,
                "global_p": self.bump.global_p,
                "global_z": self.bump.global_z,
                "n_toys": self.bump.n_toys,
            }
        return {
            "name": self.name,
            "xsec_pb": self.xsec_pb,
            "n_events": self.n_events,
            "n_in_range": self.n_in_range,
            "status": self.status,
            "function": self.function,
            "gof_p": self.gof_p,
            "bump": bump,
            "trail": list(self.trail),
        }


@dataclass(frozen=True)
class ScanResult:
    """Every spectrum result of a scan, the scan-wide look-elsewhere result and timings."""

    results: tuple[SpectrumResult, ...]
    lee: ScanSignificance | None
    xsec_points_pb: tuple[float, ...]
    seconds: dict[str, float]

    def ranked(self) -> list[SpectrumResult]:
        """Spectra with a bump, most significant local excess first."""
        bumps = [r for r in self.results if r.bump is not None]
        return sorted(bumps, key=lambda r: -r.bump.local_z if r.bump else 0.0)


def stream_regions(
    table: EventTable, xsec_pb: float, lumi_pb: float, exclude: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.bool_], list[bool]]:
    """Per stream, the events of its anomaly region (n, 7) and whether it is the whole stream."""
    if table.score is None:
        raise AnomscanError("the event table has no score column; run the scored event pass")
    masks = np.zeros(table.stream_bits.shape, dtype=bool)
    whole = []
    for k in range(len(STREAMS)):
        region = anomaly_region(
            table.score,
            xsec_pb,
            lumi_pb,
            in_stream=table.stream_bits[:, k] & ~exclude,
            event_ids=table.keys(),
        )
        masks[:, k] = region.selected
        whole.append(region.whole_stream)
    return masks, whole


def _background_and_bump(
    edges: FloatArray, counts: FloatArray, fit_from: float, checks: CheckOptions, seed: int
) -> tuple[BackgroundDecision, FitResult | None, BumpHuntResult | None]:
    """Choose the background (or keep the F-test's choice when none passes) and hunt."""
    decision = choose_background(edges, counts, (fit_from, None), options=checks, seed=seed)
    fit = decision.fit if decision.passed else decision.selection.fit
    if fit is None:
        return decision, None, None
    data = counts[fit.first_bin : fit.stop_bin]
    bump = bump_hunt(
        data,
        np.asarray(fit.expected, dtype=np.float64),
        edges[fit.first_bin : fit.stop_bin + 1],
        width_max=max(2, len(data) // 4),
        seed=seed,
    )
    return decision, fit, bump


def analyse_spectrum(
    name: str,
    edges: FloatArray,
    counts: FloatArray,
    xsec_pb: float,
    *,
    sqrt_s: float = 13000.0,
    seed: int = 0,
    checks: CheckOptions = FAST_CHECKS,
) -> SpectrumResult:
    """Choose the background of one spectrum above its stream's fit start and hunt for a bump."""
    stream = name.split("/", maxsplit=1)[0]
    fit_from = STREAM_FIT_FROM_GEV[stream]
    n_events = int(counts.sum())
    n_in_range = int(counts[edges[:-1] >= fit_from].sum())
    if n_in_range < MIN_EVENTS_IN_FIT_RANGE:
        return SpectrumResult(name, xsec_pb, n_events, n_in_range, "too few events")
    try:
        decision, fit, bump = _background_and_bump(edges, counts, fit_from, checks, seed)
    except AnomscanError as error:
        return SpectrumResult(
            name, xsec_pb, n_events, n_in_range, f"fit failed: {error}".splitlines()[0]
        )
    notes: tuple[str, ...] = ()
    if bump is not None and bump.local_p < WINDOW_EXCLUSION_P:
        window = (bump.mass_low, bump.mass_high)
        try:
            masked = _background_and_bump(
                edges, counts, fit_from, replace(checks, window=window), seed
            )
        except AnomscanError as error:
            notes = (f"window exclusion refit rejected, unmasked fit kept: {error}",)
        else:
            if masked[1] is not None:
                decision, fit, bump = masked
            else:
                notes = ("window exclusion refit found no background, unmasked fit kept",)
    if fit is None or bump is None:
        return SpectrumResult(
            name, xsec_pb, n_events, n_in_range, "no background", trail=decision.trail
        )
    data = counts[fit.first_bin : fit.stop_bin]
    background = np.asarray(fit.expected, dtype=np.float64)
    status = "background accepted" if decision.passed else "background failed checks"
    return SpectrumResult(
        name,
        xsec_pb,
        n_events,
        n_in_range,
        status,
        fit.name,
        fit.p_value,
        bump,
        fit.first_bin,
        fit.stop_bin,
        decision.trail + notes,
        background,
        data,
    )


def _nested_spectra(results: Sequence[SpectrumResult], edges: FloatArray) -> list[NestedSpectrum]:
    """Group fitted results by spectrum name over the bins every point of it fitted."""
    grouped: dict[str, list[SpectrumResult]] = {}
    for result in results:
        if result.bump is not None and result.background is not None:
            grouped.setdefault(result.name, []).append(result)
    spectra = []
    for name, points in grouped.items():
        first = max(p.first_bin for p in points)
        stop = min(p.stop_bin for p in points)
        if stop - first < 2:
            continue
        counts = np.array(
            [
                p.counts[first - p.first_bin : stop - p.first_bin]
                for p in points
                if p.counts is not None
            ]
        )
        background = np.array(
            [
                p.background[first - p.first_bin : stop - p.first_bin]
                for p in points
                if p.background is not None
            ]
        )
        xsecs = np.array([p.xsec_pb for p in points])
        try:
            spectra.append(
                nested_spectrum(name, edges[first : stop + 1], xsecs, counts, background)
            )
        except AnomscanError:
            continue
    return spectra


@dataclass(frozen=True)
class SpectrumJob:
    """One spectrum at one AR point, ready to be analysed anywhere (a Ray worker too)."""

    name: str
    edges: FloatArray
    counts: FloatArray
    xsec_pb: float
    seed: int

    def run(self) -> SpectrumResult:
        """Analyse this spectrum."""
        return analyse_spectrum(self.name, self.edges, self.counts, self.xsec_pb, seed=self.seed)


def _run_job(job: SpectrumJob) -> SpectrumResult:
    return job.run()


def spectrum_jobs(
    table: EventTable,
    lumi_pb: float,
    xsec_points_pb: Sequence[float],
    exclude: npt.NDArray[np.bool_],
    seed: int,
) -> list[SpectrumJob]:
    """The 63 spectra of every AR point: per stream, its region's events."""
    jobs = []
    for xsec in xsec_points_pb:
        masks, _ = stream_regions(table, xsec, lumi_pb, exclude)
        for k, stream in enumerate(STREAMS):
            for j, pair in enumerate(PAIRS):
                counts, edges = histogram(
                    table.masses, table.stream_bits, stream, pair, masks[:, k]
                )
                jobs.append(
                    SpectrumJob(
                        f"{stream}/{pair}", edges, counts.astype(float), xsec, seed + 100 * k + j
                    )
                )
    return jobs


def run_scan(
    table_path: Path,
    lumi_pb: float,
    *,
    model: Path,
    xsec_points_pb: Sequence[float] | None = None,
    seed: int = 0,
    executor: Executor = "serial",
) -> ScanResult:
    """Sweep the anomaly-region points over an event table and analyse all 63 spectra each."""
    start = time.perf_counter()
    table = read_event_table(table_path)
    card = read_model_card(model)
    exclude = training_selection(table.keys(), card.fraction, card.seed)
    points = tuple(xsec_points_pb or log_uniform_xsec_grid(points_per_decade=1))
    jobs = spectrum_jobs(table, lumi_pb, points, exclude, seed)
    results = map_batched(_run_job, jobs, executor)
    fitted_seconds = time.perf_counter() - start
    lee = None
    nested = _nested_spectra(results, jobs[0].edges) if jobs else []
    if nested:
        lee = scan_significance(nested, seed=seed, max_pseudo_scans=20_000)
    return ScanResult(
        tuple(results),
        lee,
        points,
        {
            "spectra": round(fitted_seconds, 1),
            "look_elsewhere": round(time.perf_counter() - start - fitted_seconds, 1),
        },
    )


def run_demo(
    output: Path, *, n_events: int = 100_000, seed: int = 7, executor: Executor = "auto"
) -> int:
    """Generate a sample with two injected resonances, scan it, and print what was found."""
    from rich.console import Console

    console = Console()
    with run_folder_lock(output, "demo"):
        # results.json is the demo's commit record: a rerun removes it before it changes the
        # data, so a killed rerun never leaves old results beside new data
        (output / "results.json").unlink(missing_ok=True)
        return _locked_demo(output, n_events, seed, executor, console)


def _locked_demo(output: Path, n_events: int, seed: int, executor: Executor, console: Any) -> int:
    from rich.table import Table

    timings: dict[str, float] = {}

    clock = time.perf_counter()
    sample = generate_sample(
        output / "data", SampleConfig(n_events=n_events, seed=seed, signals=DEMO_SIGNALS)
    )
    files = [str(p) for p in sample.files]
    timings["generate"] = time.perf_counter() - clock
    console.print(
        f"generated {n_events} background events + signals "
        f"{', '.join(s.label() for s in DEMO_SIGNALS)} ({sample.lumi_pb:g} pb^-1) in "
        f"{timings['generate']:.1f} s"
    )

    clock = time.perf_counter()
    model = output / "model" / "autoencoder.onnx"
    model.parent.mkdir(exist_ok=True)
    trained = get_tool("train_autoencoder").call(
        {"inputs": files, "output": str(model), "seed": seed, "fraction": 0.01, "max_epochs": 30}
    )
    timings["train"] = time.perf_counter() - clock
    console.print(
        f"trained the autoencoder on {trained['n_training_events']} events (1 %), best epoch "
        f"{trained['best_epoch']}, in {timings['train']:.1f} s -> {model}"
    )

    clock = time.perf_counter()
    summary = event_pass(
        files, output / "events", PassSpec(model=str(model)), executor=executor, progress=True
    )
    timings["event pass"] = time.perf_counter() - clock
    console.print(
        f"event pass ({summary.executor}): {summary.n_events} events scored and tabulated in "
        f"{timings['event pass']:.1f} s; events per stream {summary.stream_counts}"
    )

    clock = time.perf_counter()
    scan = run_scan(
        output / "events",
        sample.lumi_pb,
        model=model,
        seed=seed,
        xsec_points_pb=(10.0, 1.0, 0.1),
        executor=executor,
    )
    timings["scan"] = time.perf_counter() - clock

    table = Table(title="largest local excesses (BumpHunter against the chosen background)")
    for column in (
        "spectrum",
        "AR pb",
        "background",
        "GOF p",
        "window GeV",
        "data",
        "bkg",
        "Z loc",
    ):
        table.add_column(
            column, justify="right" if column not in ("spectrum", "background") else "left"
        )
    for result in scan.ranked()[:8]:
        bump = result.bump
        assert bump is not None
        table.add_row(
            result.name,
            f"{result.xsec_pb:g}",
            f"{result.function}{'' if result.status == 'background accepted' else ' (!)'}",
            f"{result.gof_p:.2f}",
            f"{bump.mass_low:.0f}-{bump.mass_high:.0f}",
            f"{bump.data:.0f}",
            f"{bump.background:.1f}",
            f"{bump.local_z:.1f}",
        )
    console.print(table)
    n_fitted = sum(r.bump is not None for r in scan.results)
    console.print(
        f"{len(scan.results)} spectra x points: {n_fitted} fitted and hunted, "
        f"{sum(r.status == 'too few events' for r in scan.results)} with too few events; "
        "(!) = background kept from the F-test although a robustness check failed"
    )
    if scan.lee is not None:
        console.print(
            f"scan-wide: largest excess {scan.lee.best.spectrum} at "
            f"{scan.lee.best.cross_section_pb:g} pb, local Z = {scan.lee.local_z:.1f}, "
            f"global Z = {scan.lee.global_z:.1f}"
            f"{' (lower limit)' if scan.lee.global_z_is_lower_limit else ''}, "
            f"{scan.lee.n_pseudo_scans} pseudo-scans"
        )
    injected = load_truth(sample.truth_path)["truth"]
    assert isinstance(injected, list)
    console.print(
        "injected: " + ", ".join(f"{s['label']} ({s['n_events']} events)" for s in injected)
    )
    results_path = output / "results.json"
    write_json(
        results_path,
        {
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "xsec_points_pb": list(scan.xsec_points_pb),
            "spectra": [r.summary() for r in scan.results],
            "truth": injected,
        },
        what="demo results",
    )
    console.print(f"results: {results_path}")
    return 0
