"""Every matplotlib figure of the product (spectra, maps, limits, reinterpretation)."""

from agent.figures.common import PlotFormat, PlotStyle, label_axes, pyplot
from agent.figures.plots import (
    MARKS,
    encode,
    limit_curves_plot,
    loss_curves,
    score_distributions,
    significance_map,
    spectrum_plot,
)
from agent.figures.reinterp import (
    acceptance_map,
    acceptance_map_figure,
    linearity_figure,
    linearity_plot,
)

__all__ = [
    "MARKS",
    "PlotFormat",
    "PlotStyle",
    "acceptance_map",
    "acceptance_map_figure",
    "encode",
    "label_axes",
    "limit_curves_plot",
    "linearity_figure",
    "linearity_plot",
    "loss_curves",
    "pyplot",
    "score_distributions",
    "significance_map",
    "spectrum_plot",
]
