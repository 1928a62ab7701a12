"""`anomscan audit plan RUN [OTHER]`: the plan a scan committed to before it read the data.

The plan rows (`agent.scan.plan`) are read from the audit log alone: the first one is
the scan's plan, later ones were written before each resume and are compared with it.
With a second run folder the two first plans are compared: same data and same plan, same
data under another plan (the settings that differ are listed), or other data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.review.run import parse_json
from agent.runtime.audit import AUDIT_FILE, reading
from agent.scan.plan import PLAN_EVENT
from core.errors import InvalidInputError

__all__ = ["compare_plans", "plan_text", "read_plans"]


def read_plans(run_dir: Path) -> list[dict[str, Any]]:
    """The plan rows of a run (seq, plan, data), first one first.

    Raises InvalidInputError when the log has none (a scan from before plans were kept).
    """
    with reading(run_dir / AUDIT_FILE) as db:
        rows = list(
            db.query(
                "select seq, config, inputs from runs where event = ? order by seq", [PLAN_EVENT]
            )
        )

    if not rows:
        raise InvalidInputError(
            f"{run_dir / AUDIT_FILE} has no plan row: the scan was made before anomscan "
            "recorded plans; run it again to have one"
        )
    return [
        {"seq": row["seq"], "plan": parse_json(row["config"]), "data": parse_json(row["inputs"])}
        for row in rows
    ]


def _changes(first: dict[str, Any], later: dict[str, Any]) -> list[str]:
    """What differs between two plans: settings one by one, then the code and prompts."""
    before, after = first["settings"], later["settings"]
    changes = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    changes += [
        f"{key} differs" for key in ("code_sha256", "prompts_sha256") if first[key] != later[key]
    ]
    return changes


def plan_text(run_dir: Path) -> str:
    """The run's plan, its data, and whether each resume kept the plan."""
    first, *later = read_plans(run_dir)
    plan, data = first["plan"], first["data"]
    sizes = [f["bytes"] for f in data["files"] if f.get("bytes") is not None]
    lines = [
        f"plan of {run_dir} (audit seq {first['seq']}, before any data were read)",
        f"  plan sha256     {plan['plan_sha256']}",
        f"  code sha256     {plan['code_sha256']}",
        f"  prompts sha256  {json.dumps(plan['prompts_sha256'])}",
        f"  data sha256     {data['data_sha256']} ({len(data['files'])} inputs, "
        f"{sum(sizes) / 1e6:.1f} MB)",
        "  settings:",
        *(f"    {key} = {json.dumps(value)}" for key, value in plan["settings"].items()),
        "  inputs:",
        *(f"    {json.dumps(f)}" for f in data["files"]),
    ]
    for row in later:
        changes = _changes(plan, row["plan"])
        if row["data"]["data_sha256"] != data["data_sha256"]:
            changes.append("data differ")
        lines.append(
            f"resume (audit seq {row['seq']}): "
            + ("same plan and data" if not changes else "CHANGED: " + "; ".join(changes))
        )
    return "\n".join(lines)


def compare_plans(run_dir: Path, other: Path) -> str:
    """Whether two runs share their data and their plan (and what differs), in words."""
    mine, theirs = read_plans(run_dir)[0], read_plans(other)[0]
    same_data = mine["data"]["data_sha256"] == theirs["data"]["data_sha256"]
    changes = _changes(mine["plan"], theirs["plan"])
    head = f"{run_dir} and {other}: " + ("the same data" if same_data else "different data")
    if not changes:
        return head + ", the same plan"
    return head + ", different plans:\n" + "\n".join(f"  {change}" for change in changes)
