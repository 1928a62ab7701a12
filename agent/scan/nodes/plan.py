"""The `plan` node: the AR points of the initial sweep, proposed by the policy, gated.

The gate (`agent.policy.gates.points_gate`) keeps the points inside the configured cross
section range and the point budget; when it refuses part of another policy's proposal,
the rules' grid is scanned instead, so a bad proposal never shrinks the sweep.
"""

from __future__ import annotations

from typing import Any

from agent.policy.gates import points_gate
from agent.scan.context import ScanContext
from agent.scan.nodes.common import record_decision
from agent.scan.state import ScanState

__all__ = ["plan_node"]


def plan_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """The AR points (pb) to scan first: the policy's proposal as the gate accepts it."""
    config = ctx.config
    proposal = ctx.policy.initial_points(config.xsec_range, config.points_per_decade)
    accepted, refused = points_gate(proposal, [], config.xsec_range, config.point_budget())
    if refused and ctx.policy is not ctx.rules:
        rules = ctx.rules.initial_points(config.xsec_range, config.points_per_decade)
        accepted, _ = points_gate(rules, [], config.xsec_range, config.point_budget())
    record_decision(
        ctx,
        step_id,
        "ar_points",
        chosen=accepted,
        options={"xsec_range_pb": list(config.xsec_range), "budget": config.point_budget()},
        rationale=proposal.rationale,
        gate="passed" if not refused else "refused: " + "; ".join(refused),
    )
    return {"stage": "planned", "pending_pb": accepted, "points": [], "current": None}
