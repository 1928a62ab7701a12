"""The scan graph's shape: the nodes and edges of DESIGN.md, a loop per AR point, and a
recursion limit that covers the point budget."""

from __future__ import annotations

from pathlib import Path

from agent.audit import AuditLog
from agent.executor import FanOut
from agent.graph import build_graph, recursion_limit
from agent.scan import ScanConfig, ScanContext


def test_graph_nodes_edges_and_recursion_limit(tmp_path: Path) -> None:
    config = ScanConfig(run_dir=str(tmp_path))
    audit = AuditLog(tmp_path / "audit.sqlite")
    with FanOut("serial") as fan_out:
        graph = build_graph(ScanContext(config, audit, fan_out)).compile().get_graph()
    audit.close()
    nodes = set(graph.nodes) - {"__start__", "__end__"}
    assert nodes == {
        "prepare",
        "plan",
        "build_spectra",
        "choose_backgrounds",
        "hunt_bumps",
        "assess",
        "look_elsewhere",
        "summarise",
    }
    edges = {(edge.source, edge.target) for edge in graph.edges}
    assert ("assess", "build_spectra") in edges  # the loop over AR points
    assert ("assess", "look_elsewhere") in edges
    assert ("hunt_bumps", "assess") in edges
    assert config.grid_size() == 21
    assert config.point_budget() == 27
    # 4 supersteps per point and the fixed nodes must fit in the limit
    assert recursion_limit(config.point_budget()) >= 4 * 27 + 4
