"""Bump-hunting tools: `bump_hunt` (one spectrum), `signal_fit`, `scan_significance`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from core.bumphunt import (
    MAX_TOYS,
    MIN_WINDOW_BACKGROUND,
    MIN_WINDOW_COUNT,
    BumpHuntResult,
    HuntOptions,
    LocalExcess,
    bump_hunt,
)
from core.errors import InvalidInputError
from core.lookelsewhere import (
    NestedSpectrum,
    ScanPoint,
    ScanPointExcess,
    correlation_from_points,
    nested_spectrum,
    scan_significance,
    spectra_from_points,
)
from core.masses import mass_resolution
from core.significance import BackgroundNormalisation, signal_fit
from tools.common import HistogramInput, StrictModel, require_file
from tools.registry import register

FloatArray = npt.NDArray[np.float64]
OutputT = TypeVar("OutputT", bound=StrictModel)


def _output(model: type[OutputT], result: object, **fields: object) -> OutputT:
    """`model` filled from the core `result`: `fields` as given, every other field copied."""
    copied = {name: getattr(result, name) for name in model.model_fields.keys() - fields.keys()}
    return model(**copied, **fields)


def _window(excess: LocalExcess | BumpHuntResult) -> dict[str, object]:
    """The window of a core excess as output fields: [lo, hi] GeV and bins [first, stop)."""
    return {
        "window": (excess.mass_low, excess.mass_high),
        "bins": (excess.first_bin, excess.stop_bin),
    }


def _histogram_with_background(
    histogram: HistogramInput,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    edges, counts, background = histogram.arrays()
    if background is None:
        raise InvalidInputError(
            "this tool needs the histogram's expected 'background' per bin (inline or an NPZ "
            "array 'background'); fit one with fit_background first"
        )
    return edges, counts, background


class BumpHuntInput(StrictModel):
    """BumpHunter on one spectrum against its background (expected counts per bin)."""

    histogram: HistogramInput
    width_min: int = Field(1, ge=1, description="narrowest window, bins")
    width_max: int | None = Field(None, ge=1, description="widest window, bins; null = N/2")
    n_toys: int = Field(
        1_000, ge=1, le=MAX_TOYS, description="minimum number of background-only toys"
    )
    max_toys: int = Field(
        100_000, ge=1, le=MAX_TOYS, description="toy budget (raised to 10 000 when p < 0.01)"
    )
    target_rel_error: float = Field(0.1, gt=0, lt=1, description="stop at this error on p")
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
    seed: int = Field(0, ge=0, le=2**63 - 1)


class ExcessOutput(StrictModel):
    """The most significant window of a spectrum and its local significance."""

    window: tuple[float, float] = Field(description="[lo, hi] GeV")
    bins: tuple[int, int] = Field(description="[first, last + 1]")
    data: float
    background: float
    statistic: float = Field(description="t = -ln(local p)")
    local_p: float
    local_z: float
    background_error: float = Field(
        description="fit uncertainty of the window's background (events); 0 if not folded"
    )


class BumpHuntOutput(ExcessOutput):
    """The most significant window and its local and global significance."""

    global_p: float = Field(
        description="fraction of toys reaching t_obs; an upper limit (never 0) when "
        "global_z_is_lower_limit"
    )
    global_p_error: float
    global_z: float
    global_z_is_lower_limit: bool
    n_toys: int
    n_toys_reaching: int
    converged: bool
    width_min: int
    width_max: int
    n_windows: int
    min_window_background: float = Field(
        description="windows expecting fewer background events were not scanned"
    )
    global_p_method: str = Field(
        description="toys (refitted: each toy refitted to first order, as the data were) | "
        "toys (against the fixed background) | bonferroni bound (p <= n_windows x local p, "
        "Z a lower limit) | no excess"
    )
    min_window_count: int = Field(
        description="windows with fewer observed events were not candidates"
    )
    background_uncertainty: bool = Field(
        description="the background's fit uncertainty was folded into the local p "
        "(negative binomial tails); false: Poisson tails of an exact background"
    )


def bump_output(result: BumpHuntResult) -> BumpHuntOutput:
    """The JSON form of a core bump hunt."""
    return _output(BumpHuntOutput, result, **_window(result))


@register(
    "bump_hunt",
    "BumpHunter scan of one spectrum: best window, local p, global p from adaptive toys",
    BumpHuntInput,
    BumpHuntOutput,
)
def bump_hunt_tool(arguments: BumpHuntInput) -> BumpHuntOutput:
    """Run `core.bumphunt.bump_hunt` on the tool's histogram."""
    edges, counts, background = _histogram_with_background(arguments.histogram)
    result = bump_hunt(
        counts,
        background,
        edges,
        width_min=arguments.width_min,
        width_max=arguments.width_max,
        min_toys=arguments.n_toys,
        max_toys=max(arguments.max_toys, arguments.n_toys),
        target_rel_error=arguments.target_rel_error,
        min_window_background=arguments.min_window_background,
        min_window_count=arguments.min_window_count,
        seed=arguments.seed,
    )
    return bump_output(result)


