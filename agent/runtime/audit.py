r"""The append-only, hash-chained SQLite audit log of a scan: RUN/audit.sqlite.

Tables (DESIGN.md "Audit log"): `runs`, `steps`, `decisions`, `tool_calls`,
`llm_messages`, `fits`, `bumps`, `artifacts`, `annotations`. Every row carries a global
sequence number `seq` (one chain over all tables, in the order rows were written),
`prev_hash` (the `hash` of row seq - 1) and its own `hash`.

The canonical form (hash form 2). A row is hashed in exactly the form SQLite gives back,
so `verify`, which hashes what it reads, gets the same bytes as the writer did. `add`
normalises every value once, and both hashes and inserts the normalised value:

- float column: any real number -> Python float; -0.0 -> 0.0 (SQLite stores zero
  without its sign); NaN -> NULL (SQLite stores NaN as NULL); +-inf are kept (SQLite
  stores them); an int too large for a float is refused (AuditError).
- int column: bool and integer types (numpy included) -> int; an integral float -> int;
  a fractional or non-finite float, or a value outside int64 (SQLite's INTEGER), is
  refused (AuditError).
- str column: a str is kept as given; any other value is written as RFC 8785 canonical
  JSON (`audit_json`) of the value normalised as follows: numpy scalars and arrays ->
  Python values and lists, tuples -> lists, -0.0 -> 0.0, NaN/+inf/-inf -> the strings
  "NaN"/"Infinity"/"-Infinity" (`float()` reads them back), integers beyond +-(2**53 - 1)
  (JSON's exact range) -> decimal strings, mapping keys -> strings as `json.dumps`
  makes them, anything else -> `str(value)`.
- text (str columns, keys, strings inside JSON): an unpaired surrogate, which UTF-8 can
  not hold (a model's reply may carry one), is written as its escape `\udXXX`; all
  other text is kept as given.
- the row hash is SHA-256 of the RFC 8785 JSON of ["anomscan-audit/2", table, seq,
  prev_hash, {column: value}, anchor], each value tagged with its SQLite type (["s",
  text], ["i", decimal], ["f", float.hex()], null), so no two stored rows share a hash
  by a change of type.

The head anchor. The last row can not anchor itself: deleting the tail of a chain, or
rewriting every row after a deletion, leaves a chain that links. So the writer keeps
RUN/audit.head.json (written atomically) with the last seq, its hash and the row count
of every table: before each commit it records the new head with the current one as
`pending_from` (a writer killed between the two writes leaves a log that matches one of
them), after the commit the new head alone. `verify` reports a log that differs from its
head file, and a writer refuses to append to one. A writer reopening a log binds the
SHA-256 of the head file it found into the hash of its first new row (table
`audit_meta`, name `anchor:SEQ`). Someone who rewrites both the log and the head file is
not detectable without a secret; nothing here claims otherwise.

What `verify` names: a row that fails its hash (edited; or moved/swapped when its hash
matches at another seq), a gap in seq (deleted), rows missing after the last one (from
the head file), a seq held by more than one row (inserted: the genuine one is the one
the next row's prev_hash, or for the last seq the head file, links to; every other one
is named), and an intact row whose prev_hash is not its predecessor's hash (inserted or
re-linked). A log `verify` can not open or read as SQLite is an AuditError.

Older logs. Rows written before hash form 2 (the `audit_meta` table records from which
seq on form 2 holds; a log without it is all form 1) are checked with the form they were
written in: SHA-256 of `canonical_json([table, seq, prev_hash, row])` over the row as
read, where a float column read as 0.0 may have been written as -0.0 and one read as
NULL as NaN (the two values form 1 changed between writing and reading); both are tried,
so an untouched form-1 row is never called edited. A form-1 log has no head file: its
deleted tail rows can not be detected, and `verify` says so.

Rows are written in one transaction per graph step, so a scan killed mid-step leaves
no half-written step; every row has a natural `key` (e.g. step id + spectrum), and a
row whose key is already in the log is not written again: a resumed scan that re-runs
a step whose rows were committed before the kill writes no decision twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rfc8785
import sqlite_utils

from core.errors import AnomscanError
from core.files import json_text, write_text

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

HASH_FORM = 2
"""The canonical form new rows are hashed in (see the module docstring)."""
HASH_TAG = f"anomscan-audit/{HASH_FORM}"
META_TABLE = "audit_meta"
"""name -> value: `hash_form`, `hash_form_since_seq`, `anchor:SEQ` (bound into row SEQ's hash)."""
HEAD_SUFFIX = ".head.json"
"""RUN/audit.head.json beside RUN/audit.sqlite: the chain's head, outside the log."""
INT64_RANGE = (-(2**63), 2**63 - 1)
JSON_EXACT_INT = 2**53 - 1
"""The largest integer every JSON reader holds exactly (RFC 8785 refuses larger ones)."""


class AuditError(AnomscanError):
    """The audit log could not be read or written (read-only folder, disk full, corrupt)."""


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the form tool inputs and outputs are hashed in."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of a UTF-8 string."""
    return hashlib.sha256(text.encode()).hexdigest()


def head_path(path: Path) -> Path:
    """The head file of the log at `path`: RUN/audit.head.json for RUN/audit.sqlite."""
    return path.with_name(path.stem + HEAD_SUFFIX)


def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return 0.0 if value == 0.0 else value


def _json_key(key: Any) -> str:
    """A mapping key as `json.dumps` writes it."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool | np.bool_):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int | np.integer):
        return str(int(key))
    if isinstance(key, float | np.floating):
        return json.dumps(float(key))
    return str(key)


def json_value(value: Any) -> Any:
    """`value` as the JSON value the log stores (module docstring: str columns)."""
    if value is None:
        return value
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        number = int(value)
        return number if abs(number) <= JSON_EXACT_INT else str(number)
    if isinstance(value, float | np.floating):
        return _json_float(float(value))
    if isinstance(value, Mapping):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            name = storable_text(_json_key(key))
            if name in converted:
                raise AuditError(
                    f"two keys of a mapping are both {name!r} in JSON; give distinct keys"
                )
            converted[name] = json_value(item)
        return converted
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    if isinstance(value, np.ndarray | np.generic):
        return json_value(value.tolist())
    return str(value)


def audit_json(value: Any) -> str:
    """RFC 8785 canonical JSON of `value` normalised by `json_value`: a str column's text."""
    try:
        return rfc8785.dumps(json_value(value)).decode()
    except rfc8785.CanonicalizationError as error:
        raise AuditError(f"cannot write {_shown(value)} as canonical JSON: {error}") from error


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def storable_text(text: str) -> str:
    r"""`text` as SQLite stores it: an unpaired surrogate becomes its escape `\udXXX`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def column_value(kind: type, value: Any, where: str) -> str | int | float | None:
    """`value` as SQLite gives it back from a column of type `kind` (module docstring)."""
    if value is None:
        return None
    if kind is str:
        return storable_text(value) if isinstance(value, str) else audit_json(value)
    if kind is int:
        return _int_value(value, where)
    return _float_value(value, where)


def _int_value(value: Any, where: str) -> int:
    if isinstance(value, bool | np.bool_):
        return int(bool(value))
    if isinstance(value, int | np.integer):
        number = int(value)
    elif isinstance(value, float | np.floating):
        real = float(value)
        if not real.is_integer():
            raise AuditError(f"{where}: {real!r} is not an integer; round it before logging")
        number = int(real)
    else:
        try:
            number = int(value)
        except (TypeError, ValueError) as error:
            raise AuditError(f"{where}: {_shown(value)} is not an integer") from error
    if not INT64_RANGE[0] <= number <= INT64_RANGE[1]:
        raise AuditError(
            f"{where}: {number} is outside SQLite's 64-bit integers; log it in a text column"
        )
    return number


def _float_value(value: Any, where: str) -> float | None:
    try:
        real = float(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise AuditError(f"{where}: {_shown(value)} is not a float64 number") from error
    if math.isnan(real):
        return None
    return 0.0 if real == 0.0 else real


def _typed(value: Any) -> list[str] | None:
    """A stored value with its SQLite type, as it enters the row hash."""
    if value is None:
        return None
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, int):
        return ["i", str(value)]
    if isinstance(value, float):
        return ["f", value.hex()]
    if isinstance(value, bytes):
        return ["b", value.hex()]
    raise AuditError(f"a stored value of type {type(value).__name__} can not be hashed")


def row_hash(
    table: str, seq: int, prev_hash: str, content: Mapping[str, Any], anchor: str | None = None
) -> str:
    """The hash of one row (form 2): its table, place in the chain, predecessor, content.

    `content` holds the values as stored (see `column_value`); `anchor` is the SHA-256 of
    the head file a reopening writer found, for the first row it appends.
    """
    payload: list[Any] = [
        HASH_TAG,
        table,
        seq,
        prev_hash,
        {k: _typed(v) for k, v in content.items()},
        anchor,
    ]
    return hashlib.sha256(rfc8785.dumps(payload)).hexdigest()


def row_hash_form1(table: str, seq: int, prev_hash: str, content: Mapping[str, Any]) -> str:
    """The hash of one row as written before hash form 2."""
    return sha256_text(canonical_json([table, seq, prev_hash, dict(content)]))


def _form1_matches(table: str, seq: int, row: Mapping[str, Any]) -> bool:
    """Whether a form-1 row matches its hash, for some value form 1 changed in storage.

    Form 1 hashed a float column's -0.0 and NaN, which SQLite stores as 0.0 and NULL.
    """
    content = _content(row)
    floats = [
        name
        for name, kind in TABLE_COLUMNS[table].items()
        if kind is float and name in content and (content[name] is None or content[name] == 0.0)
    ]
    choices = [(None, math.nan) if content[name] is None else (0.0, -0.0) for name in floats]
    for values in itertools.islice(itertools.product(*choices), 1 << 12):
        trial = content | dict(zip(floats, values, strict=True))
        if row_hash_form1(table, seq, str(row["prev_hash"]), trial) == row["hash"]:
            return True
    return False


@dataclass(frozen=True)
class PendingRow:
    """A row queued in a step's transaction."""

    table: str
    key: str
    content: dict[str, Any]


@dataclass(frozen=True)
class ChainHead:
    """The end of the chain: last seq, its hash, and the row count of every table."""

    seq: int
    hash: str
    rows: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON form of the head file."""
        return {
            "seq": self.seq,
            "hash": self.hash,
            "rows": dict(sorted(self.rows.items())),
            "total": sum(self.rows.values()),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ChainHead:
        """The head written by `record` (KeyError/TypeError/ValueError on another shape)."""
        rows = {str(table): int(count) for table, count in dict(record["rows"]).items()}
        return cls(int(record["seq"]), str(record["hash"]), rows)

    def differences(self, recorded: ChainHead) -> list[str]:
        """How this head (the log's) differs from the `recorded` one (the head file's)."""
        found: list[str] = []
        if self.seq < recorded.seq:
            found.append(
                f"rows after seq {self.seq} were deleted: the head file records seq "
                f"{recorded.seq}, hash {recorded.hash}"
            )
        elif self.seq > recorded.seq:
            found.append(
                f"rows seq {recorded.seq + 1}..{self.seq} were appended after the head the "
                f"head file records (seq {recorded.seq}, hash {recorded.hash}) by something "
                "other than anomscan's writer"
            )
        elif self.hash != recorded.hash:
            found.append(
                f"the last row seq {self.seq} has hash {self.hash}, the head file records "
                f"{recorded.hash}: the chain was rewritten"
            )
        for table in sorted(set(self.rows) | set(recorded.rows)):
            here, there = self.rows.get(table, 0), recorded.rows.get(table, 0)
            if here != there:
                found.append(f"table {table!r} holds {here} rows, the head file records {there}")
        return found


@dataclass(frozen=True)
class HeadFile:
    """What the head file says: the head, and the one before a commit in progress."""

    text: str
    head: ChainHead
    pending_from: ChainHead | None

    def matches(self, log: ChainHead) -> bool:
        """Whether the log ends where the head file says (or where it was before a commit)."""
        return log in (self.head, self.pending_from)


def read_head(path: Path) -> HeadFile | None:
    """The head file of the log at `path`; None when there is none; AuditError when unreadable."""
    where = head_path(path)
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise AuditError(f"cannot read the head file {where}: {error}") from error
    try:
        record = json.loads(text)
        pending = record.get("pending_from")
        return HeadFile(
            text,
            ChainHead.from_record(record),
            None if pending is None else ChainHead.from_record(pending),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AuditError(
            f"the head file {where} is not a head record ({type(error).__name__}: {error}); "
            "it was edited or damaged"
        ) from error


def _read_meta(db: sqlite_utils.Database) -> dict[str, str]:
    if not db[META_TABLE].exists():
        return {}
    return {str(row["name"]): str(row["value"]) for row in db.query(f"select * from {META_TABLE}")}


def _form2_since(meta: Mapping[str, str]) -> int | None:
    """The first seq hashed in form 2 (None: every row is form 1)."""
    form = meta.get("hash_form", str(HASH_FORM))
    if form != str(HASH_FORM):
        raise AuditError(
            f"the audit log is hashed in form {form!r}; this anomscan knows forms 1 and "
            f"{HASH_FORM}: use the anomscan version that wrote it"
        )
    since = meta.get("hash_form_since_seq")
    return None if since is None else int(since)


def _log_head(db: sqlite_utils.Database) -> ChainHead:
    """The head of the log as stored: the highest seq, its hash, the rows per table."""
    best = (0, GENESIS_HASH)
    rows: dict[str, int] = {}
    for table in TABLE_COLUMNS:
        if not db[table].exists():
            continue
        rows[table] = int(next(iter(db.query(f"select count(*) as n from [{table}]")))["n"])
        for row in db.query(f"select seq, hash from [{table}] order by seq desc limit 1"):
            if int(row["seq"]) > best[0]:
                best = (int(row["seq"]), str(row["hash"]))
    return ChainHead(best[0], best[1], {table: n for table, n in rows.items() if n})


class AuditLog:
    """Writer and reader of one run's audit log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite_utils.Database(path)
        except sqlite3.Error as error:
            raise self._error("open", error) from error
        try:
            self._create_tables()
            self._keys = {
                (table, str(row["key"]))
                for table in TABLE_COLUMNS
                for row in self.db.query(f"select key from [{table}]")
            }
            meta = _read_meta(self.db)
            head = _log_head(self.db)
            self._since = _form2_since(meta)
            self._anchor = self._check_head(head)
        except sqlite3.Error as error:
            self.db.close()
            raise self._error("open", error) from error
        except AuditError:
            self.db.close()
            raise
        self._head = head
        self._failed: str | None = None
        self._head_stale = False
        self._pending: list[PendingRow] | None = None

    def _error(self, action: str, error: Exception) -> AuditError:
        return AuditError(
            f"cannot {action} the audit log {self.path}: {error}; make the run folder "
            f"writable (or free disk space), then continue with `anomscan scan --resume "
            f"{self.path.parent}`"
        )

    def _check_head(self, log: ChainHead) -> str | None:
        """Check a reopened log against its head file; the file's SHA-256 (None: no file)."""
        found = read_head(self.path)
        refusal = (
            f"refusing to append to the audit log {self.path}: "
            f"`anomscan audit verify {self.path.parent}` shows what changed"
        )
        if found is None:
            if self._since is not None and log.seq >= self._since:
                raise AuditError(f"the head file {head_path(self.path)} is missing; {refusal}")
            return None
        if not found.matches(log):
            raise AuditError(f"{'; '.join(log.differences(found.head))}; {refusal}")
        return sha256_text(found.text)

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
        """Append one row (queued when in a transaction); False when its key is already logged.

        Every value is stored, and hashed, in the form SQLite gives back (`column_value`).
        """
        columns = TABLE_COLUMNS[table]
        unknown = set(content) - set(columns)
        if unknown:
            raise AuditError(f"audit table {table!r} has no columns {sorted(unknown)}")
        key = storable_text(str(key))
        row = {
            name: column_value(kind, content.get(name), f"{table}.{name} (key {key!r})")
            for name, kind in columns.items()
        }
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
        before = self._head
        seq, last = before.seq, before.hash
        counts = dict(before.rows)
        first = seq + 1
        anchor = self._anchor
        prepared: list[tuple[str, dict[str, Any]]] = []
        for row in rows:
            seq += 1
            content = {"key": row.key, "written_at": round(time.time(), 3), **row.content}
            digest = row_hash(row.table, seq, last, content, anchor if seq == first else None)
            prepared.append((row.table, {"seq": seq, **content, "prev_hash": last, "hash": digest}))
            counts[row.table] = counts.get(row.table, 0) + 1
            last = digest
        after = ChainHead(seq, last, counts)
        meta = (
            []
            if self._since is not None
            else [
                ("hash_form", str(HASH_FORM)),
                ("hash_form_since_seq", str(first)),
            ]
        )
        if anchor is not None:
            meta.append((f"anchor:{first}", anchor))
        if self._failed is not None:
            raise AuditError(
                f"the audit log {self.path} takes no more rows after a failed write "
                f"({self._failed}); continue with `anomscan scan --resume {self.path.parent}`"
            )
        self._write_head(after, pending_from=before)
        try:
            with self.db.conn:
                if meta:
                    self.db.execute(
                        f"create table if not exists {META_TABLE} "
                        "(name text primary key, value text not null)"
                    )
                    self.db.conn.executemany(
                        f"insert into {META_TABLE} (name, value) values (?, ?)", meta
                    )
                for table, record in prepared:
                    # plain SQL: sqlite-utils' insert commits on its own, which would split
                    # the step's transaction into one commit per row
                    columns = ", ".join(f"[{name}]" for name in record)
                    marks = ", ".join("?" for _ in record)
                    self.db.conn.execute(
                        f"insert into [{table}] ({columns}) values ({marks})", list(record.values())
                    )
        except sqlite3.Error as error:
            # SQLite may have made the transaction durable before it failed (a full disk
            # while it ends its journal), or not: the head file, written with both heads,
            # matches either, and this writer writes nothing more (a later commit would
            # stand on a head it can not know).
            self._failed = str(error)
            raise self._error("write", error) from error
        self._head = after
        self._since = first if self._since is None else self._since
        self._anchor = None
        self._keys.update((row.table, row.key) for row in rows)
        self._write_head(after)

    def _write_head(self, head: ChainHead, pending_from: ChainHead | None = None) -> None:
        """Write the head file atomically; before a commit with the head it replaces."""
        record = head.record()
        if pending_from is not None:
            record["pending_from"] = pending_from.record()
        self._head_stale = True
        try:
            write_text(head_path(self.path), json_text(record), what="audit head file")
        except (AnomscanError, OSError) as error:
            raise self._error("write the head file of", error) from error
        self._head_stale = pending_from is not None

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of `table`, in the order written."""
        return list(self.db.query(f"select * from [{table}] order by seq"))

    def close(self) -> None:
        """Close the connection; first rewrite a head file a failed write left pending.

        Best effort: a pending head file still matches the log (the log is at the head or
        at `pending_from`), so a folder that has become unwritable loses nothing here.
        """
        try:
            if self._head_stale and self._failed is None:
                with contextlib.suppress(AuditError):
                    self._write_head(self._head)
        finally:
            self.db.close()


def open_readonly(path: Path) -> sqlite_utils.Database:
    """The log opened for reading only (verify, export, tables never write).

    A scan stopped inside a write (killed, disk full, folder made read-only) leaves a hot
    journal that SQLite must roll back before anyone can read, and a read-only connection
    cannot: then one read-write connection rolls the unfinished transaction back (only
    uncommitted changes are undone; no committed row is touched) and the log is reopened
    read-only. A file that is not an SQLite database is an AuditError.
    """
    if not path.is_file():
        raise AuditError(f"no audit log at {path}; give the run folder of a scan")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        connection.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        connection.close()
        if "readonly" not in str(error):
            raise _unreadable(path, error) from error
        try:
            with contextlib.closing(sqlite3.connect(path)) as recovery:
                recovery.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.DatabaseError as again:
            raise AuditError(
                f"the audit log {path} holds an interrupted write that must be rolled back "
                f"before it can be read, and that failed ({again}); make the run folder "
                "writable and run the command again"
            ) from again
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    return sqlite_utils.Database(connection)


def _unreadable(path: Path, error: Exception) -> AuditError:
    return AuditError(
        f"cannot read the audit log {path} ({error}): it is corrupt, truncated or not an "
        "anomscan audit log; restore it from a copy of the run folder"
    )


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite_utils.Database]:
    """The log opened read-only; a damaged file read inside the block is an AuditError."""
    db = open_readonly(path)
    try:
        yield db
    except sqlite3.DatabaseError as error:
        raise _unreadable(path, error) from error
    finally:
        db.close()


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
    notes: tuple[str, ...] = ()
    """What the check could not cover (a form-1 log has no head anchor)."""

    @property
    def ok(self) -> bool:
        """Whether the chain is intact."""
        return not self.problems


@dataclass(frozen=True)
class _Stored:
    """What verify reads: the rows, the form record, the log's own head."""

    rows: list[tuple[str, dict[str, Any]]]
    missing_tables: list[str]
    meta: dict[str, str]
    head: ChainHead


def _read_log(path: Path) -> _Stored:
    with reading(path) as db:
        missing_tables = [
            table
            for table in TABLE_COLUMNS
            if table not in OPTIONAL_TABLES and not db[table].exists()
        ]
        return _Stored(all_rows(db), missing_tables, _read_meta(db), _log_head(db))


MAX_MOVED_SEARCH = 64
"""Up to this many rows that fail their hash, each is tried at the others' seqs (a swap)."""


class _Chain:
    """Every row checked against its hash in the form it was written in."""

    def __init__(self, rows: Sequence[tuple[str, dict[str, Any]]], meta: Mapping[str, str]):
        self.since = _form2_since(meta)
        self.anchors = {
            int(name.split(":", 1)[1]): value
            for name, value in meta.items()
            if name.startswith("anchor:") and name.split(":", 1)[1].isdigit()
        }
        self.seq_of_hash = {str(row["hash"]): int(row["seq"]) for _, row in rows}
        self.intact = {id(row): self.matches(table, int(row["seq"]), row) for table, row in rows}
        broken = sorted({int(row["seq"]) for _, row in rows if not self.intact[id(row)]})
        self.broken_seqs = broken if len(broken) <= MAX_MOVED_SEARCH else []

    def matches(self, table: str, seq: int, row: Mapping[str, Any]) -> bool:
        """Whether `row` matches its hash were it written at `seq`."""
        if self.since is None or seq < self.since:
            return _form1_matches(table, seq, row)
        try:
            digest = row_hash(
                table, seq, str(row["prev_hash"]), _content(row), self.anchors.get(seq)
            )
        except AuditError:
            return False
        return bool(digest == row["hash"])

    def moved_from(self, table: str, seq: int, row: Mapping[str, Any]) -> int | None:
        """The seq a row that fails its hash was written at, when it was moved intact."""
        prev = str(row["prev_hash"])
        after = 1 if prev == GENESIS_HASH else self.seq_of_hash.get(prev, -1) + 1
        for origin in dict.fromkeys([after, *self.broken_seqs]):
            if origin not in (0, seq) and self.matches(table, origin, row):
                return origin
        return None


def verify(path: Path) -> VerifyReport:
    """Check every row's hash, its link to the previous row, and the head file.

    Names every edited, deleted (a gap, or rows missing at the end), inserted (a seq
    held by more than one row: the genuine one is the one the next row links to), moved
    or swapped, and re-linked row.
    """
    stored = _read_log(path)
    chain = _Chain(stored.rows, stored.meta)
    problems = [f"table {table!r} is missing" for table in stored.missing_tables]
    by_seq: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for table, row in stored.rows:
        by_seq.setdefault(int(row["seq"]), []).append((table, row))
    try:
        head_file = read_head(path)
    except AuditError as error:
        problems.append(str(error))
        head_file = None
    walk = _Walk(chain)
    seqs = sorted(by_seq)
    for index, seq in enumerate(seqs):
        if index + 1 < len(seqs):
            links = {str(row["prev_hash"]) for _, row in by_seq[seqs[index + 1]]}
        else:
            links = set() if head_file is None else {head_file.head.hash}
        problems.extend(walk.step(seq, by_seq[seq], links))
    log_head = ChainHead(walk.previous_seq, walk.expected_prev, stored.head.rows)
    notes: list[str] = []
    if head_file is not None:
        if not head_file.matches(log_head):
            problems.extend(log_head.differences(head_file.head))
    elif chain.since is not None and walk.previous_seq >= chain.since:
        problems.append(
            f"the head file {head_path(path).name} is missing: it records the last row of "
            "this log, so rows at its end may have been deleted"
        )
    elif seqs:
        notes.append(
            "this log was written before the head file existed (hash form 1): rows deleted "
            "at its end can not be detected"
        )
    return VerifyReport(len(stored.rows), tuple(problems), tuple(notes))


class _Walk:
    """The walk along the chain in seq order: what the next row must link to."""

    def __init__(self, chain: _Chain) -> None:
        self.chain = chain
        self.expected_prev = GENESIS_HASH
        self.previous_seq = 0
        self.previous_name = "the start of the log"
        self.previous_intact = True

    def step(
        self, seq: int, here: Sequence[tuple[str, dict[str, Any]]], links: set[str]
    ) -> list[str]:
        """The problems of the rows holding `seq` (`links`: the hashes later rows link to)."""
        problems: list[str] = []
        names = {id(row): f"{table} row seq {seq} (key {row['key']!r})" for table, row in here}
        if seq != self.previous_seq + 1:
            first = names[id(here[0][1])]
            problems.append(
                f"rows seq {self.previous_seq + 1}..{seq - 1} are missing between "
                f"{self.previous_name} and {first}: deleted"
            )
        chosen = _genuine(here, links, self.chain.intact, self.expected_prev)
        if len(here) > 1:
            times = "twice" if len(here) == 2 else f"{len(here)} times"
            reason = (
                "this row does not link"
                if chosen is not None
                else "no later row links to any of them"
            )
            problems.extend(
                f"{names[id(row)]}: seq {seq} appears {times} and {reason}: inserted"
                for _, row in here
                if row is not chosen
            )
        for table, row in here:
            if chosen is None or row is chosen:
                problems.extend(self._row_problems(table, seq, row, names[id(row)]))
        last = chosen if chosen is not None else here[0][1]
        self.expected_prev = str(last["hash"])
        self.previous_seq = seq
        self.previous_name = names[id(last)]
        self.previous_intact = self.chain.intact[id(last)]
        return problems

    def _row_problems(self, table: str, seq: int, row: dict[str, Any], name: str) -> list[str]:
        if not self.chain.intact[id(row)]:
            origin = self.chain.moved_from(table, seq, row)
            if origin is not None:
                return [
                    f"{name}: this row was written as seq {origin} (its hash matches "
                    "there): moved or swapped"
                ]
            return [f"{name}: its content does not match its hash: edited"]
        if (
            row["prev_hash"] != self.expected_prev
            and seq == self.previous_seq + 1
            and self.previous_intact
        ):
            return [
                f"{name}: prev_hash does not match the hash of {self.previous_name}: "
                "inserted or re-linked"
            ]
        return []


def _genuine(
    here: Sequence[tuple[str, dict[str, Any]]],
    links: set[str],
    intact: Mapping[int, bool],
    expected_prev: str,
) -> dict[str, Any] | None:
    """The row of a seq the chain goes on from: the one the next row (or the head) links to.

    When no one row is linked to (the last row without a head file, or the next row
    tampered with too), the one intact row that links to its predecessor.
    """
    if len(here) == 1:
        return here[0][1]
    linked = [row for _, row in here if str(row["hash"]) in links]
    if len(linked) == 1:
        return linked[0]
    pool = linked or [row for _, row in here]
    chained = [row for row in pool if intact[id(row)] and row["prev_hash"] == expected_prev]
    return chained[0] if len(chained) == 1 else None


def export_jsonl(path: Path, output: Path) -> int:
    """Write every row as one JSON object per line (with its `table`); returns the count."""
    with reading(path) as db:
        rows = all_rows(db)
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
    with reading(path) as db:
        rows = list(db.query("select * from decisions order by seq"))
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
    with reading(path) as db:
        return list(db.query("select * from tool_calls order by seq"))


def annotate(path: Path, decision_seq: int, verdict: str, note: str, by: str) -> dict[str, Any]:
    """Append a reviewer's verdict on the decision with this seq to the chain; the new row.

    The decision itself is never changed: the annotation is a row of its own, linked by
    `decision_seq`, hashed into the chain like every other row (verify still passes).
    """
    if verdict not in VERDICTS:
        raise AuditError(f"verdict {verdict!r}: expected one of {list(VERDICTS)}")
    if not by.strip():
        raise AuditError("an annotation needs the reviewer's name: give --by NAME")
    with reading(path) as reader:
        found = list(reader.query("select seq from decisions where seq = ?", [decision_seq]))
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
