"""Spectrum tools: `spectra` (fill them), `search_spectrum` (rule half 2), `analyse_spectrum`.

`spectra` fills the 63 invariant-mass spectra (7 streams x 9 pairs) of an event table after an
optional anomaly-score cut. `analyse_spectrum` runs the whole per-spectrum rule.

`search_spectrum` hunts for a bump against an accepted background (a function fitted over a
given range), runs the window exclusion and returns the final background; its output is
also a point of `scan_significance` (fields `first_bin`, `stop_bin`, `edges`, `counts`,
`background`, `bump.width_min/width_max/min_window_background`); `background_error` is the
1-sigma fit uncertainty of `background` per bin (`core.fit.expected_errors`); `jacobian`,
`covariance` and `fitted` describe the final fit (d background / d parameters, the
parameters' covariance, the bins its likelihood used), for the linearised refit of the
scan's pseudo-scans (`core.pseudodata`). A background
chosen with a window masked is searched with `masked_window_gev`: fitted with the window left
out and no second exclusion (core.spectrum, rule step 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from core.bumphunt import MAX_TOYS, MIN_WINDOW_BACKGROUND, MIN_WINDOW_COUNT, HuntOptions
from core.errors import InvalidInputError
from core.exclusion import EXCLUSION_TRIGGER_P, WindowExclusion
from core.files import exclusive_output
from core.masses import SPECTRUM_NAMES, STREAM_FIT_FROM_GEV
from core.spectrum import SpectrumSearch, analyse_spectrum, search_spectrum
from core.table import table_spectra
from tools.bumps import BumpHuntOutput, bump_output
from tools.common import HistogramInput, StrictModel, npz_output_path, save_npz
from tools.fits import CheckSettings, FallbackSettings, symbolic_fallback
from tools.registry import FilePath, register

StreamName = Literal["T1", "T2", "T3", "T4", "T5", "T6", "T7"]


class HuntSettings(StrictModel):
    """Window set and toy budget of the bump hunt (the same in the scan-wide test)."""

    width_min: int = Field(1, ge=1, le=1000, description="narrowest window, bins")
    width_max: int | None = Field(
        None, ge=1, le=1000, description="widest window, bins; null = half the fit range"
    )
    min_window_background: float = Field(
        MIN_WINDOW_BACKGROUND,
        ge=0,
        le=1e6,
        description="windows expecting fewer background events are not scanned",
    )
    min_window_count: int = Field(
        MIN_WINDOW_COUNT,
        ge=0,
        le=1_000_000,
        description="windows with fewer observed events are not candidates",
    )
    fold_background_uncertainty: bool = Field(
        True, description="fold the fit's uncertainty into each window's local p"
    )
    n_toys: int = Field(1_000, ge=1, le=MAX_TOYS, description="minimum number of toys")
    max_toys: int = Field(
        100_000, ge=1, le=MAX_TOYS, description="toy budget (raised to 10 000 when p < 0.01)"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1)

    def to_core(self) -> HuntOptions:
        """The core hunt options."""
        return HuntOptions(
            width_min=self.width_min,
            width_max=self.width_max,
            min_window_background=self.min_window_background,
            min_toys=self.n_toys,
            max_toys=max(self.max_toys, self.n_toys),
            min_window_count=self.min_window_count,
            fold_background_uncertainty=self.fold_background_uncertainty,
        )


class SearchSpectrumInput(HuntSettings):
    """Bump hunt against `function` fitted over `fit_range`, window exclusion, final fit."""

    histogram: HistogramInput
    fit_range: tuple[float, float] = Field(description="[lo, hi] GeV of the accepted fit")
    function: str = Field(
        description="p2..p6, ua2, ua2_5, or a symbolic expression ln f - ln p1 in x, lnx, ln1mx"
    )
    parameters: list[float] | None = Field(
        None, description="start (ln p1, p2, ...); a symbolic expression's constants"
    )
    masked_window_gev: tuple[float, float] | None = Field(
        None,
        description="[lo, hi] GeV the background was chosen with masked: the fit leaves it "
        "out and no window exclusion runs; null = unmasked, window exclusion as usual",
    )
    sqrt_s: float = Field(13000.0, gt=0, le=1e6, description="collision energy in GeV")
    exclusion_trigger_p: float = Field(
        EXCLUSION_TRIGGER_P, gt=0, lt=1, description="window exclusion below this global p"
    )


class WindowExclusionOutput(StrictModel):
    """A window exclusion: mask, both fits' predictions in it, and the decision."""

    trigger_global_p: float
    bump_window_gev: tuple[float, float]
    window_bins: tuple[int, int] = Field(description="absolute bins [first, stop) masked")
    window_gev: tuple[float, float]
    max_width_gev: float
    data_in_window: float
    unmasked_function: str
    unmasked_parameters: list[float]
    unmasked_p_value: float
    masked_parameters: list[float] | None
    masked_p_value: float | None
    background_unmasked: float
    background_unmasked_error: float
    background_masked: float | None
    background_masked_error: float | None
    agreement_sigma: float | None
    agrees: bool = Field(
        description="the masked and unmasked predictions in the window agree (the window does "
        "not pull the fit); the background stays the unmasked fit either way"
    )
    reason: str


