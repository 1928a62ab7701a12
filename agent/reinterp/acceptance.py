"""`anomscan acceptance RUN FILES...`: a signal sample through a finished scan's cuts.

The `signal_acceptance` tool (tools/reinterp.py; definitions in core/reinterp.py) runs the
sample through the run's selection, RMM and autoencoder and writes RUN/acceptance/NAME.json
and .csv; here the call is made inside a step of the run's audit log (a `steps` row, the
tool call, the `artifacts`, the acceptance map and a `decisions` row), so that
`anomscan audit verify` still passes. Nothing the scan wrote is changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.figures.reinterp import acceptance_map
from agent.reinterp.calls import call_logged
from agent.scan import cli_step
from core.anomaly import point_text
from core.files import write_bytes
from tools.reinterp import read_run


def run_acceptance(
    run_dir: Path,
    files: Sequence[str],
    *,
    schema: str = "auto",
    name: str = "",
    tree: str | None = None,
    mapping: str | None = None,
) -> dict[str, Any]:
    """`anomscan acceptance RUN FILES...`: the `signal_acceptance` tool, audited in the run."""
    run = read_run(run_dir)
    payload: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "inputs": [str(f) for f in files],
        "schema": schema,
        "name": name,
    }
    if tree is not None:
        payload["tree"] = tree
    if mapping is not None:
        payload["mapping"] = mapping
    with cli_step(run.run_dir, "acceptance") as step:
        ctx, step_id = step.ctx, step.step_id
        output = call_logged(ctx, step_id, name or "sample", "signal_acceptance", payload)
        for key in ("json_path", "csv_path"):
            ctx.artifact(Path(output[key]), "acceptance")
        plot = Path(output["json_path"]).with_name(f"{output['name']}-map.png")
        write_bytes(plot, acceptance_map(output), what="acceptance map")
        ctx.artifact(plot, "acceptance plot")
        best = max(output["streams"], key=lambda row: row["acceptance"])
        ctx.audit.add(
            "decisions",
            f"{step_id}:acceptance:{output['name']}",
            step_id=step_id,
            kind="acceptance",
            chosen={"name": output["name"], "n_events": output["n_events"]},
            options={"inputs": output["inputs"], "points_pb": output["points_pb"]},
            policy="rules",
            rationale=(
                f"{output['n_events']} signal events through the run's selection, RMM and "
                f"autoencoder (model {output['model_sha256'][:12]}); largest acceptance "
                f"{best['acceptance']:.3g} in {best['stream']} at {point_text(best['point_pb'])} pb"
            ),
            numbers={
                f"{row['stream']}@{row['point_pb']:g}": row["acceptance"]
                for row in output["streams"]
            },
        )
        step.summary = f"acceptance of {output['name']}"
    return output
