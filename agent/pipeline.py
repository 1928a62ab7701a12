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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.executor import Executor, map_batched
from core import spectrum as core_spectrum
from core.anomaly import log_uniform_xsec_grid, stream_anomaly_regions
from core.autoencoder import read_model_card, training_selection
from core.bumphunt import DEFAULT_HUNT, BumpHuntResult
from core.exclusion import EXCLUSION_TRIGGER_P
from core.lookelsewhere import (
    NestedSpectrum,
    ScanPoint,
    ScanSignificance,
    scan_significance,
    spectra_from_points,
)
from core.masses import PAIRS, STREAM_FIT_FROM_GEV, STREAMS, histogram
from core.selection import CheckOptions
from core.spectrum import STATUSES, SpectrumSearch
from core.symbolic import SearchOptions, symbolic_fallback
from core.synth import SignalSpec
from core.table import EventTable, read_event_table

FloatArray = npt.NDArray[np.float64]

MIN_EVENTS_IN_FIT_RANGE = core_spectrum.MIN_EVENTS_IN_FIT_RANGE
"""Spectra with fewer events above the stream's fit start are recorded, not fitted."""

DEMO_SIGNALS = (
    SignalSpec("jm", 1500.0, 30.0, n_events=80, extra={"photons": 1, "electrons": 1}),
    SignalSpec("bg", 900.0, 20.0, n_events=80, extra={"muons": 1}),
)
"""The demo's injected truth: X -> jet muon at 1.5 TeV and X -> b photon at 0.9 TeV."""

WINDOW_EXCLUSION_P = EXCLUSION_TRIGGER_P
"""A spectrum whose global (trials-corrected) p is below this is masked and refitted."""

FAST_CHECKS = CheckOptions(spurious_method="asimov", n_gof_toys=50)
"""Robustness checks of the scan: spurious signal on the Asimov data set (30x cheaper than
toys and agreeing with their median, see tests/core/test_robustness.py)."""

SCAN_HUNT = DEFAULT_HUNT
"""The window set of the per-spectrum hunt and of the scan-wide test (one object)."""

SCAN_FALLBACK = SearchOptions(n_seeds=1, time_budget_s=30.0)
"""The scan's symbolic fallback: one seeded search (PHYSICS.md 5), run only when no analytic
function passes."""


@dataclass(frozen=True)
class SpectrumResult:
    """One spectrum at one anomaly-region point: its status, background and bump.

    `status` is one of core.spectrum.STATUSES; only "accepted" results carry a bump and
    enter the ranking and the scan-wide test.
    """

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
    reason: str = ""
    failed_checks: tuple[str, ...] = ()
    whole_stream: bool = False
    fit_range: tuple[float, float] | None = None
    search: SpectrumSearch | None = field(default=None, repr=False)

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
                "global_z_is_lower_limit": self.bump.global_z_is_lower_limit,
                "n_toys": self.bump.n_toys,
            }
        exclusion = None
        if self.search is not None and self.search.exclusion is not None:
            record = self.search.exclusion
            exclusion = {
                "window_gev": list(record.window_gev),
                "accepted": record.accepted,
                "agreement_sigma": record.agreement_sigma,
                "reason": record.reason,
            }
        return {
            "name": self.name,
            "xsec_pb": self.xsec_pb,
            "n_events": self.n_events,
            "n_in_range": self.n_in_range,
            "status": self.status,
            "reason": self.reason,
            "whole_stream": self.whole_stream,
            "fit_range": None if self.fit_range is None else list(self.fit_range),
            "function": self.function,
            "gof_p": self.gof_p,
            "bump": bump,
            "window_exclusion": exclusion,
            "failed_checks": list(self.failed_checks),
            "trail": list(self.trail),
        }