def exclusion_output(record: WindowExclusion) -> WindowExclusionOutput:
    """The JSON form of a core window exclusion."""
    masked = record.masked
    return WindowExclusionOutput(
        trigger_global_p=record.trigger_global_p,
        bump_window_gev=record.bump_window_gev,
        window_bins=record.window_bins,
        window_gev=record.window_gev,
        max_width_gev=record.max_width_gev,
        data_in_window=record.data_in_window,
        unmasked_function=record.unmasked.name,
        unmasked_parameters=list(record.unmasked.parameters),
        unmasked_p_value=record.unmasked.p_value,
        masked_parameters=None if masked is None else list(masked.parameters),
        masked_p_value=None if masked is None else masked.p_value,
        background_unmasked=record.background_unmasked,
        background_unmasked_error=record.background_unmasked_error,
        background_masked=record.background_masked,
        background_masked_error=record.background_masked_error,
        agreement_sigma=record.agreement_sigma,
        agrees=record.agrees,
        reason=record.reason,
    )


class SearchSpectrumOutput(StrictModel):
    """The final background over bins [first_bin, stop_bin), the bump and the exclusion."""

    function: str
    parameters: list[float]
    fit_range: tuple[float, float]
    p_value: float = Field(description="deviance p-value of the final background fit")
    first_bin: int
    stop_bin: int
    edges: list[float] = Field(description="edges of the bins in range (GeV)")
    counts: list[float]
    background: list[float] = Field(description="final expected background per bin in range")
    background_error: list[float] = Field(
        description="1-sigma fit uncertainty of `background` per bin (covariance propagated)"
    )
    jacobian: list[list[float]] = Field(
        default_factory=list,
        description="d background / d parameters per bin in range (bins x parameters); empty: "
        "the fit's uncertainty was not folded into the hunt and pseudo-scans are not refitted",
    )
    covariance: list[list[float]] = Field(
        default_factory=list, description="the final fit's parameter covariance (with jacobian)"
    )
    fitted: list[bool] = Field(
        default_factory=list, description="bins in range that the final fit's likelihood used"
    )
    bump: BumpHuntOutput = Field(description="hunt against the final background")
    bump_unmasked: BumpHuntOutput = Field(description="hunt against the unmasked background")
    window_exclusion: WindowExclusionOutput | None
    masked_window_gev: tuple[float, float] | None = Field(
        description="window the final background leaves out (GeV); null = none"
    )
    mask_from: Literal["choice"] | None = Field(
        description="choice: the background was chosen with the mask (rule step 2); null: "
        "unmasked (the window exclusion never replaces the background)"
    )
    trail: list[str]


def search_output(search: SpectrumSearch) -> SearchSpectrumOutput:
    """The JSON form of a core search."""
    return SearchSpectrumOutput(
        function=search.fit.name,
        parameters=list(search.fit.parameters),
        fit_range=search.fit.fit_range,
        p_value=search.fit.p_value,
        first_bin=search.first_bin,
        stop_bin=search.stop_bin,
        edges=np.asarray(search.edges, dtype=float).tolist(),
        counts=np.asarray(search.counts, dtype=float).tolist(),
        background=np.asarray(search.background, dtype=float).tolist(),
        background_error=np.asarray(search.background_error, dtype=float).tolist(),
        jacobian=_rows(search.background_jacobian),
        covariance=_rows(search.background_covariance),
        fitted=[] if search.background_jacobian is None else [bool(u) for u in search.fit.used],
        bump=bump_output(search.bump),
        bump_unmasked=bump_output(search.bump_unmasked),
        window_exclusion=None if search.exclusion is None else exclusion_output(search.exclusion),
        masked_window_gev=search.masked_window_gev,
        mask_from=search.mask_from,
        trail=list(search.trail),
    )


