"""A registered tool run in this process and logged in the run's audit (its error too).

`anomscan acceptance` and `anomscan inject` call their tools here, not through the scan's
executor: one call each, in the driver, so that its row in `tool_calls` is written at once.
"""

from __future__ import annotations

import time
from typing import Any

from agent.scan import ScanContext
from core.errors import AnomscanError
from tools.registry import get_tool


def call_logged(
    ctx: ScanContext, step_id: str, label: str, tool: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """Run one registered tool in this process and log the call (its error too), re-raising."""
    start = time.perf_counter()
    outcome: dict[str, Any] = {"output": None, "error": None, "worker": "cli"}
    try:
        outcome["output"] = get_tool(tool).call(payload)
    except AnomscanError as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
        outcome["seconds"] = time.perf_counter() - start
        ctx.log_tool_call(step_id, label, tool, payload, outcome)
        raise
    outcome["seconds"] = time.perf_counter() - start
    ctx.log_tool_call(step_id, label, tool, payload, outcome)
    output: dict[str, Any] = outcome["output"]
    return output