@dataclass(frozen=True)
class ScanResult:
    """Every spectrum result of a scan, the scan-wide look-elsewhere result and timings.

    `lee_excluded` lists (spectrum, cross-section, status, reason) of every result that did
    not enter the scan-wide test.
    """

    results: tuple[SpectrumResult, ...]
    lee: ScanSignificance | None
    xsec_points_pb: tuple[float, ...]
    seconds: dict[str, float]
    lee_excluded: tuple[tuple[str, float, str, str], ...] = ()

    def ranked(self) -> list[SpectrumResult]:
        """Accepted spectra with a bump, most significant local excess first."""
        bumps = [r for r in self.results if r.bump is not None and r.status == "accepted"]
        return sorted(bumps, key=lambda r: -r.bump.local_z if r.bump else 0.0)

    def status_counts(self) -> dict[str, int]:
        """How many spectrum results have each status."""
        counts = dict.fromkeys(STATUSES, 0)
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        return counts


def stream_regions(
    table: EventTable, xsec_pb: float, lumi_pb: float, exclude: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.bool_], list[bool]]:
    """Per stream, the events of its anomaly region (n, 7) and whether it is the whole stream.

    N = sigma x L_search with L_search = (1 - f) L, f the fraction of events excluded (the
    autoencoder's training events, PHYSICS.md 4).
    """
    regions = stream_anomaly_regions(table, xsec_pb, lumi_pb, exclude)
    masks = np.zeros(table.stream_bits.shape, dtype=bool)
    for k, region in enumerate(regions):
        masks[:, k] = region.selected
    return masks, [region.whole_stream for region in regions]


def analyse_spectrum(
    name: str,
    edges: FloatArray,
    counts: FloatArray,
    xsec_pb: float,
    *,
    sqrt_s: float = 13000.0,
    seed: int = 0,
    checks: CheckOptions = FAST_CHECKS,
    fallback: bool = True,
    whole_stream: bool = False,
) -> SpectrumResult:
    """The per-spectrum rule (core.spectrum.analyse_spectrum) at the stream's fit start."""
    stream = name.split("/", maxsplit=1)[0]
    analysis = core_spectrum.analyse_spectrum(
        edges,
        counts,
        STREAM_FIT_FROM_GEV[stream],
        sqrt_s=sqrt_s,
        checks=checks,
        fallback=symbolic_fallback(SCAN_FALLBACK) if fallback else None,
        hunt=SCAN_HUNT,
        seed=seed,
    )
    search = analysis.search
    common = {
        "name": name,
        "xsec_pb": xsec_pb,
        "n_events": int(analysis.n_events),
        "n_in_range": int(analysis.n_in_range),
        "status": analysis.status,
        "trail": analysis.trail,
        "reason": analysis.reason,
        "failed_checks": analysis.failed_checks,
        "whole_stream": whole_stream,
        "fit_range": analysis.fit_range,
    }
    if search is None:
        return SpectrumResult(**common)  # type: ignore[arg-type]
    return SpectrumResult(
        **common,  # type: ignore[arg-type]
        function=search.function,
        gof_p=search.fit.p_value,
        bump=search.bump,
        first_bin=search.first_bin,
        stop_bin=search.stop_bin,
        background=search.background,
        counts=search.counts,
        search=search,
    )


def _nested_spectra(
    results: Sequence[SpectrumResult], edges: FloatArray
) -> tuple[list[NestedSpectrum], list[tuple[str, float, str, str]]]:
    """The accepted results as scan-wide spectra, and every result left out with its reason.

    Each accepted point keeps its own fit range and window set (the per-spectrum hunt's);
    a whole-stream point that repeats another point's events and background enters once.
    """
    points: list[ScanPoint] = []
    excluded: list[tuple[str, float, str, str]] = []
    for result in results:
        if result.status != "accepted" or result.search is None:
            excluded.append((result.name, result.xsec_pb, result.status, result.reason))
            continue
        search = result.search
        points.append(
            ScanPoint(
                result.name,
                result.xsec_pb,
                search.first_bin,
                np.asarray(edges[search.first_bin : search.stop_bin + 1], dtype=np.float64),
                search.counts,
                search.background,
                search.hunt,
            )
        )
    return spectra_from_points(points), excluded


