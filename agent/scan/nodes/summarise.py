"""The `summarise` node: RUN/results.json and RUN/results.csv, logged as artifacts.

A blinded scan seals the full results in RUN/sealed/ and writes the blinded ones
(`agent.scan.blinding`).

The results are collected from the state and the per-point files (`agent.scan.results`),
never from truth.json; the `summary` decision names the largest excess.
"""

from __future__ import annotations

from typing import Any

from agent.scan.blinding import SEALED_DIR, SEALED_KIND, blinded_results
from agent.scan.context import ScanContext
from agent.scan.nodes.common import record_decision
from agent.scan.results import collect_results, write_results
from agent.scan.state import ScanState

__all__ = ["summarise_node"]


def summarise_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Write the scan's results and the `summary` decision."""
    results = collect_results(state, ctx.at)
    shown = results
    if ctx.config.blind:
        # the full results sealed, their hashes in the chain; results.json blinded
        sealed = ctx.run_dir / SEALED_DIR
        sealed.mkdir(exist_ok=True)
        for path in write_results(sealed, results):
            ctx.artifact(path, SEALED_KIND)
        shown = blinded_results(results)
    json_path, csv_path = write_results(ctx.run_dir, shown)
    ctx.artifact(json_path, "results")
    ctx.artifact(csv_path, "results")
    top = results["excesses"][0] if results["excesses"] else None
    record_decision(
        ctx,
        step_id,
        "summary",
        chosen=None
        if top is None
        else {
            "spectrum": top["spectrum"],
            "xsec_pb": top["xsec_pb"],
            "local_z": top["local_z"],
        },
        policy="rules",
        rationale=(
            f"{len(results['points_pb'])} AR points, {len(results['excesses'])} excesses, "
            f"{len(results['skipped'])} skipped; scan-global Z {results['scan_global_z']}"
        ),
    )
    return {"stage": "done", "results_file": str(json_path)}
