"""A blinded scan (`anomscan scan --blind`) and its unblinding (`anomscan unblind`).

Everything runs as in any scan; only what would reveal the data in the search windows is
withheld from what the product shows (results.json and results.csv, the terminal, the
report, the exports): the excesses (windows, observed counts, backgrounds in windows,
local, spectrum-global and scan-global p and Z, masked windows) and the look-elsewhere
result. results.json keeps what a reviewer needs to approve the procedure: the AR points,
every accepted background with its fit p and checks (sorted by point and spectrum, not by
Z), the skipped spectra and the look-elsewhere method and test count.

The full results are sealed in RUN/sealed/ and logged as artifacts with their SHA-256 in
the hash chain, so unblinding recomputes nothing: `unblind` checks the sealed files
against their logged hashes, appends a `runs` row (event "unblind": who, when, the plan
hash, a note) and puts them in place. After it, `unblinding` and `changes_after` tell the
report whether anything was added to the run since.

What this does not do: the run folder's other files (the audit log, the per-point files)
still hold every number, as they must for the audit and the resume; blinding is a
discipline the product keeps in what it shows, not encryption.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any, Final

from agent.runtime.audit import AUDIT_FILE, AuditLog, reading
from agent.runtime.runlock import run_folder_lock
from agent.scan.config import CONFIG_FILE, RESULTS_CSV, RESULTS_JSON
from agent.scan.plan import PLAN_EVENT
from core.errors import InvalidInputError
from core.files import atomic_path, file_sha256

__all__ = [
    "SEALED_DIR",
    "SEALED_KIND",
    "VISIBLE_KINDS",
    "blinded_limits",
    "blinded_results",
    "changes_after",
    "check_unblinded",
    "is_blinded",
    "unblind",
    "unblinding",
]

SEALED_DIR: Final = "sealed"
SEALED_KIND: Final = "sealed results"
UNBLIND_EVENT: Final = "unblind"

WITHHELD: Final = (
    "window_gev",
    "data",
    "background",
    "local_p",
    "local_z",
    "global_z",
    "global_z_is_lower_limit",
    "scan_global_z",
    "masked_window_gev",
    "mask_from",
)
"""The fields of an excess that depend on the data in its window."""

VISIBLE_KINDS: Final = frozenset(
    {"inputs", "event_pass", "ar_points", "anomaly_region", "skip", "background", "fallback"}
)
"""Decision kinds a blinded report shows: none of them is taken on the data in a window.
Hidden: the provisional hunts, masks and window exclusions, the refinements (placed where
the excesses are), the look-elsewhere and the summary."""


def blinded_results(results: dict[str, Any]) -> dict[str, Any]:
    """results.json of a blinded scan: the procedure's outcome without the search windows."""
    backgrounds = sorted(
        ({k: v for k, v in e.items() if k not in WITHHELD} for e in results["excesses"]),
        key=lambda e: (e["xsec_pb"], e["spectrum"]),
    )
    lee = results.get("look_elsewhere")
    return results | {
        "blinded": {
            "sealed": f"{SEALED_DIR}/{RESULTS_JSON}",
            "withheld": "excesses, the look-elsewhere result, scan-global p and Z",
            "unblind": "anomscan unblind RUN --by NAME",
        },
        "excesses": [],
        "backgrounds": backgrounds,
        "scan_global_p": None,
        "scan_global_z": None,
        "scan_global_z_is_lower_limit": None,
        "look_elsewhere": None
        if lee is None
        else {k: lee[k] for k in ("method", "n_tests", "n_pseudo_scans") if k in lee},
    }


def blinded_limits(output: dict[str, Any]) -> dict[str, Any]:
    """The limits of a blinded run: every curve's expected band, no observed limit."""
    curves = [curve | {"observed_pb": None, "observed_events": None} for curve in output["curves"]]
    return output | {"curves": curves, "observed": "sealed until `anomscan unblind`"}


def is_blinded(run_dir: Path) -> bool:
    """Whether the run is a blinded scan not yet unblinded (finished or not)."""
    config = run_dir / CONFIG_FILE
    if not config.is_file() or not json.loads(config.read_text()).get("blind"):
        return False
    return not (run_dir / AUDIT_FILE).is_file() or unblinding(run_dir) is None


def _results_blinded(run_dir: Path) -> bool:
    path = run_dir / RESULTS_JSON
    return path.is_file() and bool(json.loads(path.read_text()).get("blinded"))