@dataclass(frozen=True)
class SpectrumJob:
    """One spectrum at one AR point, ready to be analysed anywhere (a Ray worker too)."""

    name: str
    edges: FloatArray
    counts: FloatArray
    xsec_pb: float
    seed: int
    whole_stream: bool = False
    fallback: bool = True

    def run(self) -> SpectrumResult:
        """Analyse this spectrum."""
        return analyse_spectrum(
            self.name,
            self.edges,
            self.counts,
            self.xsec_pb,
            seed=self.seed,
            whole_stream=self.whole_stream,
            fallback=self.fallback,
        )


def _run_job(job: SpectrumJob) -> SpectrumResult:
    return job.run()


def spectrum_jobs(
    table: EventTable,
    lumi_pb: float,
    xsec_points_pb: Sequence[float],
    exclude: npt.NDArray[np.bool_],
    seed: int,
    *,
    fallback: bool = True,
) -> list[SpectrumJob]:
    """The 63 spectra of every AR point: per stream, its region's events."""
    jobs = []
    for xsec in xsec_points_pb:
        masks, whole = stream_regions(table, xsec, lumi_pb, exclude)
        for k, stream in enumerate(STREAMS):
            for j, pair in enumerate(PAIRS):
                counts, edges = histogram(
                    table.masses, table.stream_bits, stream, pair, masks[:, k]
                )
                jobs.append(
                    SpectrumJob(
                        f"{stream}/{pair}",
                        edges,
                        counts.astype(float),
                        xsec,
                        seed + 100 * k + j,
                        whole[k],
                        fallback,
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
    fallback: bool = True,
    max_pseudo_scans: int = 200_000,
) -> ScanResult:
    """Sweep the anomaly-region points over an event table and analyse all 63 spectra each."""
    start = time.perf_counter()
    table = read_event_table(table_path)
    card = read_model_card(model)
    exclude = training_selection(table.keys(), card.fraction, card.seed)
    points = tuple(xsec_points_pb or log_uniform_xsec_grid(points_per_decade=1))
    jobs = spectrum_jobs(table, lumi_pb, points, exclude, seed, fallback=fallback)
    results = map_batched(_run_job, jobs, executor)
    fitted_seconds = time.perf_counter() - start
    lee = None
    nested, excluded = _nested_spectra(results, jobs[0].edges) if jobs else ([], [])
    if nested:
        lee = scan_significance(nested, seed=seed, max_pseudo_scans=max_pseudo_scans)
    return ScanResult(
        tuple(results),
        lee,
        points,
        {
            "spectra": round(fitted_seconds, 1),
            "look_elsewhere": round(time.perf_counter() - start - fitted_seconds, 1),
        },
        tuple(excluded),
    )


def scan_wide_summary(scan: ScanResult) -> dict[str, Any]:
    """The scan-wide look-elsewhere result and the spectra left out of it, as plain data."""
    lee = scan.lee
    assert lee is not None
    return {
        "best": {
            "spectrum": lee.best.spectrum,
            "xsec_pb": lee.best.cross_section_pb,
            "window_gev": [lee.best.excess.mass_low, lee.best.excess.mass_high],
            "data": lee.best.excess.data,
            "background": lee.best.excess.background,
        },
        "local_z": lee.local_z,
        "global_p": lee.global_p,
        "global_p_error": lee.global_p_error,
        "global_z": lee.global_z,
        "global_z_is_lower_limit": lee.global_z_is_lower_limit,
        "global_z_toys_lower_limit": lee.global_z_toys_lower_limit,
        "global_p_method": lee.global_p_method,
        "effective_trials": lee.effective_trials,
        "n_spectra": lee.n_spectra,
        "n_tests": lee.n_tests,
        "n_pseudo_scans": lee.n_pseudo_scans,
        "n_toys_per_spectrum_max": lee.n_toys_per_spectrum_max,
        "merged_points": [list(item) for item in lee.merged_points],
        "background_nesting_violations": lee.background_nesting_violations,
        "excluded": [
            {"spectrum": name, "xsec_pb": xsec, "status": status, "reason": reason}
            for name, xsec, status, reason in scan.lee_excluded
        ],
        "method": lee.method,
    }
