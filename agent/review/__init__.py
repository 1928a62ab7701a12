"""What a reviewer reads: the report, the --why story, replay, the HEPData export."""

from agent.review.hepdata import HepdataOutcome, export_hepdata, garwood_errors
from agent.review.markup import Figures, PlotPlacement
from agent.review.pages import spectrum_page, tool_calls_page
from agent.review.reinterp_sections import reinterpretation_contents, reinterpretation_section
from agent.review.replay import ReplayReport, replay
from agent.review.report import (
    ReportOutcome,
    drawn_pages,
    map_order,
    write_report,
    write_spectrum_page,
)
from agent.review.run import RunRecord, flagged_excesses, load_run, spectrum_slug
from agent.review.why import check_spectrum, number_text, spectrum_story, why_text

__all__ = [
    "Figures",
    "HepdataOutcome",
    "PlotPlacement",
    "ReplayReport",
    "ReportOutcome",
    "RunRecord",
    "check_spectrum",
    "drawn_pages",
    "export_hepdata",
    "flagged_excesses",
    "garwood_errors",
    "load_run",
    "map_order",
    "number_text",
    "reinterpretation_contents",
    "reinterpretation_section",
    "replay",
    "spectrum_page",
    "spectrum_slug",
    "spectrum_story",
    "tool_calls_page",
    "why_text",
    "write_report",
    "write_spectrum_page",
]
