"""The scan graph's shape: the nodes and edges of DESIGN.md, a loop per AR point, and a
recursion limit that covers the point budget."""

from __future__ import annotations

from pathlib import Path

from agent.runtime.audit import AuditLog
from agent.runtime.executor import FanOut
from agent.scan import ScanConfig, ScanContext, build_graph, recursion_limit


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


def _assess_after(tmp_path: Path, step_seconds: list[float], stopped_s: float) -> dict[str, object]:
    """Run the assess node once: steps that took `step_seconds`, a start `stopped_s` + their
    sum ago (the scan was stopped in between), a 1-minute budget and one pending point."""
    import time

    from agent.scan.nodes import assess_node

    tmp_path.mkdir()
    config = ScanConfig(run_dir=str(tmp_path), budget_minutes=1.0)
    audit = AuditLog(tmp_path / "audit.sqlite")
    now = time.time()
    for k, seconds in enumerate(step_seconds):
        audit.add("steps", f"{k:04d}-x", step_id=f"{k:04d}-x", node="x", seconds=seconds)
    state = {
        "started_at": now - stopped_s - sum(step_seconds),
        "pending_pb": [1.0],
        "points": [],
    }
    with FanOut("serial") as fan_out, audit.transaction():
        update = assess_node(ScanContext(config, audit, fan_out), state, "0009-assess")  # type: ignore[arg-type]
    audit.close()
    return update


def test_time_budget_counts_running_time_not_time_stopped_before_a_resume(
    tmp_path: Path,
) -> None:
    """40 s of nodes and an hour stopped: within a 1-minute budget. 70 s of nodes: spent."""
    kept = _assess_after(tmp_path / "a", [10.0, 30.0], stopped_s=3600.0)
    assert kept.get("stop_reason") is None, kept
    assert kept["stage"] == "1 point(s) pending"
    spent = _assess_after(tmp_path / "b", [40.0, 30.0], stopped_s=0.0)
    assert spent["stop_reason"] == "time budget"


def test_a_whole_stream_result_repeated_at_tighter_points_is_listed_once(tmp_path: Path) -> None:
    """T2/jm is its whole stream at 100, 31.6 and 10 pb (same events, same fit, same bump)
    and an AR at 1 pb: two rows, the loosest whole-stream point standing for the others."""
    import json

    from agent.scan import collect_results

    def bump(local_z: float, data: float) -> dict[str, object]:
        return {
            "spectrum": "T2/jm",
            "status": "excess",
            "window_gev": [492.0, 512.0],
            "data": data,
            "background": 8.0,
            "local_p": 1e-6,
            "local_z": local_z,
            "global_z": 3.0,
            "global_z_is_lower_limit": False,
            "function": "p3",
            "fit_p_value": 0.5,
            "checks_passed": True,
            "masked_window_gev": None,
        }

    points = []
    for index, (point, whole, z, data) in enumerate(
        [(100.0, True, 5.0, 26.0), (31.6, True, 5.0, 26.0), (10.0, True, 5.0, 26.0),
         (1.0, False, 6.8, 23.0)]
    ):  # fmt: skip
        path = tmp_path / f"point-{index}.json"
        path.write_text(json.dumps({"spectra": [bump(z, data)]}))
        points.append(
            {
                "point_pb": point,
                "results_file": str(path),
                "outcomes": {"T2/jm": {"status": "excess", "whole_stream": whole}},
            }
        )
    state = {"run_id": "r", "lumi_pb": 1000.0, "points": points, "lee": None}
    results = collect_results(state, Path)  # type: ignore[arg-type]
    assert results["points_pb"] == [100.0, 31.6, 10.0, 1.0]
    rows = [(e["xsec_pb"], e["whole_stream"], e["repeated_at_pb"]) for e in results["excesses"]]
    assert rows == [(1.0, False, []), (100.0, True, [31.6, 10.0])]


def test_an_excess_whose_background_failed_its_checks_is_never_ranked(tmp_path: Path) -> None:
    """results.json carries each excess's recorded checks; one with checks_passed false (or
    not recorded) is listed as skipped with the reason, never as an excess."""
    import json

    from agent.scan import collect_results

    row = {
        "spectrum": "T3/jm",
        "status": "excess",
        "window_gev": [1450.0, 1560.0],
        "data": 60.0,
        "background": 3.0,
        "local_p": 1e-20,
        "local_z": 9.0,
        "global_z": 8.0,
        "global_z_is_lower_limit": True,
        "function": "p2",
        "fit_p_value": 5.8e-20,
        "masked_window_gev": None,
    }
    path = tmp_path / "point-0.json"
    path.write_text(
        json.dumps(
            {
                "spectra": [
                    row | {"checks_passed": False},
                    row | {"spectrum": "T4/jm"},
                    row | {"spectrum": "T2/jm", "checks_passed": True, "fit_p_value": 0.4},
                ]
            }
        )
    )
    point = {"point_pb": 1.0, "results_file": str(path), "outcomes": {}}
    state = {"run_id": "r", "lumi_pb": 1000.0, "points": [point], "lee": None}
    results = collect_results(state, Path)  # type: ignore[arg-type]
    assert [(e["spectrum"], e["checks_passed"]) for e in results["excesses"]] == [("T2/jm", True)]
    assert {s["spectrum"] for s in results["skipped"]} == {"T3/jm", "T4/jm"}
    assert all("did not pass its checks" in s["reason"] for s in results["skipped"])


def test_distinct_excesses_merge_overlapping_windows_of_a_spectrum() -> None:
    """The terminal's table: one row per spectrum and window, at its best point, with every
    point where it appears (issue: the demo's top six rows were one T3/jm window)."""
    from agent.scan import distinct_excesses

    def excess(spectrum: str, point: float, window: list[float], z: float) -> dict[str, object]:
        return {"spectrum": spectrum, "xsec_pb": point, "window_gev": window, "local_z": z}

    rows = distinct_excesses(
        [
            excess("T3/jm", 5.6, [1484, 1524], 13.7) | {"repeated_at_pb": [10.0, 100.0]},
            excess("T3/jm", 4.2, [1465, 1524], 13.6),
            excess("T4/bg", 1.2, [876, 934], 13.4),
            excess("T3/jm", 0.3, [600, 640], 3.0),  # another window of the same spectrum
            excess("T4/bg", 3.2, [934, 990], 3.0),  # touching, not overlapping
        ]
    )
    assert [(r["spectrum"], r["xsec_pb"], r["points_pb"]) for r in rows] == [
        ("T3/jm", 5.6, [4.2, 5.6, 10.0, 100.0]),
        ("T4/bg", 1.2, [1.2]),
        ("T3/jm", 0.3, [0.3]),
        ("T4/bg", 3.2, [3.2]),
    ]
