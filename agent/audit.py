"""The append-only, hash-chained SQLite audit log of a scan: RUN/audit.sqlite.

Tables (DESIGN.md "Audit log"): `runs`, `steps`, `decisions`, `tool_calls`,
`llm_messages`, `fits`, `bumps`, `artifacts`. Every row carries a global sequence
number `seq` (one chain over all tables, in the order rows were written), `prev_hash`
(the `hash` of row seq - 1) and its own `hash` = SHA-256 of its table name, seq,
prev_hash and content (canonical JSON). `verify` walks the chain and names the first
row that was edited (its hash no longer matches), deleted (a gap in seq) or inserted
(a duplicated seq or a prev_hash that does not match). A row appended at the end by
someone who recomputes the hashes is not detectable without a secret; nothing here
claims otherwise.

Rows are written in one transaction per graph step, so a scan killed mid-step leaves
no half-written step; every row has a natural `key` (e.g. step id + spectrum), and a
row whose key is already in the log is not written again: a resumed scan that re-runs
a step whose rows were committed before the kill writes no decision twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from core.errors import AnomscanError

AUDIT_FILE = "audit.sqlite"

TABLE_COLUMNS: dict[str, dict[str, type]] = {
    "runs": {
        "run_id": str,
        "event": str,
        "config": str,
        "versions": str,
        "inputs": str,
        "model_sha256": str,
        "seed": int,
        "prompts": str,
    },
    "steps": {
        "step_id": str,
        "node": str,
        "point_pb": float,
        "started_at": float,
        "ended_at": float,
        "seconds": float,
        "summary": str,
    },
    "decisions": {
        "step_id": str,
        "kind": str,
        "spectrum": str,
        "point_pb": float,
        "chosen": str,
        "options": str,
        "policy": str,
        "rationale": str,
        "numbers": str,
        "gate": str,
    },
    "tool_calls": {
        "step_id": str,
        "tool": str,
        "input": str,
        "input_sha256": str,
        "output": str,
        "output_sha256": str,
        "output_path": str,
        "seconds": float,
        "replayable": int,
        "worker": str,
    },
    "llm_messages": {
        "step_id": str,
        "model": str,
        "role": str,
        "content": str,
        "tokens": int,
        "served_model": str,
        "decision": str,
        "prompt_tokens": int,
        "completion_tokens": int,
        "latency_s": float,
    },
    "fits": {
        "step_id": str,
        "spectrum": str,
        "point_pb": float,
        "function": str,
        "parameters": str,
        "p_value": float,
        "chi2": float,
        "ndf": int,
        "fit_range": str,
        "passed": int,
    },
    "bumps": {
        "step_id": str,
        "spectrum": str,
        "point_pb": float,
        "window_lo": float,
        "window_hi": float,
        "data": float,
        "background": float,
        "local_p": float,
        "local_z": float,
        "global_p": float,
        "global_z": float,
    },
    "artifacts": {"path": str, "sha256": str, "bytes": int, "kind": str},
    "annotations": {"decision_seq": int, "verdict": str, "note": str, "by": str},
}
"""The content columns of every table; each also has seq, key, written_at, prev_hash, hash."""

OPTIONAL_TABLES = frozenset({"annotations"})
"""Tables a log written before they existed may lack (verify does not call them missing)."""
VERDICTS = ("agree", "question", "reject")
"""A reviewer's verdict on one decision (`annotate`)."""

CHAIN_COLUMNS = ("seq", "key", "written_at", "prev_hash", "hash")
GENESIS_HASH = "0" * 64
INLINE_OUTPUT_BYTES = 64_000
"""Tool outputs larger than this are stored as a file beside the log, the row keeps its hash."""


class AuditError(AnomscanError):
    """The audit log could not be read or written (read-only folder, disk full, corrupt)."""


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the form every hash is taken over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of a UTF-8 string."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_hash(table: str, seq: int, prev_hash: str, content: Mapping[str, Any]) -> str:
    """The hash of one row: its table, place in the chain, predecessor and content."""
    return sha256_text(canonical_json([table, seq, prev_hash, dict(content)]))


@dataclass(frozen=True)
class PendingRow:
    """A row queued in a step's transaction."""

    table: str
    key: str
    content: dict[str, Any]


