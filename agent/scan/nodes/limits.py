"""The `limits` node (scans run with --limits): 95 % CL limits as the scan's last step.

The same step as `anomscan limits RUN` (`agent.scan.limits.set_run_limits`), inside the
node's audit transaction. A scan where no spectrum has an accepted background at any AR
point sets no limit: a `limits` decision says so and the scan still ends normally.
"""

from __future__ import annotations

from typing import Any

from agent.scan.context import ScanContext
from agent.scan.limits import accepted_spectra, set_run_limits
from agent.scan.nodes.common import record_decision
from agent.scan.state import ScanState
from core.errors import InvalidInputError

__all__ = ["limits_node"]


def limits_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """95 % CL limits on Gaussian signals of every accepted spectrum (agent.scan.limits)."""
    try:
        accepted_spectra(ctx.run_dir)
    except InvalidInputError as error:
        record_decision(ctx, step_id, "limits", chosen=None, policy="rules", rationale=str(error))
        return {"stage": "no limits: no accepted background"}
    outcome = set_run_limits(ctx, step_id, lumi_pb=float(state["lumi_pb"]))
    return {"stage": f"{outcome.n_limits} limits", "limits_file": str(outcome.json_path)}
