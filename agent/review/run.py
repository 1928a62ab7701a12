"""A finished scan's run folder as the review reads it: results, audit rows, point files.

Every number of the report and of the `--why` story comes from here, as the scan wrote it:
results.json, config.json, the audit log (decisions, tool_calls, fits, bumps, runs,
artifacts, llm_messages, annotations; JSON columns parsed) and each AR point's NPZ and JSON
files. Nothing is refitted or retested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime.audit import AUDIT_FILE, open_readonly
from core.errors import InvalidInputError

AUDIT_TABLES = (
    "runs",
    "steps",
    "decisions",
    "tool_calls",
    "fits",
    "bumps",
    "artifacts",
    "llm_messages",
    "annotations",
)
"""The audit tables the review reads (a table the log lacks reads as no rows)."""


def parse_json(text: Any) -> Any:
    """A JSON column's value; text that is not JSON (and non-text) as it is."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def same_value(a: float | None, b: float | None) -> bool:
    """Whether two logged numbers (AR points in pb) are the same; None is never the same."""
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)


def spectrum_slug(spectrum: str, index: int) -> str:
    """The file stem of a spectrum x point page, e.g. T3_jm-point-000."""
    return f"{spectrum.replace('/', '_')}-point-{index:03d}"


@dataclass
class RunRecord:
    """One run folder as read for the report (audit rows parsed, per-point files loaded)."""

    run_dir: Path
    results: dict[str, Any]
    config: dict[str, Any]
    runs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    fits: list[dict[str, Any]]
    bumps: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    llm_messages: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    points: list[dict[str, Any]] = field(default_factory=list)

    def point_index(self, point: float | str) -> int:
        """The index of an AR point given in pb (or as #INDEX); InvalidInputError if absent."""
        points = self.results["points_pb"]
        if isinstance(point, str) and point.startswith("#"):
            index = int(point[1:])
            if 0 <= index < len(points):
                return index
        else:
            value = float(point)
            for index, scanned in enumerate(points):
                if math.isclose(value, scanned, rel_tol=1e-3):
                    return index
        raise InvalidInputError(
            f"AR point {point}: the scan has points {[float(f'{p:.6g}') for p in points]} pb "
            "(or give #INDEX)"
        )

    def tool_call(self, key: str) -> dict[str, Any] | None:
        """The tool call with this audit key (step:tool:label), outputs parsed."""
        for call in self.tool_calls:
            if call["key"] == key:
                return call
        return None

    def annotations_of(self, decision_seq: int) -> list[dict[str, Any]]:
        """The reviewer annotations of one decision."""
        return [a for a in self.annotations if a["decision_seq"] == decision_seq]


def _rows(db: Any, table: str) -> list[dict[str, Any]]:
    """Every row of an audit table in the order written (none when the log lacks it)."""
    if not db[table].exists():
        return []
    return [dict(row) for row in db.query(f"select * from [{table}] order by seq")]


def _audit_tables(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The audit tables of `AUDIT_TABLES`, JSON columns parsed, large outputs read back."""
    db = open_readonly(run_dir / AUDIT_FILE)
    try:
        tables = {name: _rows(db, name) for name in AUDIT_TABLES}
    finally:
        db.close()
    for row in tables["decisions"]:
        for column in ("chosen", "options", "numbers"):
            row[column] = parse_json(row[column])
    for row in tables["tool_calls"]:
        output = row["output"]
        if output is None and row.get("output_path"):
            path = run_dir / str(row["output_path"])
            output = path.read_text() if path.is_file() else None
        row["output"] = parse_json(output)
        row["input"] = parse_json(row["input"])
    for row in tables["runs"]:
        for column in ("config", "versions", "inputs"):
            row[column] = parse_json(row[column])
    for row in tables["fits"]:
        row["parameters"] = parse_json(row["parameters"])
        row["fit_range"] = parse_json(row["fit_range"])
    return tables


def _point_entry(run_dir: Path, index: int, point: float) -> dict[str, Any]:
    """One AR point's summary (points/point-NNN.json) and arrays (its NPZ, else spectra/)."""
    stem = f"point-{index:03d}"
    summary_path = run_dir / "points" / f"{stem}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    entry: dict[str, Any] = {"index": index, "point_pb": point, "summary": summary}
    arrays = run_dir / "points" / f"{stem}.npz"
    if arrays.is_file():
        with np.load(arrays) as data:
            entry["edges"] = np.asarray(data["edges"], dtype=float)
            entry["counts"] = np.asarray(data["counts"], dtype=float)
            entry["background"] = np.asarray(data["background"], dtype=float)
            if "background_error" in data.files:
                entry["background_error"] = np.asarray(data["background_error"], dtype=float)
    spectra = run_dir / "spectra" / f"{stem}.npz"
    if "counts" not in entry and spectra.is_file():
        with np.load(spectra) as data:
            entry["edges"] = np.asarray(data["edges"], dtype=float)
            entry["counts"] = np.asarray(data["counts"], dtype=float)
    return entry


def load_run(run_dir: Path) -> RunRecord:
    """Read a finished scan's run folder; InvalidInputError when it is not one."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise InvalidInputError(
            f"{run_dir} has no results.json: give the run folder of a finished scan (or "
            f"finish it with `anomscan scan --resume {run_dir}`)"
        )
    results = json.loads(results_path.read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    record = RunRecord(run_dir=run_dir, results=results, config=config, **_audit_tables(run_dir))
    for index, point in enumerate(results["points_pb"]):
        record.points.append(_point_entry(run_dir, index, point))
    return record


def flagged_excesses(run: RunRecord) -> list[dict[str, Any]]:
    """The excesses the scan flagged: a window exclusion was triggered, or the scan-wide best.

    In the order of results.json (by local Z).
    """
    triggered = {
        (row["spectrum"], float(row["point_pb"]))
        for row in run.decisions
        if row["kind"] == "window_exclusion" and row["point_pb"] is not None
    }
    lee = run.results.get("look_elsewhere") or {}
    best = lee.get("best") or {}
    flagged = []
    for excess in run.results["excesses"]:
        hit = any(
            s == excess["spectrum"] and same_value(p, excess["xsec_pb"]) for s, p in triggered
        )
        is_best = best.get("spectrum") == excess["spectrum"] and same_value(
            best.get("cross_section_pb"), excess["xsec_pb"]
        )
        if hit or is_best or excess.get("masked_window_gev") is not None:
            flagged.append(excess)
    return flagged
