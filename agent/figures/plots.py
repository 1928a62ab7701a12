"""The report's figures: spectra, the significance map, scores, losses and limits.

Every function draws numbers it is given (from the audit, the run folder's NPZ files and
the model card) in the house style (`agent.figures.common`) and returns the figure;
`encode` turns a figure into PNG or SVG bytes. Nothing here fits or tests anything.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from agent.figures.common import PlotFormat, PlotStyle, label_axes, pyplot
from core.anomaly import point_text
from core.errors import InvalidInputError
from core.table import ScoreHistograms

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARKS = {"failed": "F", "fallback": "S", "skipped": "·"}
"""Letters drawn on the significance map: no background passed, symbolic fallback, skipped."""


def encode(figure: Figure, fmt: PlotFormat) -> bytes:
    """The figure as PNG (100 dpi) or SVG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def loss_curves(
    train: Sequence[float], validation: Sequence[float], best_epoch: int, style: PlotStyle
) -> Figure:
    """Training and validation loss (MSE) per epoch from the model card, best epoch marked."""
    plt = pyplot(style)
    figure, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(train) + 1)
    ax.plot(epochs, train, label="training")
    if validation:
        ax.plot(np.arange(1, len(validation) + 1), validation, label="validation")
    ax.axvline(best_epoch + 1, color="grey", linestyle="--", label=f"best epoch {best_epoch + 1}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE)")
    ax.set_yscale("log")
    ax.legend(fontsize=10)
    label_axes(ax, style, "autoencoder")
    return cast("Figure", figure)