def check_unblinded(run_dir: Path, what: str) -> None:
    """Raise InvalidInputError when `what` would show a blinded run's search windows."""
    if is_blinded(run_dir):
        raise InvalidInputError(
            f"{run_dir} is a blinded scan: {what} would show the data in the search windows; "
            f"`anomscan unblind {run_dir} --by NAME` releases them (`anomscan report` shows "
            "the blinded procedure)"
        )


def _runs_rows(run_dir: Path) -> list[dict[str, Any]]:
    with reading(run_dir / AUDIT_FILE) as db:
        return [dict(row) for row in db.query("select * from runs order by seq")]


def unblinding(run_dir: Path) -> dict[str, Any] | None:
    """The `runs` row of the run's unblinding (its config parsed), or None."""
    rows = [r for r in _runs_rows(run_dir) if r["event"] == UNBLIND_EVENT]
    if not rows:
        return None
    return rows[0] | {"config": json.loads(rows[0]["config"])}


def changes_after(run_dir: Path, seq: int) -> list[tuple[str, int, str]]:
    """(table, seq, key) of every row written after `seq` but the reviewers' annotations."""
    with reading(run_dir / AUDIT_FILE) as db:
        tables = [t for t in db.table_names() if db[t].exists() and "seq" in db[t].columns_dict]
        rows = [
            (table, int(row["seq"]), str(row["key"]))
            for table in tables
            if table != "annotations"
            for row in db.query(f"select seq, key from [{table}] where seq > ?", [seq])
        ]
    return sorted(rows, key=lambda row: row[1])


def _sealed_hashes(run_dir: Path) -> dict[str, str]:
    """The logged SHA-256 of each sealed file (path relative to the run folder)."""
    with reading(run_dir / AUDIT_FILE) as db:
        # a file sealed again (a second limits step) holds what its last row says
        query = "select path, sha256 from artifacts where kind = ? order by seq"
        return {str(r["path"]): str(r["sha256"]) for r in db.query(query, [SEALED_KIND])}


def unblind(run_dir: Path, by: str, note: str = "") -> dict[str, Any]:
    """Release a blinded run's sealed results, on record; the `unblind` row's content.

    Raises InvalidInputError when the run is not blinded (or was unblinded), no name is
    given, or a sealed file differs from its logged hash.
    """
    if not by.strip():
        raise InvalidInputError("unblinding needs the name of who does it: give --by NAME")
    if not _results_blinded(run_dir):  # a crash after the unblind row: put them in place
        if is_blinded(run_dir):
            raise InvalidInputError(
                f"{run_dir} holds no results yet: the blinded scan has not finished; "
                f"`anomscan scan --resume {run_dir}` completes it"
            )
        done = unblinding(run_dir) if (run_dir / AUDIT_FILE).is_file() else None
        raise InvalidInputError(
            f"{run_dir} is not a blinded scan"
            + (f": it was unblinded by {done['config']['by']}" if done else "")
        )
    with run_folder_lock(run_dir, "anomscan unblind"):
        hashes = _sealed_hashes(run_dir)
        names = sorted({Path(relative).name for relative in hashes} | {RESULTS_JSON, RESULTS_CSV})
        for name in names:
            relative = f"{SEALED_DIR}/{name}"
            path = run_dir / relative
            if not path.is_file() or file_sha256(path) != hashes.get(relative):
                raise InvalidInputError(
                    f"{path} is missing or differs from the hash the scan logged for it: the "
                    "sealed results were changed; restore the run folder from a copy"
                )
        plans = [r for r in _runs_rows(run_dir) if r["event"] == PLAN_EVENT]
        record = {
            "by": by,
            "note": note,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "plan_sha256": json.loads(plans[0]["config"])["plan_sha256"] if plans else None,
            "sealed": {name: hashes[f"{SEALED_DIR}/{name}"] for name in names},
        }
        log = AuditLog(run_dir / AUDIT_FILE)
        try:
            log.add("runs", f"run:{UNBLIND_EVENT}", run_id=run_dir.resolve().name,
                    event=UNBLIND_EVENT, config=record)  # fmt: skip
        finally:
            log.close()
        for name in names:
            with atomic_path(run_dir / name, what="results") as partial:
                shutil.copyfile(run_dir / SEALED_DIR / name, partial)
    return record