class SignalFitInput(StrictModel):
    """A Gaussian signal at a given mass over the histogram's background shape."""

    histogram: HistogramInput
    mass: float = Field(gt=0, description="signal mass, GeV")
    width: float | None = Field(
        None, gt=0, description="Gaussian sigma, GeV; null = resolution m sqrt(0.84^2/m+0.016^2)"
    )
    background_normalisation: BackgroundNormalisation = "fixed"


class SignalFitOutput(StrictModel):
    """Fitted signal yield (whole Gaussian, events) and its likelihood-ratio significance."""

    mass: float
    width: float
    signal_yield: float
    signal_yield_error: float
    background_scale: float
    background_scale_error: float
    background_normalisation: BackgroundNormalisation
    nll_signal_plus_background: float
    nll_background_only: float
    q0: float
    local_z: float
    local_p: float
    signal_fraction_in_range: float
    n_bins_fitted: int


@register(
    "signal_fit",
    "Fit a Gaussian signal yield at a mass over a fixed or floating background shape",
    SignalFitInput,
    SignalFitOutput,
)
def signal_fit_tool(arguments: SignalFitInput) -> SignalFitOutput:
    """Run `core.significance.signal_fit` on the tool's histogram."""
    edges, counts, background = _histogram_with_background(arguments.histogram)
    width = mass_resolution(arguments.mass) if arguments.width is None else arguments.width
    result = signal_fit(
        counts,
        background,
        edges,
        arguments.mass,
        width,
        background_normalisation=arguments.background_normalisation,
    )
    return SignalFitOutput(**vars(result))


class ScanSpectrumInput(StrictModel):
    """One spectrum at several AR points: inline arrays or `path` to an NPZ.

    The NPZ holds `edges` (N+1), `counts` and `background` (n_points, N), and
    `cross_sections_pb` (n_points).
    """

    name: str
    cross_sections_pb: list[float] | None = None
    edges: list[float] | None = None
    counts: list[list[float]] | None = None
    background: list[list[float]] | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _inline_or_path(self) -> ScanSpectrumInput:
        fields = (self.cross_sections_pb, self.edges, self.counts, self.background)
        inline = any(value is not None for value in fields)
        if inline == (self.path is not None):
            raise ValueError(
                "give either 'cross_sections_pb', 'edges', 'counts' and 'background' inline, "
                "or 'path' to an NPZ file"
            )
        if inline and any(value is None for value in fields):
            raise ValueError(
                "an inline spectrum needs 'cross_sections_pb', 'edges', 'counts' and 'background'"
            )
        return self

    def to_core(self) -> NestedSpectrum:
        """The validated core spectrum, loosest AR point first."""
        if self.path is not None:
            require_file(self.path, "spectrum file")
            keys = ("edges", "counts", "background", "cross_sections_pb")
            with np.load(self.path) as data:
                missing = [key for key in keys if key not in data]
                if missing:
                    raise InvalidInputError(
                        f"spectrum file {self.path} lacks arrays {missing}; "
                        f"it holds {sorted(data.files)}"
                    )
                arrays = {key: np.asarray(data[key], dtype=np.float64) for key in keys}
            return nested_spectrum(
                self.name,
                arrays["edges"],
                arrays["cross_sections_pb"],
                arrays["counts"],
                arrays["background"],
            )
        return nested_spectrum(
            self.name,
            np.asarray(self.edges, dtype=np.float64),
            np.asarray(self.cross_sections_pb, dtype=np.float64),
            _rectangular(self.counts, self.name, "counts"),
            _rectangular(self.background, self.name, "background"),
        )


