"""`anomscan replay RUN`: re-run every logged tool call from its logged input and compare.

Pure tools (agent/scan/runner.py REPLAYABLE_TOOLS) are re-executed; their output's SHA-256 must
equal the logged one. Files a call reads by path (the look-elsewhere NPZs) are checked
against their `artifacts` hash first. Tools that write files (sample generation, training)
are listed as not replayed, with the reason.

A run folder may be moved or copied: a path in a logged input that is relative is read
from the run folder (the scan logs run-folder files so), and an absolute one that lay
inside the folder where the scan ran (config.json's `run_dir`, runs before the relative
paths) is read from the same place in the folder given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runtime.audit import AUDIT_FILE, canonical_json, open_readonly, sha256_text
from agent.scan import REPLAYABLE_TOOLS, relocate_paths, run_tool
from core.errors import InvalidInputError
from core.files import file_sha256


@dataclass(frozen=True)
class ReplayReport:
    """How many calls were replayed, which were not (and why), and every difference."""

    n_replayed: int
    not_replayed: dict[str, int]
    differences: tuple[str, ...]


def _paths(value: Any) -> list[str]:
    """Every `path` (or `..._path`) field in a tool input."""
    if isinstance(value, dict):
        found = [
            str(item)
            for key, item in value.items()
            if (key == "path" or key.endswith("_path")) and isinstance(item, str)
        ]
        for item in value.values():
            found.extend(_paths(item))
        return found
    if isinstance(value, list):
        return [path for item in value for path in _paths(item)]
    return []


def _original_run_dir(run_dir: Path) -> Path | None:
    """Where the scan ran (config.json's run_dir), or None without a config."""
    config = run_dir / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("run_dir")
    return None if value is None else Path(str(value))


def _first_difference(logged: Any, now: Any, where: str = "") -> str:
    """Where two JSON values first differ (a field path and both values)."""
    if isinstance(logged, dict) and isinstance(now, dict):
        for key in sorted(set(logged) | set(now)):
            if logged.get(key) != now.get(key):
                return _first_difference(logged.get(key), now.get(key), f"{where}.{key}")
    if isinstance(logged, list) and isinstance(now, list) and len(logged) == len(now):
        for i, (a, b) in enumerate(zip(logged, now, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where or 'output'}: logged {str(logged)[:80]}, now {str(now)[:80]}"


def _stale_inputs(
    payload: Any, run_dir: Path, artifacts: dict[str, str], checked: dict[str, bool]
) -> list[str]:
    """The files a call reads whose hash is not the logged artifact's (or that are missing).

    `checked` remembers each file's verdict across calls (a file is hashed once).
    """
    stale = []
    for path in _paths(payload):
        resolved = Path(path).resolve()
        relative = (
            str(resolved.relative_to(run_dir.resolve()))
            if resolved.is_relative_to(run_dir.resolve())
            else str(resolved)
        )
        if relative not in checked:
            expected = artifacts.get(relative)
            checked[relative] = (
                expected is not None and Path(path).is_file() and file_sha256(path) == expected
            )
        if not checked[relative]:
            stale.append(relative)
    return stale


def replay(
    run_dir: Path,
    *,
    tools: set[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Re-run the logged calls of the scan in `run_dir` (optionally only some tools).

    `tools` naming a tool the run never called is refused with the tools it did call;
    `progress(done, total)` is called as each selected call is taken up, and at the end.
    """
    db = open_readonly(run_dir / AUDIT_FILE)
    try:
        calls = list(db.query("select * from tool_calls order by seq"))
        artifacts = {
            str(row["path"]): str(row["sha256"]) for row in db.query("select * from artifacts")
        }
    finally:
        db.close()
    logged = sorted({str(call["tool"]) for call in calls})
    if tools is not None and not tools <= set(logged):
        raise InvalidInputError(
            f"--tool {', '.join(sorted(tools - set(logged)))}: the run logged no such call; "
            f"it called {', '.join(logged) or 'no tool'}"
        )
    not_replayed: dict[str, int] = {}
    selected = []
    for call in calls:
        name = str(call["tool"])
        if not call["replayable"] or name not in REPLAYABLE_TOOLS:
            not_replayed[name] = not_replayed.get(name, 0) + 1
        elif tools is None or name in tools:
            selected.append(call)
    differences: list[str] = []
    n_replayed = 0
    checked: dict[str, bool] = {}
    original = _original_run_dir(run_dir)
    for done, call in enumerate(selected, start=1):
        if progress is not None:
            progress(done - 1, len(selected))
        name = str(call["tool"])
        payload = relocate_paths(json.loads(call["input"]), run_dir, original)
        where = f"tool_calls seq {call['seq']} ({call['key']})"
        stale = _stale_inputs(payload, run_dir, artifacts, checked)
        if stale:
            differences.append(f"{where}: input file(s) {stale} changed or missing since the scan")
            continue
        outcome = run_tool((name, payload))
        value = outcome["output"] if outcome["error"] is None else {"error": outcome["error"]}
        n_replayed += 1
        if sha256_text(canonical_json(value)) == call["output_sha256"]:
            continue
        if call["output"] is not None:
            logged = json.loads(call["output"])
        else:
            logged = json.loads((run_dir / str(call["output_path"])).read_text())
        differences.append(f"{where}: {_first_difference(logged, value)}")
    if progress is not None:
        progress(len(selected), len(selected))
    return ReplayReport(n_replayed, not_replayed, tuple(differences))
