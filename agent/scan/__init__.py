"""The scan: configuration, the LangGraph graph and its nodes, the runner, results, limits."""

from agent.scan.config import (
    BUILTIN_EVENTS,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    Inputs,
    ScanConfig,
    read_config,
    resolve_inputs,
    write_config,
)
from agent.scan.context import (
    REPLAYABLE_TOOLS,
    CliStep,
    ScanContext,
    ToolResult,
    cli_step,
    folder_sha256,
    locate_path,
    relocate_paths,
    run_tool,
)
from agent.scan.graph import build_graph, recursion_limit
from agent.scan.limits import (
    LimitsOutcome,
    accepted_spectra,
    low_count_text,
    parse_widths,
    run_limits,
    set_run_limits,
)
from agent.scan.nodes import scan_checks, scan_fallback_settings, spectrum_seed
from agent.scan.progress import Progress
from agent.scan.results import RESULT_COLUMNS, collect_results, distinct_excesses, write_results
from agent.scan.runner import ScanOutcome, make_policy, run_scan, storage_fault
from agent.scan.state import PointRecord, ScanState

__all__ = [
    "BUILTIN_EVENTS",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "REPLAYABLE_TOOLS",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "RESULT_COLUMNS",
    "CliStep",
    "Inputs",
    "LimitsOutcome",
    "PointRecord",
    "Progress",
    "ScanConfig",
    "ScanContext",
    "ScanOutcome",
    "ScanState",
    "ToolResult",
    "accepted_spectra",
    "build_graph",
    "cli_step",
    "collect_results",
    "distinct_excesses",
    "folder_sha256",
    "locate_path",
    "low_count_text",
    "make_policy",
    "parse_widths",
    "read_config",
    "recursion_limit",
    "relocate_paths",
    "resolve_inputs",
    "run_limits",
    "run_scan",
    "run_tool",
    "scan_checks",
    "scan_fallback_settings",
    "set_run_limits",
    "spectrum_seed",
    "storage_fault",
    "write_config",
    "write_results",
]