def _rectangular(rows: list[list[float]] | None, name: str, what: str) -> FloatArray:
    assert rows is not None
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise InvalidInputError(
            f"spectrum {name!r}: every AR point's {what} must have the same number of bins, "
            f"found lengths {sorted(lengths)}"
        )
    return np.asarray(rows, dtype=np.float64)


class ScanPointInput(StrictModel):
    """One spectrum at one AR point as `search_spectrum` returned it (its output fields).

    `edges`, `counts`, `background` cover histogram bins [first_bin, stop_bin); the window
    set is the hunt's (`bump.width_min`, `bump.width_max`, `bump.min_window_background`, or
    the fields given here). `jacobian` (d mu / d parameters, one row per bin) and
    `covariance` fold the fit uncertainty into the windows as the hunt did; with `fitted`
    the pseudo-scans refit each toy; `replicas` give the spectra's correlation.
    Points whose `status` is not "accepted" are left out and listed in the output with
    their `reason`.
    """

    spectrum: str
    cross_section_pb: float = Field(gt=0, le=1e9)
    first_bin: int = Field(ge=0, le=100_000)
    stop_bin: int | None = Field(None, ge=1, le=100_000)
    edges: list[float]
    counts: list[float]
    background: list[float]
    width_min: int | None = Field(None, ge=1, le=1000)
    width_max: int | None = Field(None, ge=1, le=1000)
    min_window_background: float | None = Field(None, ge=0, le=1e6)
    min_window_count: int | None = Field(None, ge=0, le=1_000_000)
    bump: dict[str, object] | None = Field(
        None, description="the search_spectrum `bump` (its window fields are used)"
    )
    jacobian: list[list[float]] = Field(
        default_factory=list,
        description="d background / d fit parameters per bin (empty: toys not refitted)",
    )
    covariance: list[list[float]] = Field(default_factory=list)
    fitted: list[bool] = Field(
        default_factory=list, description="bins the fit's likelihood used (with `jacobian`)"
    )
    replicas: list[list[float]] = Field(
        default_factory=list,
        description="Poisson-bootstrap replica counts (replicas x bins) for the spectra's "
        "correlation (empty: spectra taken as independent)",
    )
    status: str = "accepted"
    reason: str = ""

    def to_core(self) -> ScanPoint:
        """The core scan point with the hunt's window set."""
        bump = self.bump or {}

        def pick(name: str, given: object, default: object) -> object:
            return given if given is not None else bump.get(name, default)

        width_min = pick("width_min", self.width_min, 1)
        width_max = pick("width_max", self.width_max, None)
        minimum = pick("min_window_background", self.min_window_background, MIN_WINDOW_BACKGROUND)
        min_count = pick("min_window_count", self.min_window_count, MIN_WINDOW_COUNT)
        if not isinstance(width_min, int) or not (width_max is None or isinstance(width_max, int)):
            raise InvalidInputError(
                f"point {self.spectrum!r} at {self.cross_section_pb:g} pb: window widths must "
                "be integers (bins)"
            )
        if not isinstance(minimum, int | float) or not isinstance(min_count, int):
            raise InvalidInputError(
                f"point {self.spectrum!r}: min_window_background must be a number of events "
                "and min_window_count an integer"
            )
        if self.stop_bin is not None and self.stop_bin - self.first_bin != len(self.counts):
            raise InvalidInputError(
                f"point {self.spectrum!r} at {self.cross_section_pb:g} pb: bins "
                f"[{self.first_bin}, {self.stop_bin}) but {len(self.counts)} counts"
            )
        return ScanPoint(
            self.spectrum,
            self.cross_section_pb,
            self.first_bin,
            np.asarray(self.edges, dtype=np.float64),
            np.asarray(self.counts, dtype=np.float64),
            np.asarray(self.background, dtype=np.float64),
            HuntOptions(
                width_min=width_min,
                width_max=width_max,
                min_window_background=float(minimum),
                min_window_count=min_count,
            ),
            jacobian=np.asarray(self.jacobian, dtype=np.float64) if self.jacobian else None,
            covariance=np.asarray(self.covariance, dtype=np.float64) if self.covariance else None,
            fitted=np.asarray(self.fitted, dtype=bool) if self.fitted else None,
            replicas=np.asarray(self.replicas, dtype=np.float64) if self.replicas else None,
        )


