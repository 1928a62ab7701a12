"""The `set_limits` tool: 95 % CL CLs upper limits on Gaussian signals (core.limits).

Input: accepted spectra over their fit ranges (data, fitted background and its 1-sigma fit
uncertainty per bin), inline or as an NPZ (`points_path`: arrays `spectrum`, `point_pb`
and per spectrum i `edges_i`, `counts_i`, `background_i`, `background_error_i`), the
luminosity of the events in the spectra, the widths and the number of masses. Output: one
curve per (spectrum, AR point, width) with observed and expected (-2..+2 sigma) limits in
events and in pb (sigma x A x eff), and every (mass, width) left out with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from core.errors import InvalidInputError
from core.limits import (
    DEFAULT_CL,
    DEFAULT_N_MASSES,
    DEFAULT_WIDTHS,
    EXPECTED_SIGMAS,
    LOW_COUNT_BACKGROUND,
    WINDOW_SIGMAS,
    SpectrumBackground,
    spectrum_limits,
)
from core.masses import SPECTRUM_NAMES
from tools.common import StrictModel, npz_numbers, open_npz, require_file
from tools.registry import CrossSectionPb, LumiPb, PathText, register

BAND_KEYS = tuple(f"{n:+d}" if n else "0" for n in EXPECTED_SIGMAS)
"""Keys of the expected bands in the output: "-2", "-1", "0", "+1", "+2"."""

NUISANCE = (
    "one Gaussian-constrained shape nuisance (histosys b +- sigma_fit per bin, fully "
    "correlated over the signal window m +- 2 sigma_s)"
)


class LimitSpectrumInput(StrictModel):
    """One accepted spectrum at one AR point over its fit range."""

    spectrum: str = Field(description="e.g. T2/jm")
    point_pb: CrossSectionPb = Field(description="AR point (effective cross section, pb)")
    edges: list[float] = Field(min_length=2, description="fit-range bin edges (GeV)")
    counts: list[float]
    background: list[float] = Field(description="accepted fitted background per bin")
    background_error: list[float] = Field(description="1-sigma fit uncertainty per bin")


class SetLimitsInput(StrictModel):
    """95 % CL limits on Gaussian signals across the fit ranges of accepted spectra."""

    lumi_pb: LumiPb = Field(description="luminosity of the events in the spectra (pb^-1)")
    spectra: list[LimitSpectrumInput] = Field(default_factory=list)
    points_path: PathText | None = Field(None, description="NPZ of spectra (module docstring)")
    widths: list[float] = Field(
        default_factory=lambda: list(DEFAULT_WIDTHS),
        min_length=1,
        max_length=20,
        description="intrinsic widths as fractions of the mass (0 = detector resolution)",
    )
    n_masses: int = Field(DEFAULT_N_MASSES, ge=1, le=200, description="masses per fit range")
    cl: float = Field(DEFAULT_CL, ge=0.6, le=0.999, description="confidence level")
    method: Literal["auto", "asymptotic", "poisson", "pyhf"] = Field(
        "auto",
        description=(
            f"auto: exact CLs of the window count below {LOW_COUNT_BACKGROUND:g} background "
            "events, asymptotic CLs "
            "above; asymptotic or poisson: one of them everywhere; pyhf: the asymptotic reference"
        ),
    )

    @model_validator(mode="after")
    def _spectra_or_path(self) -> SetLimitsInput:
        if bool(self.spectra) == (self.points_path is not None):
            raise ValueError("give either 'spectra' inline or 'points_path' to an NPZ")
        for width in self.widths:
            if not 0.0 <= width <= 0.5:
                raise ValueError(f"a width is a fraction of the mass in [0, 0.5], got {width}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct, got {self.widths}")
        return self

    def backgrounds(self) -> list[SpectrumBackground]:
        """The spectra as core inputs (read from `points_path` when given)."""
        items = self.spectra if self.points_path is None else _read_points(Path(self.points_path))
        result = []
        for item in items:
            if item.spectrum not in SPECTRUM_NAMES:
                raise InvalidInputError(
                    f"unknown spectrum {item.spectrum!r}; spectra are named STREAM/PAIR, e.g. T2/jm"
                )
            result.append(
                SpectrumBackground(
                    item.spectrum,
                    float(item.point_pb),
                    np.asarray(item.edges, dtype=np.float64),
                    np.asarray(item.counts, dtype=np.float64),
                    np.asarray(item.background, dtype=np.float64),
                    np.asarray(item.background_error, dtype=np.float64),
                )
            )
        return result


def _read_points(path: Path) -> list[LimitSpectrumInput]:
    require_file(path, "limits input", "; give an NPZ of spectra")
    with open_npz(path) as data:
        missing = [key for key in ("spectrum", "point_pb") if key not in data]
        if missing:
            raise InvalidInputError(f"{path} lacks arrays {missing}; it holds {sorted(data.files)}")
        names = [str(name) for name in np.asarray(data["spectrum"]).tolist()]
        points = npz_numbers(data, "point_pb", path).astype(np.float64)
        if points.shape != (len(names),):
            raise InvalidInputError(f"{path}: 'point_pb' must hold one value per spectrum")
        items = []
        for index, (name, point) in enumerate(zip(names, points, strict=True)):
            arrays = {}
            for key in ("edges", "counts", "background", "background_error"):
                label = f"{key}_{index}"
                if label not in data:
                    raise InvalidInputError(f"{path} lacks array {label!r} of spectrum {name}")
                arrays[key] = npz_numbers(data, label, path).astype(np.float64).tolist()
            items.append(LimitSpectrumInput(spectrum=name, point_pb=float(point), **arrays))
    return items


class LimitCurveOutput(StrictModel):
    """Limits against mass for one spectrum, AR point and width."""

    spectrum: str
    point_pb: float
    width: float = Field(description="intrinsic width / mass (0 = detector resolution)")
    masses_gev: list[float]
    sigma_gev: list[float] = Field(description="Gaussian sigma of the signal")
    signal_in_window: list[float] = Field(description="fraction of the signal in the window")
    window_background: list[float] = Field(
        description="fitted background in the window, events (below "
        f"{LOW_COUNT_BACKGROUND:g} the default limit is the exact CLs of the count)"
    )
    counting: list[bool] = Field(
        description="true where the limit is the exact CLs of the window count (a low count)"
    )
    observed_events: list[float]
    expected_events: dict[str, list[float]] = Field(description="bands -2, -1, 0, +1, +2")
    observed_pb: list[float] = Field(description="sigma x A x eff, pb")
    expected_pb: dict[str, list[float]]


class SkippedLimitOutput(StrictModel):
    """A (spectrum, point, width, mass) without a limit."""

    spectrum: str
    point_pb: float
    width: float
    mass_gev: float
    reason: str


class SetLimitsOutput(StrictModel):
    """Every limit curve, what was left out, and how the limits were set."""

    curves: list[LimitCurveOutput]
    skipped: list[SkippedLimitOutput]
    n_limits: int
    lumi_pb: float
    cl: float
    method: str
    test_statistic: str = Field(
        description="qtilde (Cowan et al. 2011), asymptotic CLs; the count where `counting`"
    )
    nuisance: str
    window_sigmas: float
    bands: list[int] = Field(description="the expected bands, in sigma")


def _bands(values: np.ndarray) -> dict[str, list[float]]:
    return {key: values[:, k].tolist() for k, key in enumerate(BAND_KEYS)}


@register(
    "set_limits",
    "95 % CL CLs upper limits (sigma x A x eff, pb) on Gaussian signals over accepted "
    "fitted backgrounds: observed and expected with +-1, +-2 sigma bands",
    SetLimitsInput,
    SetLimitsOutput,
)
def set_limits_tool(arguments: SetLimitsInput) -> SetLimitsOutput:
    """Run `core.limits.spectrum_limits` on the tool's spectra."""
    curves, skipped = spectrum_limits(
        arguments.backgrounds(),
        arguments.lumi_pb,
        widths=arguments.widths,
        n_masses=arguments.n_masses,
        cl=arguments.cl,
        method=arguments.method,
    )
    return SetLimitsOutput(
        curves=[
            LimitCurveOutput(
                spectrum=c.spectrum,
                point_pb=c.point_pb,
                width=c.width,
                masses_gev=c.masses.tolist(),
                sigma_gev=c.sigma.tolist(),
                signal_in_window=c.signal_in_window.tolist(),
                window_background=c.window_background.tolist(),
                counting=c.counting.tolist(),
                observed_events=c.observed_events.tolist(),
                expected_events=_bands(c.expected_events),
                observed_pb=c.observed_pb.tolist(),
                expected_pb=_bands(c.expected_pb),
            )
            for c in curves
        ],
        skipped=[
            SkippedLimitOutput(
                spectrum=s.spectrum,
                point_pb=s.point_pb,
                width=s.width,
                mass_gev=s.mass,
                reason=s.reason,
            )
            for s in skipped
        ],
        n_limits=sum(c.masses.size for c in curves),
        lumi_pb=arguments.lumi_pb,
        cl=arguments.cl,
        method=arguments.method,
        test_statistic="qtilde",
        nuisance=NUISANCE,
        window_sigmas=WINDOW_SIGMAS,
        bands=list(EXPECTED_SIGMAS),
    )