class AuditLog:
    """Writer and reader of one run's audit log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite_utils.Database(path)
            self._create_tables()
            self._keys = {
                (table, str(row["key"]))
                for table in TABLE_COLUMNS
                for row in self.db.query(f"select key from [{table}]")
            }
            self._seq, self._last_hash = self._chain_head()
        except sqlite3.Error as error:
            raise self._error("open", error) from error
        self._pending: list[PendingRow] | None = None

    def _error(self, action: str, error: Exception) -> AuditError:
        return AuditError(
            f"cannot {action} the audit log {self.path}: {error}; make the run folder "
            f"writable (or free disk space), then continue with `anomscan scan --resume "
            f"{self.path.parent}`"
        )

    def _create_tables(self) -> None:
        for table, columns in TABLE_COLUMNS.items():
            if self.db[table].exists():
                continue
            self.db[table].create(  # type: ignore[union-attr]
                {"seq": int, "key": str, "written_at": float, **columns}
                | {"prev_hash": str, "hash": str},
                pk="seq",
            )
            self.db[table].create_index(["key"], unique=True)  # type: ignore[union-attr]

    def _chain_head(self) -> tuple[int, str]:
        best = (0, GENESIS_HASH)
        for table in TABLE_COLUMNS:
            for row in self.db.query(f"select seq, hash from [{table}] order by seq desc limit 1"):
                if int(row["seq"]) > best[0]:
                    best = (int(row["seq"]), str(row["hash"]))
        return best

    def has(self, table: str, key: str) -> bool:
        """Whether a row with this key was written (or is queued) in `table`."""
        if (table, key) in self._keys:
            return True
        return self._pending is not None and any(
            row.table == table and row.key == key for row in self._pending
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[AuditLog]:
        """Queue rows with `add`; they are written together, or not at all, on exit."""
        if self._pending is not None:
            yield self
            return
        self._pending = []
        try:
            yield self
            self._flush(self._pending)
        finally:
            self._pending = None

    def add(self, table: str, key: str, **content: Any) -> bool:
        """Append one row (queued when in a transaction); False when its key is already logged."""
        columns = TABLE_COLUMNS[table]
        unknown = set(content) - set(columns)
        if unknown:
            raise AuditError(f"audit table {table!r} has no columns {sorted(unknown)}")
        row: dict[str, Any] = {}
        for name, kind in columns.items():
            value = content.get(name)
            if value is not None:
                if kind is str:
                    value = value if isinstance(value, str) else canonical_json(value)
                else:
                    value = kind(value)
            row[name] = value
        if self.has(table, key):
            return False
        pending = PendingRow(table, key, row)
        if self._pending is None:
            self._flush([pending])
        else:
            self._pending.append(pending)
        return True

    def _flush(self, rows: Sequence[PendingRow]) -> None:
        if not rows:
            return
        seq, last = self._seq, self._last_hash
        prepared: list[tuple[str, dict[str, Any]]] = []
        for row in rows:
            seq += 1
            content = {"key": row.key, "written_at": round(time.time(), 3), **row.content}
            digest = row_hash(row.table, seq, last, content)
            prepared.append((row.table, {"seq": seq, **content, "prev_hash": last, "hash": digest}))
            last = digest
        try:
            with self.db.conn:
                for table, record in prepared:
                    self.db[table].insert(record)  # type: ignore[union-attr]
        except sqlite3.Error as error:
            raise self._error("write", error) from error
        self._seq, self._last_hash = seq, last
        self._keys.update((row.table, row.key) for row in rows)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of `table`, in the order written."""
        return list(self.db.query(f"select * from [{table}] order by seq"))

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()


def open_readonly(path: Path) -> sqlite_utils.Database:
    """The log opened for reading only (verify, export, tables never write).

    A scan stopped inside a write (killed, disk full, folder made read-only) leaves a hot
    journal that SQLite must roll back before anyone can read, and a read-only connection
    cannot: then one read-write connection rolls the unfinished transaction back (only
    uncommitted changes are undone; no committed row is touched) and the log is reopened
    read-only.
    """
    if not path.is_file():
        raise AuditError(f"no audit log at {path}; give the run folder of a scan")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        connection.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.OperationalError as error:
        connection.close()
        if "readonly" not in str(error):
            raise AuditError(f"cannot read the audit log {path}: {error}") from error
        try:
            with contextlib.closing(sqlite3.connect(path)) as recovery:
                recovery.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.OperationalError as again:
            raise AuditError(
                f"the audit log {path} holds an interrupted write that must be rolled back "
                f"before it can be read, and that failed ({again}); make the run folder "
                "writable and run the command again"
            ) from again
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    return sqlite_utils.Database(connection)


