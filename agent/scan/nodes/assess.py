"""The `assess` node: after each AR point, go on with the plan, refine, or stop.

While planned points are pending the sweep goes on. Once they are done the policy may
propose refinements (through the gate: inside the cross-section range, not scanned yet,
within the point budget); an empty proposal ends the sweep. The time budget counts the
seconds the scan's nodes ran (the `steps` rows), not the wall time since the start, so a
scan stopped and resumed later is not charged for the time it was stopped.
"""

from __future__ import annotations

from typing import Any

from agent.policy.gates import points_gate
from agent.policy.protocol import PointOutcome, PointsProposal, SpectrumOutcome
from agent.scan.context import ScanContext
from agent.scan.nodes.common import record_decision
from agent.scan.state import ScanState

__all__ = ["assess_node"]


def _running_minutes(ctx: ScanContext) -> float:
    """Minutes the scan's processes have spent in graph nodes: the sum of the `steps` rows.

    Not the wall time since the start: a scan stopped (killed, or failed on a full disk)
    and resumed later does not count the time it was stopped against --budget-minutes. The
    part of a killed node that ran before the kill is not counted either.
    """
    rows = ctx.audit.db.query("select coalesce(sum(seconds), 0) as total from steps")
    return float(next(iter(rows))["total"]) / 60.0


def assess_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Stop on the time budget, go on with pending points, or ask the policy to refine."""
    config = ctx.config
    pending = list(state["pending_pb"])
    scanned = [p["point_pb"] for p in state["points"]]
    elapsed_min = _running_minutes(ctx)
    if config.budget_minutes is not None and elapsed_min > config.budget_minutes:
        record_decision(
            ctx,
            step_id,
            "stop",
            chosen="stop",
            policy="gates",
            rationale=(
                f"time budget {config.budget_minutes:g} min spent ({elapsed_min:.1f} min); "
                f"{len(pending)} planned point(s) not scanned: {pending}"
            ),
        )
        return {"stage": "stopped: time budget", "pending_pb": [], "stop_reason": "time budget"}
    if pending:
        return {"stage": f"{len(pending)} point(s) pending"}
    remaining = config.point_budget() - len(scanned)
    outcomes = [
        PointOutcome(
            point_pb=p["point_pb"],
            spectra={n: SpectrumOutcome.model_validate(o) for n, o in p["outcomes"].items()},
        )
        for p in state["points"]
    ]
    proposal: PointsProposal = ctx.policy.next_points(outcomes, config.xsec_range, remaining)
    accepted, refused = points_gate(proposal, scanned, config.xsec_range, remaining)
    record_decision(
        ctx,
        step_id,
        "refine",
        chosen=accepted,
        options={"scanned_pb": scanned, "remaining": remaining},
        rationale=proposal.rationale,
        gate="passed" if not refused else "refused: " + "; ".join(refused),
    )
    rounds = int(state.get("refinement_rounds", 0))
    if not accepted:
        return {"stage": "sweep complete", "stop_reason": proposal.rationale}
    return {
        "stage": f"refining: {accepted}",
        "pending_pb": accepted,
        "refinement_rounds": rounds + 1,
    }
