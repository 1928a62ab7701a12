"""Figures of the reinterpretation outputs: the acceptance map and the injection linearity.

Each draws the numbers of an acceptance or injection JSON (agent/reinterp/acceptance.py,
agent/reinterp/injection.py) in the house style (agent/figures/common.py) and returns the
figure or its encoded bytes; nothing here computes a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np

from agent.figures.common import PlotFormat, PlotStyle, label_axes, pyplot
from agent.figures.plots import encode
from core.anomaly import point_text
from core.masses import STREAMS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def acceptance_map(
    acceptance: dict[str, Any], *, style: PlotStyle = "Simulation", fmt: PlotFormat = "png"
) -> bytes:
    """The acceptance map, encoded."""
    return encode(acceptance_map_figure(acceptance, style=style), fmt)


def acceptance_map_figure(acceptance: dict[str, Any], *, style: PlotStyle = "Simulation") -> Figure:
    """Acceptance (fraction of the sample passing the AR, any pair) per stream x AR point."""
    plt = pyplot(style)
    points = list(acceptance["points_pb"])
    grid = np.full((len(STREAMS), len(points)), np.nan)
    for row in acceptance["streams"]:
        grid[STREAMS.index(row["stream"]), points.index(row["point_pb"])] = row["acceptance"]
    figure, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.9 * len(points)), 5.0))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    whole = {
        (STREAMS.index(r["stream"]), points.index(r["point_pb"]))
        for r in acceptance["streams"]
        if r["whole_stream"]
    }
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                text = f"{grid[i, j]:.3g}" + (" (whole)" if (i, j) in whole else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks(range(len(points)), [f"{p:g}" for p in points], rotation=45)
    ax.set_yticks(range(len(STREAMS)), list(STREAMS))
    ax.set_xlabel(r"AR point $\sigma_{AR}$ [pb]")
    ax.set_ylabel("stream")
    figure.colorbar(image, ax=ax, label="acceptance", format="%.3g")
    label_axes(ax, style, f"acceptance of {acceptance['name']}")
    return cast("Figure", figure)


def linearity_plot(
    injection: dict[str, Any], *, style: PlotStyle = "Simulation", fmt: PlotFormat = "png"
) -> bytes:
    """The injection linearity plot, encoded."""
    return encode(linearity_figure(injection, style=style), fmt)


def linearity_figure(injection: dict[str, Any], *, style: PlotStyle = "Simulation") -> Figure:
    """Fitted vs expected signal yield per injected cross-section, per spectrum and AR point.

    Markers are the toys' mean fitted yield against the expected one, with the toys' spread
    over sqrt(toys) (or the fit error for one toy): circles for the scan's rule run again,
    squares for the run's own function refitted, triangles over the run's own background
    prediction; the diagonal is perfect recovery.
    """
    plt = pyplot(style)
    figure, ax = plt.subplots(figsize=(6.4, 5.2))
    largest = 1.0
    kinds = (
        ("signal_yield", "rule", {"marker": "o", "ls": "-"}),
        ("run_function_yield", "run's function", {"marker": "s", "ls": ":", "mfc": "none"}),
        ("fixed_shape_yield", "run's background fixed", {"marker": "^", "ls": "--"}),
    )
    for key, label, line_style in kinds:
        spectra = sorted({(f["spectrum"], f["point_pb"]) for f in injection["fits"] if key in f})
        for name, point in spectra:
            x, y, dy = [], [], []
            for xsec in injection["request"]["xsec_pb"]:
                rows = [
                    f
                    for f in injection["fits"]
                    if (f["spectrum"], f["point_pb"], f["xsec_pb"]) == (name, point, xsec)
                    and key in f
                ]
                if not rows:
                    continue
                fitted = np.array([f[key] for f in rows], dtype=float)
                x.append(float(np.mean([f["expected_yield"] for f in rows])))
                y.append(float(fitted.mean()))
                dy.append(
                    float(fitted.std(ddof=1) / np.sqrt(len(rows)))
                    if len(rows) > 1
                    else float(rows[0][key + "_error"])
                )
            if not x or max(x) < 1.0:
                continue  # a spectrum the signal does not reach
            largest = max(largest, *x, *y)
            ax.errorbar(
                x, y, yerr=dy, label=f"{name} @ {point_text(point)} pb ({label})", **line_style
            )
    ax.plot(
        [0, largest * 1.1], [0, largest * 1.1], color="grey", ls="--", label="fitted = expected"
    )
    ax.set_xlabel(r"expected signal events in the spectrum ($\sigma \times A \times L$)")
    ax.set_ylabel("fitted Gaussian signal yield")
    ax.legend(fontsize=7, loc="upper left")
    request = injection["request"]
    label_axes(ax, style, f"X({request['mass']:g}) -> {request['pair']}, w = {request['width']:g}")
    return cast("Figure", figure)