def all_rows(db: sqlite_utils.Database) -> list[tuple[str, dict[str, Any]]]:
    """(table, row) for every row of every audit table, in chain order."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for table in TABLE_COLUMNS:
        if db[table].exists():
            rows.extend((table, row) for row in db.query(f"select * from [{table}]"))
    rows.sort(key=lambda item: (int(item[1]["seq"]), item[0]))
    return rows


def _content(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("seq", "prev_hash", "hash")}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of walking the hash chain: problems name table, seq and key."""

    n_rows: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the chain is intact."""
        return not self.problems


def verify(path: Path) -> VerifyReport:
    """Check every row's hash and its link to the previous row."""
    db = open_readonly(path)
    try:
        missing_tables = [
            table
            for table in TABLE_COLUMNS
            if table not in OPTIONAL_TABLES and not db[table].exists()
        ]
        rows = all_rows(db)
    finally:
        db.close()
    problems = [f"table {table!r} is missing" for table in missing_tables]
    by_seq: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for table, row in rows:
        by_seq.setdefault(int(row["seq"]), []).append((table, row))
    expected_prev = GENESIS_HASH
    previous_seq = 0
    previous_name = "the start of the log"
    for seq in sorted(by_seq):
        here = by_seq[seq]
        names = {id(row): f"{table} row seq {seq} (key {row['key']!r})" for table, row in here}
        if seq != previous_seq + 1:
            first = names[id(here[0][1])]
            problems.append(
                f"rows seq {previous_seq + 1}..{seq - 1} are missing between {previous_name} "
                f"and {first}: deleted"
            )
        intact = {
            id(row): row_hash(table, seq, str(row["prev_hash"]), _content(row)) == row["hash"]
            for table, row in here
        }
        linked = {id(row): row["prev_hash"] == expected_prev for _, row in here}
        genuine = [row for _, row in here if intact[id(row)] and linked[id(row)]]
        for _, row in here:
            name = names[id(row)]
            if len(here) > 1 and row not in genuine:
                problems.append(
                    f"{name}: seq {seq} appears twice and this row does not link: inserted"
                )
            elif not intact[id(row)]:
                problems.append(f"{name}: its content does not match its hash: edited")
            elif not linked[id(row)] and seq == previous_seq + 1:
                problems.append(
                    f"{name}: prev_hash does not match the hash of {previous_name}: inserted "
                    "or re-linked"
                )
        chosen = genuine[0] if genuine else here[0][1]
        expected_prev = str(chosen["hash"])
        previous_seq = seq
        previous_name = names[id(chosen)]
    return VerifyReport(len(rows), tuple(problems))


def export_jsonl(path: Path, output: Path) -> int:
    """Write every row as one JSON object per line (with its `table`); returns the count."""
    db = open_readonly(path)
    try:
        rows = all_rows(db)
    finally:
        db.close()
    with output.open("w") as stream:
        for table, row in rows:
            stream.write(json.dumps({"table": table, **row}, sort_keys=True) + "\n")
    return len(rows)


def decisions(
    path: Path,
    *,
    step: str | None = None,
    spectrum: str | None = None,
    point_pb: float | None = None,
    policy: str | None = None,
) -> list[dict[str, Any]]:
    """The decisions, filtered by step (id or node name, substring), spectrum, point, policy.

    `policy="llm"` gives what the model decided, every proposal refused and every fallback.
    """
    db = open_readonly(path)
    try:
        rows = list(db.query("select * from decisions order by seq"))
    finally:
        db.close()
    selected = []
    for row in rows:
        if step is not None and step not in str(row["step_id"]):
            continue
        if spectrum is not None and row["spectrum"] != spectrum:
            continue
        if policy is not None and row["policy"] != policy:
            continue
        if point_pb is not None and (
            row["point_pb"] is None or abs(float(row["point_pb"]) / point_pb - 1.0) > 1e-6
        ):
            continue
        selected.append(row)
    return selected


def tool_calls(path: Path) -> list[dict[str, Any]]:
    """Every logged tool call, in order."""
    db = open_readonly(path)
    try:
        return list(db.query("select * from tool_calls order by seq"))
    finally:
        db.close()


def annotate(path: Path, decision_seq: int, verdict: str, note: str, by: str) -> dict[str, Any]:
    """Append a reviewer's verdict on the decision with this seq to the chain; the new row.

    The decision itself is never changed: the annotation is a row of its own, linked by
    `decision_seq`, hashed into the chain like every other row (verify still passes).
    """
    if verdict not in VERDICTS:
        raise AuditError(f"verdict {verdict!r}: expected one of {list(VERDICTS)}")
    if not by.strip():
        raise AuditError("an annotation needs the reviewer's name: give --by NAME")
    reader = open_readonly(path)
    try:
        found = list(reader.query("select seq from decisions where seq = ?", [decision_seq]))
    finally:
        reader.close()
    if not found:
        raise AuditError(
            f"no decision with seq {decision_seq} in {path}; `anomscan audit "
            f"{path.parent}` lists the decisions with their seq"
        )
    log = AuditLog(path)
    try:
        count = sum(1 for _ in log.db.query("select seq from annotations"))
        key = f"annotation:{decision_seq}:{count + 1}"
        log.add("annotations", key, decision_seq=decision_seq, verdict=verdict, note=note, by=by)
        return dict(next(iter(log.db.query("select * from annotations where key = ?", [key]))))
    finally:
        log.close()


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """Every annotation, in the order written (empty for a log without the table)."""
    db = open_readonly(path)
    try:
        if not db["annotations"].exists():
            return []
        return list(db.query("select * from annotations order by seq"))
    finally:
        db.close()