def _rows(array: np.ndarray | None) -> list[list[float]]:
    return [] if array is None else np.asarray(array, dtype=float).tolist()


@register(
    "search_spectrum",
    "Bump hunt against an accepted background, window exclusion, final background",
    SearchSpectrumInput,
    SearchSpectrumOutput,
)
def search_spectrum_tool(arguments: SearchSpectrumInput) -> SearchSpectrumOutput:
    """Run `core.spectrum.search_spectrum` on the tool's histogram."""
    edges, counts, _ = arguments.histogram.arrays()
    search = search_spectrum(
        edges,
        counts,
        arguments.function,
        arguments.fit_range,
        parameters=None if arguments.parameters is None else tuple(arguments.parameters),
        masked_window_gev=arguments.masked_window_gev,
        sqrt_s=arguments.sqrt_s,
        hunt=arguments.to_core(),
        exclusion_trigger_p=arguments.exclusion_trigger_p,
        seed=arguments.seed,
    )
    return search_output(search)


class AnalyseSpectrumInput(HuntSettings):
    """The whole per-spectrum rule: fit range, background choice, bump hunt, exclusion."""

    histogram: HistogramInput
    stream: StreamName | None = Field(None, description="sets the fit start (PHYSICS.md 3)")
    stream_start_gev: float | None = Field(
        None, gt=0, le=1e6, description="fit start when no stream is given, GeV"
    )
    upper_gev: float | None = Field(
        None, gt=0, le=1e6, description="fixed upper mass; null = 0.65 sqrt_s"
    )
    sqrt_s: float = Field(13000.0, gt=0, le=1e6, description="collision energy in GeV")
    checks: CheckSettings = Field(default_factory=CheckSettings)
    use_fallback: bool = True
    fallback_search: FallbackSettings = Field(default_factory=FallbackSettings)
    min_events: int = Field(40, ge=1, le=10**9)


class AnalyseSpectrumOutput(StrictModel):
    """Status ("accepted", "no accepted background", "too few events", "fit failed")."""

    status: Literal["accepted", "no accepted background", "too few events", "fit failed"]
    reason: str
    n_events: float
    n_in_range: float
    fit_range: tuple[float, float] | None
    chosen: str | None
    failed_checks: list[str]
    search: SearchSpectrumOutput | None
    trail: list[str]


@register(
    "analyse_spectrum",
    "The whole per-spectrum rule: fit range, background choice with fallback, bump hunt, "
    "window exclusion, status",
    AnalyseSpectrumInput,
    AnalyseSpectrumOutput,
)
def analyse_spectrum_tool(arguments: AnalyseSpectrumInput) -> AnalyseSpectrumOutput:
    """Run `core.spectrum.analyse_spectrum` on the tool's histogram."""
    if (arguments.stream is None) == (arguments.stream_start_gev is None):
        raise InvalidInputError("give exactly one of 'stream' and 'stream_start_gev'")
    start = (
        STREAM_FIT_FROM_GEV[arguments.stream]
        if arguments.stream is not None
        else float(arguments.stream_start_gev or 0.0)
    )
    edges, counts, _ = arguments.histogram.arrays()
    analysis = analyse_spectrum(
        edges,
        counts,
        start,
        sqrt_s=arguments.sqrt_s,
        upper_gev=arguments.upper_gev,
        checks=arguments.checks.to_core(),
        fallback=symbolic_fallback(arguments.fallback_search) if arguments.use_fallback else None,
        hunt=arguments.to_core(),
        min_events=arguments.min_events,
        seed=arguments.seed,
    )
    return AnalyseSpectrumOutput(
        status=analysis.status,
        reason=analysis.reason,
        n_events=analysis.n_events,
        n_in_range=analysis.n_in_range,
        fit_range=analysis.fit_range,
        chosen=None if analysis.decision is None else analysis.decision.chosen,
        failed_checks=list(analysis.failed_checks),
        search=None if analysis.search is None else search_output(analysis.search),
        trail=list(analysis.trail),
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

    _check_output = field_validator("output")(npz_output_path)


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
def spectra_tool(arguments: SpectraInput) -> SpectraOutput:
    """Cut the event table on the score and histogram every stream and pair."""
    with exclusive_output(arguments.output, what="spectra NPZ"):
        return _spectra(arguments)


def _spectra(arguments: SpectraInput) -> SpectraOutput:
    result = table_spectra(
        arguments.table, arguments.score_min, include_training=arguments.include_training
    )
    counts = result.spectra.counts
    save_npz(
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
