"""The house style of every figure: neutral, ATLAS or CMS (mplhep), PNG or SVG.

The default style is neutral ("Simulation"): anomscan's own synthetic samples and a user's
open data carry no experiment's label; `--style ATLAS|CMS` adds one on request. matplotlib
and mplhep are imported inside the functions: they are heavy and only the figures need them.
"""

from __future__ import annotations

from typing import Any, Literal

PlotStyle = Literal["Simulation", "ATLAS", "CMS"]
PlotFormat = Literal["png", "svg"]


def pyplot(style: PlotStyle) -> Any:
    """matplotlib.pyplot on the Agg backend, in the mplhep style of `style` (SVG text as paths)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    plt.style.use(mplhep.style.CMS if style == "CMS" else mplhep.style.ATLAS)
    # fonts of the style may be absent offline: fall back silently to DejaVu (bundled)
    plt.rcParams["font.sans-serif"] = [*plt.rcParams["font.sans-serif"], "DejaVu Sans"]
    plt.rcParams["svg.fonttype"] = "path"
    return plt


def label_axes(ax: Any, style: PlotStyle, title: str) -> None:
    """The style's label in a corner of `ax` (neutral, ATLAS Internal, CMS Preliminary), a title."""
    import mplhep

    if style == "Simulation":
        ax.text(0.02, 0.98, "anomscan Simulation", transform=ax.transAxes, va="top", fontsize=12)
    else:
        module = mplhep.atlas if style == "ATLAS" else mplhep.cms
        module.text("Internal" if style == "ATLAS" else "Preliminary", ax=ax, loc=0, fontsize=12)
    ax.set_title(title, fontsize=11, loc="right")