def score_distributions(
    histograms: ScoreHistograms,
    cuts: Mapping[float, Mapping[str, float | None]],
    style: PlotStyle,
) -> Figure:
    """Anomaly-score histogram per stream; a vertical line per AR point at its lowest score."""
    plt = pyplot(style)
    streams = list(histograms.counts)
    columns = 4
    rows = (len(streams) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(13, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stream in zip(axes.flat, streams, strict=False):
        counts = histograms.counts[stream]
        ax.stairs(counts, histograms.edges, color="black")
        for k, (point, per_stream) in enumerate(sorted(cuts.items())):
            cut = per_stream.get(stream)
            if cut is not None:
                ax.axvline(cut, color=colours[k % len(colours)], label=f"{point_text(point)} pb")
        ax.set_yscale("log")
        if histograms.edges[0] > 0:
            ax.set_xscale("log")
        ax.set_title(f"{stream} ({int(counts.sum())} events)", fontsize=10)
        ax.set_xlabel("anomaly score", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(streams) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower right", fontsize=9, title="AR point cut")
    figure.tight_layout()
    return cast("Figure", figure)


def significance_map(
    local_z: npt.NDArray[np.float64],
    marks: Sequence[Sequence[str]],
    points_pb: Sequence[float],
    spectra: Sequence[str],
    style: PlotStyle,
) -> Figure:
    """AR points x spectra, colour = local Z (NaN cells blank), with the letters of `MARKS`."""
    plt = pyplot(style)
    figure, ax = plt.subplots(figsize=(16, 1.2 + 0.45 * len(points_pb)))
    masked = np.ma.masked_invalid(local_z)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    for i, row in enumerate(marks):
        for j, mark in enumerate(row):
            if mark:
                ax.text(j, i, mark, ha="center", va="center", fontsize=8, color="tab:red")
    ax.set_yticks(range(len(points_pb)), [f"{p:.3g} pb" for p in points_pb], fontsize=8)
    ax.set_xticks(range(len(spectra)), list(spectra), rotation=90, fontsize=6)
    ax.minorticks_off()
    ax.set_xlabel("")
    bar = figure.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("local Z")
    ax.set_title("F: no background passed the checks; S: symbolic fallback; ·: skipped", fontsize=9)
    return cast("Figure", figure)


def spectrum_plot(
    edges: npt.NDArray[np.float64],
    counts: npt.NDArray[np.float64],
    background: npt.NDArray[np.float64] | None,
    bins: tuple[int, int] | None,
    window: tuple[float, float] | None,
    masked: tuple[float, float] | None,
    title: str,
    style: PlotStyle,
    *,
    background_error: npt.NDArray[np.float64] | None = None,
) -> Figure:
    """Data with the chosen background, the BumpHunter window, and (data - B)/sqrt(B) below.

    `background_error` (1-sigma per bin, the fit covariance propagated,
    `core.fit.expected_errors`) is drawn as a shaded band B +- sigma around the background
    and as +- sigma / sqrt(B) around zero in the lower panel.
    """
    plt = pyplot(style)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05}
    )
    centres = 0.5 * (edges[:-1] + edges[1:])
    shown = counts > 0
    top.errorbar(
        centres[shown],
        counts[shown],
        yerr=np.sqrt(counts[shown]),
        fmt="o",
        markersize=3,
        color="black",
        label="data",
    )
    if background is not None and bins is not None:
        _draw_background(top, bottom, edges, counts, background, bins, background_error)
    _draw_windows(top, bottom, window, masked)
    top.set_yscale("log")
    top.set_ylabel("events / bin")
    top.legend(fontsize=9)
    label_axes(top, style, title)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("(n - B) / sqrt(B)", fontsize=10)
    bottom.set_xlabel("invariant mass [GeV]")
    nonzero = np.nonzero(counts)[0]
    if nonzero.size:
        low = edges[max(0, nonzero[0] - 1)]
        high = edges[min(edges.size - 1, nonzero[-1] + 2)]
        bottom.set_xlim(low, high)
        bottom.set_xscale("log")
    return cast("Figure", figure)


def _draw_background(
    top: Any,
    bottom: Any,
    edges: npt.NDArray[np.float64],
    counts: npt.NDArray[np.float64],
    background: npt.NDArray[np.float64],
    bins: tuple[int, int],
    background_error: npt.NDArray[np.float64] | None,
) -> None:
    """The background over its fit range (with its band) on top, (n - B)/sqrt(B) below."""
    first, stop = bins
    fit_edges = edges[first : stop + 1]
    top.stairs(background, fit_edges, baseline=None, color="tab:blue", label="chosen background")
    if background_error is not None:
        if background_error.shape != background.shape or not np.all(np.isfinite(background_error)):
            raise InvalidInputError(
                f"background_error has shape {background_error.shape} (background "
                f"{background.shape}) or non-finite values; it must be one finite error "
                "per background bin"
            )
        top.stairs(
            background + background_error,
            fit_edges,
            baseline=np.clip(background - background_error, 0.0, None),
            fill=True,
            color="tab:blue",
            alpha=0.3,
            linewidth=0,
            label="fit uncertainty (1 sigma)",
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        pull = np.where(
            background > 0, (counts[first:stop] - background) / np.sqrt(background), 0.0
        )
    bottom.stairs(pull, fit_edges, fill=True, color="tab:blue", alpha=0.6)
    if background_error is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(background > 0, background_error / np.sqrt(background), 0.0)
        bottom.stairs(relative, fit_edges, baseline=-relative, fill=True, color="grey", alpha=0.4)


def _draw_windows(
    top: Any,
    bottom: Any,
    window: tuple[float, float] | None,
    masked: tuple[float, float] | None,
) -> None:
    """The BumpHunter window (shaded) and the window masked in the refit (hatched), legended."""
    for ax in (top, bottom):
        if window is not None:
            ax.axvspan(*window, color="tab:orange", alpha=0.25)
        if masked is not None:
            ax.axvspan(*masked, facecolor="none", edgecolor="grey", hatch="//", linewidth=0)
    if window is not None:
        top.plot([], [], color="tab:orange", alpha=0.4, linewidth=6, label="BumpHunter window")
    if masked is not None:
        top.plot([], [], color="grey", linewidth=1, linestyle=":", label="masked in the refit")


def limit_curves_plot(
    curves: Sequence[Mapping[str, Any]], point_pb: float, style: PlotStyle
) -> Figure:
    """95 % CL limits (pb) against mass at one AR point: one panel per spectrum.

    Each panel overlays the widths: the observed limit (solid), the expected median
    (dashed) and its +-1 sigma and +-2 sigma bands (shaded, darker for +-1 sigma), one
    colour per width; open circles mark the observed limits that are the exact CLs of their
    window count (under 5 background events). `curves` are `set_limits` output curves of
    this point.
    """
    if not curves:
        raise InvalidInputError(f"no limit curve to draw at the AR point {point_text(point_pb)} pb")
    plt = pyplot(style)
    spectra = sorted({str(c["spectrum"]) for c in curves})
    widths = sorted({float(c["width"]) for c in curves})
    columns = min(4, len(spectra))
    rows = (len(spectra) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    for ax, spectrum in zip(axes.flat, spectra, strict=False):
        for curve in curves:
            if curve["spectrum"] != spectrum:
                continue
            colour = colours[widths.index(float(curve["width"])) % len(colours)]
            masses = np.asarray(curve["masses_gev"], dtype=float)
            band = {k: np.asarray(v, dtype=float) for k, v in curve["expected_pb"].items()}
            width = float(curve["width"])
            label = "resolution" if width == 0 else f"{100 * width:g} %"
            ax.fill_between(masses, band["-2"], band["+2"], color=colour, alpha=0.12, linewidth=0)
            ax.fill_between(masses, band["-1"], band["+1"], color=colour, alpha=0.25, linewidth=0)
            ax.plot(masses, band["0"], color=colour, linestyle="--", linewidth=1)
            if curve["observed_pb"] is None:  # a blinded run: the expected limits alone
                ax.plot([], [], color=colour, linestyle="--", label=label)
                continue
            ax.plot(masses, curve["observed_pb"], color=colour, linewidth=1.5, label=label)
            counted = np.asarray(curve.get("counting", [False] * masses.size), dtype=bool)
            if counted.any():  # the exact CLs of a window count: marked, the method changes
                observed = np.asarray(curve["observed_pb"], dtype=float)
                ax.plot(masses[counted], observed[counted], "o", color=colour, ms=2.5, mfc="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()  # a log axis over decades: minor ticks cost seconds to lay out
        ax.set_title(spectrum, fontsize=10)
        ax.set_xlabel("signal mass [GeV]", fontsize=9)
        ax.set_ylabel("95 % CL sigma x A x eff [pb]", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(spectra) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[0].legend(
        handles,
        labels,
        fontsize=8,
        title="width (solid: observed, dashed: expected;\no: exact CLs of the window count)",
        title_fontsize=7,
    )
    figure.suptitle(f"AR point {point_text(point_pb)} pb: Gaussian-signal limits, CLs", fontsize=11)
    # room for the title above the panels' own titles (one row leaves the least)
    figure.subplots_adjust(hspace=0.45, wspace=0.3, top=0.84 if rows == 1 else 0.92)
    return cast("Figure", figure)