def _points_from_npz(path: Path) -> list[ScanPoint]:
    """Scan points (all accepted) from an NPZ file, one row per point.

    Arrays `spectrum` (names), `cross_section_pb`, `first_bin`, `width_min`, `width_max`
    (0 = none), `min_window_background`, optionally `min_window_count`, and per point i
    `edges_i`, `counts_i`, `background_i` and, optionally, the fit's `jacobian_i`,
    `covariance_i` and `fitted_i` and the bootstrap `replicas_i`. The numbers of each point
    are checked as `ScanPointInput`'s; its arrays go into the core point as arrays (a
    scan's bootstrap replicas are 1e7 numbers: as Python lists they took 0.7-1.8 GB).
    """
    require_file(path, "points file")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(name) for name in data["spectrum"]]
            points = []
            for index, name in enumerate(names):
                checked = ScanPointInput(
                    spectrum=name,
                    cross_section_pb=float(data["cross_section_pb"][index]),
                    first_bin=int(data["first_bin"][index]),
                    edges=[],
                    counts=[],
                    background=[],
                    width_min=int(data["width_min"][index]),
                    width_max=int(data["width_max"][index]) or None,
                    min_window_background=float(data["min_window_background"][index]),
                    min_window_count=(
                        int(data["min_window_count"][index]) if "min_window_count" in data else None
                    ),
                )
                points.append(
                    dataclasses.replace(
                        checked.to_core(),
                        edges=np.asarray(data[f"edges_{index}"], dtype=np.float64),
                        counts=np.asarray(data[f"counts_{index}"], dtype=np.float64),
                        background=np.asarray(data[f"background_{index}"], dtype=np.float64),
                        jacobian=_optional_array(data, f"jacobian_{index}", np.float64),
                        covariance=_optional_array(data, f"covariance_{index}", np.float64),
                        fitted=_optional_array(data, f"fitted_{index}", np.bool_),
                        replicas=_optional_array(data, f"replicas_{index}", np.float64),
                    )
                )
    except (KeyError, ValueError, OSError) as error:
        raise InvalidInputError(
            f"points file {path} is not a scan-points NPZ ({error}); see the tool's schema"
        ) from error
    return points


def _optional_array(data: Any, key: str, dtype: type) -> npt.NDArray[Any] | None:
    """Array `key` of an open NPZ as `dtype`, None when the file lacks it."""
    return np.asarray(data[key], dtype=dtype) if key in data.files else None


