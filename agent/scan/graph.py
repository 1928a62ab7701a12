"""The scan as a LangGraph StateGraph: nodes call tools through the executor, edges ask the policy.

prepare -> plan -> [build_spectra -> choose_backgrounds -> hunt_bumps -> assess]* ->
look_elsewhere -> summarise (-> limits). `assess` loops back while AR points are pending
(the planned grid, then the policy's refinements) and goes on when the policy stops or a
budget is spent. The nodes are in agent/scan/nodes/, one module each.

Every node runs inside one audit transaction keyed by its step id (`NNNN-node`, from the
state's step counter), so a node killed half-way leaves nothing in the log and its re-run
after `--resume` writes each row exactly once. Arrays never enter the state: they go to
NPZ files in the run folder, the state keeps paths and SHA-256.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from langgraph.graph import END, START, StateGraph

from agent.scan.context import ScanContext
from agent.scan.nodes import (
    NodeBody,
    assess_node,
    build_spectra_node,
    choose_backgrounds_node,
    hunt_bumps_node,
    limits_node,
    look_elsewhere_node,
    plan_node,
    prepare_node,
    summarise_node,
)
from agent.scan.state import ScanState
from agent.stop import raise_if_stopped

__all__ = ["build_graph", "recursion_limit"]

NODES: dict[str, NodeBody] = {
    "prepare": prepare_node,
    "plan": plan_node,
    "build_spectra": build_spectra_node,
    "choose_backgrounds": choose_backgrounds_node,
    "hunt_bumps": hunt_bumps_node,
    "assess": assess_node,
    "look_elsewhere": look_elsewhere_node,
    "summarise": summarise_node,
}


def build_graph(ctx: ScanContext) -> StateGraph[ScanState]:
    """The scan's StateGraph (not compiled)."""
    graph: StateGraph[ScanState] = StateGraph(ScanState)
    nodes = NODES | ({"limits": limits_node} if ctx.config.limits else {})
    for name, body in nodes.items():
        graph.add_node(name, _audited_step(ctx, name, body))  # type: ignore[call-overload]
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "plan")
    graph.add_edge("plan", "build_spectra")
    graph.add_edge("build_spectra", "choose_backgrounds")
    graph.add_edge("choose_backgrounds", "hunt_bumps")
    graph.add_edge("hunt_bumps", "assess")
    graph.add_conditional_edges("assess", _after_assess, ["build_spectra", "look_elsewhere"])
    graph.add_edge("look_elsewhere", "summarise")
    if ctx.config.limits:
        graph.add_edge("summarise", "limits")
        graph.add_edge("limits", END)
    else:
        graph.add_edge("summarise", END)
    return graph


def recursion_limit(point_budget: int) -> int:
    """Supersteps the scan may take: 4 per AR point plus the fixed nodes, with margin."""
    return 4 * point_budget + 20


def _after_assess(state: ScanState) -> str:
    return "build_spectra" if state.get("pending_pb") else "look_elsewhere"


def _audited_step(
    ctx: ScanContext, name: str, body: NodeBody
) -> Callable[[ScanState], dict[str, Any]]:
    """Wrap a node body: one audit transaction, a `steps` row, the step counter advanced."""

    def run(state: ScanState) -> dict[str, Any]:
        raise_if_stopped()  # a Ctrl-C a library swallowed stops the scan here
        step = int(state.get("step", 0))
        step_id = f"{step:04d}-{name}"
        ctx.step_id = step_id
        ctx.progress.update(stage=name)
        started = time.time()
        with ctx.audit.transaction():
            update = body(ctx, state, step_id)
            ended = time.time()
            current = update.get("current", state.get("current"))
            ctx.audit.add(
                "steps",
                step_id,
                step_id=step_id,
                node=name,
                point_pb=None if not current else current.get("point_pb"),
                started_at=round(started, 3),
                ended_at=round(ended, 3),
                seconds=round(ended - started, 3),
                summary=update.get("stage", name),
            )
        return {**update, "step": step + 1}

    return run
