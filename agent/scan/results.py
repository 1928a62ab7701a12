"""A scan's results: RUN/results.json (everything) and RUN/results.csv (one row per excess).

Results are collected from the state and the per-point files the bump hunt wrote, never
from truth.json: what a scan reports is what it measured. Only an excess whose background
passed every check is ranked; the rest are listed as skipped, with the reason. A spectrum
whose anomaly region is its whole stream holds the same events at every such AR point, so
those repeats are one row (the loosest point, as the scan-wide test counts it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.scan.config import RESULTS_CSV, RESULTS_JSON
from agent.scan.state import PointRecord, ScanState
from core.files import write_text

__all__ = [
    "RESULT_COLUMNS",
    "collect_results",
    "distinct_excesses",
    "write_results",
]

RESULT_COLUMNS = (
    "spectrum",
    "xsec_pb",
    "window_lo_gev",
    "window_hi_gev",
    "data",
    "background",
    "local_p",
    "local_z",
    "global_z",
    "scan_global_z",
    "function",
    "checks_passed",
    "whole_stream",
    "repeated_at_pb",
)
"""results.csv columns; `repeated_at_pb` holds the tighter whole-stream points a row stands
for, separated by spaces."""


def distinct_excesses(excesses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct excess: a spectrum's windows that overlap are one excess.

    `excesses` sorted by local Z (as in results.json); each row returned is the excess at
    the AR point where its local Z is largest, with `points_pb`, every AR point (pb,
    ascending) where the excess appears, whole-stream repeats included.
    """
    rows: list[dict[str, Any]] = []
    for excess in excesses:
        low, high = excess["window_gev"]
        points = [excess["xsec_pb"], *(excess.get("repeated_at_pb") or [])]
        same = next(
            (
                row
                for row in rows
                if row["spectrum"] == excess["spectrum"]
                and low < row["window_gev"][1]
                and row["window_gev"][0] < high
            ),
            None,
        )
        if same is None:
            rows.append(excess | {"points_pb": sorted(points)})
        else:
            same["points_pb"] = sorted({*same["points_pb"], *points})
    return rows


def write_results(folder: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """FOLDER/results.json (everything) and FOLDER/results.csv (one row per excess)."""
    json_path = write_text(folder / RESULTS_JSON, json.dumps(results, indent=1), what="results")
    rows = []
    for excess in results["excesses"]:
        row = {key: excess.get(key) for key in RESULT_COLUMNS}
        row["window_lo_gev"], row["window_hi_gev"] = excess["window_gev"]
        row["repeated_at_pb"] = " ".join(f"{p:g}" for p in excess.get("repeated_at_pb") or [])
        rows.append(row)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = write_text(folder / RESULTS_CSV, table.getvalue(), what="results table")
    return json_path, csv_path


def _same_excess(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["window_gev"] == b["window_gev"]
        and a["data"] == b["data"]
        and a["function"] == b["function"]
        and math.isclose(a["background"], b["background"], rel_tol=1e-9)
    )


def _merge_whole_stream_repeats(excesses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per repeated whole-stream result, as the scan-wide test counts it.

    At every AR point whose region is a spectrum's whole stream the spectrum holds the
    same events, so the fit and the bump are the same: the loosest such point is listed
    and the tighter ones that repeat it go to its `repeated_at_pb` (every point stays in
    `points_pb`). The loosest is the one core.lookelsewhere keeps, so `scan_global_z`
    sits on the listed row.
    """
    kept: list[dict[str, Any]] = []
    for excess in sorted(excesses, key=lambda e: (e["spectrum"], -e["xsec_pb"])):
        twin = next(
            (
                k
                for k in kept
                if excess["whole_stream"]
                and k["whole_stream"]
                and k["spectrum"] == excess["spectrum"]
                and _same_excess(k, excess)
            ),
            None,
        )
        if twin is None:
            kept.append(excess)
        else:
            twin["repeated_at_pb"].append(excess["xsec_pb"])
    return kept


def _skipped_row(spectrum: dict[str, Any], record: PointRecord) -> dict[str, Any]:
    """A spectrum of an AR point that is not ranked, and why."""
    return {
        "spectrum": spectrum["spectrum"],
        "point_pb": record["point_pb"],
        "reason": spectrum["reason"]
        if spectrum["status"] != "excess"
        else "no accepted background: the background the hunt used did not pass its checks",
    }


def _excess_row(
    spectrum: dict[str, Any], record: PointRecord, lee: dict[str, Any] | None
) -> dict[str, Any]:
    """An excess of results.json; `scan_global_z` only on the scan-wide test's best one."""
    is_best = (
        lee is not None
        and lee["best"]["spectrum"] == spectrum["spectrum"]
        and math.isclose(lee["best"]["cross_section_pb"], record["point_pb"], rel_tol=1e-9)
    )
    return {
        "spectrum": spectrum["spectrum"],
        "xsec_pb": record["point_pb"],
        "window_gev": spectrum["window_gev"],
        "data": spectrum["data"],
        "background": spectrum["background"],
        "local_p": spectrum["local_p"],
        "local_z": spectrum["local_z"],
        "global_z": spectrum["global_z"],
        "global_z_is_lower_limit": spectrum["global_z_is_lower_limit"],
        "scan_global_z": lee["global_z"] if is_best and lee else None,
        "function": spectrum["function"],
        "checks_passed": spectrum["checks_passed"],
        "fit_p_value": spectrum["fit_p_value"],
        "checks": spectrum.get("checks"),
        "gof_p_value": spectrum.get("gof_p_value"),
        "background_choice": spectrum.get("background_choice"),
        "masked_window_gev": spectrum["masked_window_gev"],
        "mask_from": spectrum.get("mask_from"),
        "whole_stream": bool(record["outcomes"].get(spectrum["spectrum"], {}).get("whole_stream")),
        "repeated_at_pb": [],
    }


def collect_results(state: ScanState, at: Callable[[str], Path]) -> dict[str, Any]:
    """results.json from the state and the per-point files (never from truth.json).

    `at` finds a path recorded in the state in the run folder as it is now. Each excess
    carries what its point's file recorded of the background the hunt used (function, final
    fit p, checks, GOF p, mask); an "excess" whose recorded checks did not pass is listed as
    skipped, never ranked.
    """
    lee = state.get("lee")
    excesses = []
    skipped = []
    for record in state["points"]:
        results = json.loads(at(record["results_file"]).read_text())
        for spectrum in results["spectra"]:
            if spectrum["status"] != "excess" or spectrum.get("checks_passed") is not True:
                skipped.append(_skipped_row(spectrum, record))
            else:
                excesses.append(_excess_row(spectrum, record, lee))
    excesses = _merge_whole_stream_repeats(excesses)
    excesses.sort(key=lambda e: (-e["local_z"], e["spectrum"], -e["xsec_pb"]))
    return {
        "run_id": state["run_id"],
        "luminosity_pb": state["lumi_pb"],
        "points_pb": [p["point_pb"] for p in state["points"]],
        "scan_global_p": None if lee is None else lee["global_p"],
        "scan_global_z": None if lee is None else lee["global_z"],
        "scan_global_z_is_lower_limit": None if lee is None else lee["global_z_is_lower_limit"],
        "look_elsewhere": lee,
        "stop_reason": state.get("stop_reason", ""),
        "model_sha256": state.get("model_sha256"),
        "table_sha256": state.get("table_sha256"),
        "n_events": state.get("n_events"),
        "input_notes": state.get("input_notes", []),
        "excesses": excesses,
        "skipped": skipped,
    }