class ScanSignificanceInput(StrictModel):
    """Every spectrum of a scan at its AR points, for one scan-wide global p-value.

    Give `spectra` (one entry per spectrum, all points on one binning), or `points` (the
    per-point results of `search_spectrum`, inline) or `points_path` (an NPZ of them).
    """

    spectra: list[ScanSpectrumInput] = Field(default_factory=list)
    points: list[ScanPointInput] = Field(default_factory=list)
    points_path: Path | None = None
    width_min: int = Field(1, ge=1, description="narrowest window, bins")
    width_max: int | None = Field(None, ge=1, description="widest window, bins; null = N/2")
    n_pseudo_scans: int = Field(
        1_000, ge=1, le=MAX_TOYS, description="minimum number of pseudo-scans per spectrum"
    )
    max_pseudo_scans: int = Field(
        100_000, ge=1, le=MAX_TOYS, description="budget per spectrum (>= 10 000 when p < 0.01)"
    )
    target_rel_error: float = Field(0.1, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    top: int = Field(10, ge=1, le=100_000, description="how many excesses to list")
    workers: int = Field(
        1, ge=1, le=64, description="processes drawing pseudo-scans (same result for any)"
    )

    @model_validator(mode="after")
    def _something_to_scan(self) -> ScanSignificanceInput:
        if not (self.spectra or self.points or self.points_path):
            raise ValueError("give 'spectra', 'points' or 'points_path' (at least one entry)")
        return self


class ScanPointOutput(ExcessOutput):
    """The best window of one spectrum at one AR point."""

    spectrum: str
    cross_section_pb: float


class ExcludedPoint(StrictModel):
    """A point that did not enter the scan-wide test and why."""

    spectrum: str
    cross_section_pb: float
    status: str
    reason: str


class ScanSignificanceOutput(StrictModel):
    """The largest local excess of the scan and its scan-wide global significance."""

    best: ScanPointOutput
    points: list[ScanPointOutput] = Field(description="the `top` excesses, largest first")
    statistic: float
    local_p: float
    local_z: float
    global_p: float
    global_p_error: float
    global_z: float
    global_z_is_lower_limit: bool
    effective_trials: float | None
    n_tests: int
    n_windows: int
    n_pseudo_scans: int
    n_pseudo_scans_reaching: int
    converged: bool
    background_nesting_violations: int
    method: str
    global_p_method: str
    global_z_toys_lower_limit: float | None
    n_spectra: int
    n_toys_per_spectrum_max: int
    spectrum_tails: list[tuple[str, float, str]] = Field(
        description="per spectrum: name, q_s = P(T_s >= T_obs), how it was estimated"
    )
    merged_points: list[tuple[str, float, float]] = Field(
        description="whole-stream repeats entered once: spectrum, dropped pb, kept pb"
    )
    data_nesting_violations: int
    excluded: list[ExcludedPoint] = Field(
        default_factory=list, description="points left out of the test, with their reason"
    )


def _point_output(point: ScanPointExcess) -> ScanPointOutput:
    return _output(
        ScanPointOutput,
        point.excess,
        spectrum=point.spectrum,
        cross_section_pb=point.cross_section_pb,
        **_window(point.excess),
    )


@register(
    "scan_significance",
    "Scan-wide global p of the largest excess over all spectra and AR points (nested toys)",
    ScanSignificanceInput,
    ScanSignificanceOutput,
)
def scan_significance_tool(arguments: ScanSignificanceInput) -> ScanSignificanceOutput:
    """Run `core.lookelsewhere.scan_significance` on the tool's spectra."""
    excluded = [
        ExcludedPoint(
            spectrum=point.spectrum,
            cross_section_pb=point.cross_section_pb,
            status=point.status,
            reason=point.reason or "not accepted",
        )
        for point in arguments.points
        if point.status != "accepted"
    ]
    spectra = [spectrum.to_core() for spectrum in arguments.spectra]
    core_points = [point.to_core() for point in arguments.points if point.status == "accepted"]
    if arguments.points_path is not None:
        core_points += _points_from_npz(arguments.points_path)
    from_points = spectra_from_points(core_points)
    spectra += from_points
    correlation = None
    if from_points and not arguments.spectra:
        correlation = correlation_from_points(from_points, core_points)
    if not spectra:
        raise InvalidInputError(
            "no accepted point to test: every point given has a status other than 'accepted'"
        )
    result = scan_significance(
        spectra,
        width_min=arguments.width_min,
        width_max=arguments.width_max,
        min_pseudo_scans=arguments.n_pseudo_scans,
        max_pseudo_scans=max(arguments.max_pseudo_scans, arguments.n_pseudo_scans),
        target_rel_error=arguments.target_rel_error,
        seed=arguments.seed,
        workers=arguments.workers,
        correlation=correlation,
    )
    return _output(
        ScanSignificanceOutput,
        result,
        best=_point_output(result.best),
        points=[_point_output(point) for point in result.points[: arguments.top]],
        spectrum_tails=list(result.spectrum_tails),
        merged_points=list(result.merged_points),
        excluded=excluded,
    )
