"""The audit log: hash-chained rows across tables, idempotent per key, atomic per step,
and `verify` names an edited, deleted or inserted row."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.runtime.audit import (
    TABLE_COLUMNS,
    AuditError,
    AuditLog,
    annotate,
    export_jsonl,
    head_path,
    row_hash,
    verify,
)


def _log(path: Path) -> AuditLog:
    log = AuditLog(path)
    with log.transaction():
        log.add("runs", "run:start:0", run_id="r", event="start", config={"seed": 1}, seed=1)
        for i in range(5):
            log.add(
                "decisions",
                f"0001-step:background:T{i}/jj",
                step_id="0001-step",
                kind="background",
                spectrum=f"T{i}/jj",
                point_pb=1,
                chosen="p4",
                options=[{"function": "p4", "passed": True}],
                rationale="first passing",
            )
        log.add(
            "tool_calls",
            "0001-step:bump_hunt:T1/jj",
            tool="bump_hunt",
            input={"a": [1]},
            seconds=0.5,
            replayable=True,
        )
    return log


def test_chain_is_intact_and_keys_are_written_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = _log(path)
    assert not log.add("decisions", "0001-step:background:T1/jj", kind="background")
    log.close()
    again = AuditLog(path)  # a resumed scan opens the same log
    assert not again.add("decisions", "0001-step:background:T1/jj", kind="background")
    assert again.add("decisions", "0002-step:refine:-", kind="refine", chosen=[0.3])
    again.close()
    report = verify(path)
    assert report.ok, report.problems
    assert report.n_rows == 8
    with sqlite3.connect(path) as db:
        seqs = sorted(
            row[0]
            for table in ("runs", "decisions", "tool_calls")
            for row in db.execute(f"select seq from {table}")
        )
    assert seqs == list(range(1, 9))


def test_a_failed_step_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = _log(path)

    def killed_mid_step() -> None:
        with log.transaction():
            log.add("decisions", "0002-step:refine:-", kind="refine")
            raise RuntimeError("killed mid-step")

    with pytest.raises(RuntimeError):
        killed_mid_step()
    assert not log.has("decisions", "0002-step:refine:-")
    log.close()
    assert verify(path).ok and verify(path).n_rows == 7


def test_a_step_whose_commit_fails_half_way_leaves_none_of_its_rows(tmp_path: Path) -> None:
    """One transaction per step: SQLite refusing the third row of a step (a trigger here,
    a full disk in a scan) leaves none of its rows, the head file matches, the writer
    takes no more rows, and the log verifies."""
    path = tmp_path / "audit.sqlite"
    log = _log(path)
    before = verify(path).n_rows
    log.db.execute(
        "create trigger refuse before insert on fits when new.key = 'poison' "
        "begin select raise(abort, 'disk full (simulated)'); end"
    )

    def step() -> None:
        with log.transaction():
            log.add("decisions", "0009-step:a", kind="refine")
            log.add("steps", "0009-step", node="assess")
            log.add("fits", "poison", spectrum="T1/jj")

    with pytest.raises(AuditError, match="disk full"):
        step()
    with pytest.raises(AuditError, match="no more rows"):
        log.add("decisions", "0010-step:a", kind="refine")
    log.close()
    with sqlite3.connect(path) as db:
        db.execute("drop trigger refuse")
    report = verify(path)
    assert report.ok, report.problems
    assert report.n_rows == before


@pytest.mark.tampers_audit
@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("update decisions set chosen = '\"p6\"' where seq = 4", "decisions row seq 4"),
        ("delete from decisions where seq = 4", "rows seq 4..4 are missing"),
        (
            "insert into tool_calls (seq, key, tool, prev_hash, hash) "
            "select 4, 'forged', 'bump_hunt', prev_hash, hash from decisions where seq = 4",
            "tool_calls row seq 4 (key 'forged'): seq 4 appears twice",
        ),
        ("update runs set hash = 'x' where seq = 1", "runs row seq 1"),
    ],
)
def test_verify_names_the_tampered_row(tmp_path: Path, statement: str, expected: str) -> None:
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    with sqlite3.connect(path) as db:
        db.execute(statement)
    report = verify(path)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_export_writes_every_row_in_chain_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    n_rows = export_jsonl(path, tmp_path / "audit.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert n_rows == len(rows) == 7
    assert [row["seq"] for row in rows] == list(range(1, 8))
    assert rows[0]["table"] == "runs"
    assert json.loads(rows[1]["options"]) == [{"function": "p4", "passed": True}]


def test_unknown_column_and_missing_log_are_errors(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite")
    with pytest.raises(AuditError, match="no columns"):
        log.add("decisions", "k", colour="red")
    log.close()
    with pytest.raises(AuditError, match="no audit log"):
        verify(tmp_path / "elsewhere.sqlite")


def test_verify_reads_a_log_left_inside_a_write(tmp_path: Path) -> None:
    # A writer killed inside a transaction large enough to spill pages into the file
    # leaves a hot journal; a read-only connection cannot roll it back ("attempt to write
    # a readonly database", exit 1 in CI). verify rolls it back and sees the committed rows.
    import subprocess
    import sys

    path = tmp_path / "audit.sqlite"
    _log(path).close()
    before = verify(path)
    writer = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "c.execute('pragma cache_size=1')\n"
        "c.execute('begin')\n"
        "for i in range(2000):\n"
        "    key = str(i) + 'x' * 500\n"
        "    c.execute('insert into runs (seq, key) values (?, ?)', (10**6 + i, key))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
    assert path.with_name("audit.sqlite-journal").exists()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select * from runs").fetchall()
    report = verify(path)
    assert report.ok, report.problems
    assert report.n_rows == before.n_rows


# The canonical form: whatever a row holds, the log verifies untouched, and one tampered
# row is named. Values are chosen where storage and writing differ: -0.0, ints in REAL
# columns and integral floats in INTEGER ones, NaN and infinities, subnormals, numpy
# scalars, ints beyond JSON's and SQLite's ranges, nested JSON with all of these.

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, 1e308, -1e308, 5e-324, -5e-324, 2.0**63, 0.1]),
)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(
    st.one_of(st.characters(exclude_categories=["Cs"]), st.characters(categories=["Cs"])),
    max_size=12,
)
"""Any text, with unpaired surrogates (a model's reply may carry one; UTF-8 can not)."""
NUMPY = st.one_of(
    st.floats(width=32).map(np.float32),
    INT64.map(np.int64),
    st.integers(-(2**31), 2**31 - 1).map(np.int32),
    st.booleans().map(np.bool_),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), FLOATS, TEXT, NUMPY),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(TEXT, inner, max_size=3),
    ),
    max_leaves=8,
)
COLUMN_VALUES: dict[type, st.SearchStrategy[Any]] = {
    float: st.one_of(st.none(), FLOATS, st.integers(-(2**70), 2**70), st.booleans(), NUMPY),
    int: st.one_of(
        st.none(),
        INT64,
        st.booleans(),
        st.integers(-(2**53), 2**53).map(float),
        st.just(-0.0),
        INT64.map(np.int64),
        st.integers(-(2**31), 2**31 - 1).map(np.int32),
    ),
    str: st.one_of(st.none(), TEXT, JSON),
}
ROWS = st.lists(
    st.sampled_from(sorted(TABLE_COLUMNS)).flatmap(
        lambda table: st.tuples(
            st.just(table),
            st.fixed_dictionaries(
                {},
                optional={name: COLUMN_VALUES[kind] for name, kind in TABLE_COLUMNS[table].items()},
            ),
        )
    ),
    min_size=2,
    max_size=7,
)
TAMPERING = ("edit", "delete", "insert", "swap")


def _write(path: Path, rows: list[tuple[str, dict[str, Any]]], reopen_at: int) -> None:
    """Rows k0, k1, ... at seq 1, 2, ...: one transaction, close, reopen, the rest."""
    keyed = [(f"k{index}", table, content) for index, (table, content) in enumerate(rows)]
    for part in (keyed[:reopen_at], keyed[reopen_at:]):
        log = AuditLog(path)
        with log.transaction():
            for key, table, content in part:
                assert log.add(table, key, **content)
        log.close()


def _tamper(path: Path, how: str, data: st.DataObject) -> str:
    """Apply one tampering to the log; the text verify must report."""
    with sqlite3.connect(path) as db:
        tables = {
            seq: table
            for table in TABLE_COLUMNS
            for (seq,) in db.execute(f"select seq from [{table}]")
        }
        n = len(tables)
        first = data.draw(st.integers(1, n), label="seq")
        table = tables[first]
        key = db.execute(f"select key from [{table}] where seq = ?", (first,)).fetchone()[0]
        if how == "edit":
            db.execute(f"update [{table}] set written_at = written_at + 1 where seq = ?", (first,))
            return f"{table} row seq {first} (key {key!r}): its content does not match its hash"
        if how == "delete":
            db.execute(f"delete from [{table}] where seq = ?", (first,))
            if first == n:
                return f"rows after seq {n - 1} were deleted: the head file records seq {n}"
            return f"rows seq {first}..{first} are missing"
        if how == "insert":
            other = data.draw(st.sampled_from(sorted(set(TABLE_COLUMNS) - {table})))
            prev = db.execute(f"select prev_hash from [{table}] where seq = ?", (first,))
            prev_hash = prev.fetchone()[0]
            content = {"key": "forged", "written_at": 1.0} | dict.fromkeys(TABLE_COLUMNS[other])
            anchor = [a for (a,) in db.execute(META_ANCHOR, (f"anchor:{first}",))]
            digest = row_hash(other, first, prev_hash, content, *anchor)
            record = {"seq": first, **content, "prev_hash": prev_hash, "hash": digest}
            db.execute(
                f"insert into [{other}] ({', '.join(record)}) "
                f"values ({', '.join('?' * len(record))})",
                list(record.values()),
            )
            return f"{other} row seq {first} (key 'forged'): seq {first} appears twice"
        others = [seq for seq in range(1, n + 1) if seq != first]
        second = data.draw(st.sampled_from(others), label="second")
        low, high = sorted((first, second))
        low_table, high_table = tables[low], tables[high]
        high_key = db.execute(f"select key from [{high_table}] where seq = ?", (high,))
        db.execute(f"update [{low_table}] set seq = -1 where seq = ?", (low,))
        db.execute(f"update [{high_table}] set seq = ? where seq = ?", (low, high))
        db.execute(f"update [{low_table}] set seq = ? where seq = -1", (high,))
        return (
            f"{high_table} row seq {low} (key {high_key.fetchone()[0]!r}): this row was written "
            f"as seq {high}"
        )


META_ANCHOR = "select value from audit_meta where name = ?"
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
"""Memory-backed scratch folder where there is one: a new log's 18 commits are slow on disk."""


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ROWS, reopen=st.integers(0, 7), how=st.sampled_from(TAMPERING), data=st.data())
def test_any_row_verifies_untouched_and_one_tampered_row_is_named(
    rows: list[tuple[str, dict[str, Any]]], reopen: int, how: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        path = Path(folder) / "audit.sqlite"
        _write(path, rows, min(reopen, len(rows)))
        report = verify(path)
        assert report.ok, report.problems
        assert report.n_rows == len(rows)
        expected = _tamper(path, how, data)
        report = verify(path)
        assert not report.ok
        assert any(expected in problem for problem in report.problems), report.problems


def test_values_are_stored_and_hashed_as_sqlite_gives_them_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    log.add(
        "bumps",
        "b",
        global_z=-0.0,
        local_p=math.nan,
        background=math.inf,
        data=np.float32(0.1),
        window_lo=2,
        spectrum="half a pair \ud800",
    )
    log.add(
        "fits",
        "f",
        ndf=np.int64(3),
        passed=True,
        p_value=np.float64(-0.0),
        parameters={
            "a": -0.0,
            "n": math.nan,
            "i": -math.inf,
            "big": 2**60,
            "t": (1, np.float32(0.5)),
            "v": np.array([[-0.0, 2.5]]),
            1: "x",
        },
        fit_range=[np.float32(2.0), 1e308],
    )
    log.close()
    reader = AuditLog(path)
    bump, fit = reader.rows("bumps")[0], reader.rows("fits")[0]
    reader.close()
    assert math.copysign(1.0, bump["global_z"]) == 1.0 and bump["global_z"] == 0.0
    assert bump["local_p"] is None and bump["background"] == math.inf
    assert bump["data"] == float(np.float32(0.1)) and bump["window_lo"] == 2.0
    assert bump["spectrum"] == "half a pair \\ud800"
    assert (fit["ndf"], fit["passed"], fit["p_value"]) == (3, 1, 0.0)
    assert fit["parameters"] == (
        '{"1":"x","a":0,"big":"1152921504606846976","i":"-Infinity","n":"NaN","t":[1,0.5],"v":[[0,2.5]]}'
    )
    assert fit["fit_range"] == "[2,1e+308]"
    assert verify(path).ok


@pytest.mark.parametrize(
    ("table", "content", "message"),
    [
        ("fits", {"ndf": 2**63}, "outside SQLite's 64-bit integers"),
        ("fits", {"ndf": 2.5}, "is not an integer"),
        ("fits", {"ndf": math.inf}, "is not an integer"),
        ("bumps", {"data": 10**400}, "is not a float64 number"),
        ("decisions", {"numbers": {1: "a", "1": "b"}}, "two keys of a mapping"),
    ],
)
def test_values_sqlite_can_not_hold_are_refused(
    tmp_path: Path, table: str, content: dict[str, Any], message: str
) -> None:
    log = AuditLog(tmp_path / "audit.sqlite")
    with pytest.raises(AuditError, match=message):
        log.add(table, "k", **content)
    log.close()


@pytest.mark.tampers_audit
def test_the_head_file_anchors_the_chain_and_a_reopening_writer_checks_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    head = json.loads(head_path(path).read_text())
    assert (head["seq"], head["total"]) == (7, 7)
    assert head["rows"] == {"decisions": 5, "runs": 1, "tool_calls": 1}
    text = head_path(path).read_text()

    log = AuditLog(path)  # reopened: the head file's hash is bound into the next row
    log.add("annotations", "a", decision_seq=2, verdict="agree", by="me")
    log.close()
    with sqlite3.connect(path) as db:
        anchors = dict(db.execute("select name, value from audit_meta where name like 'anchor:%'"))
    assert anchors == {"anchor:8": hashlib.sha256(text.encode()).hexdigest()}
    assert verify(path).ok

    with sqlite3.connect(path) as db:
        db.execute("delete from annotations where seq = 8")
    with pytest.raises(
        AuditError, match="rows after seq 7 were deleted: the head file records seq 8"
    ):
        AuditLog(path)
    assert "rows after seq 7 were deleted" in verify(path).problems[0]

    head_path(path).unlink()
    with pytest.raises(AuditError, match=r"the head file .* is missing; refusing to append"):
        AuditLog(path)
    assert any("audit.head.json is missing" in problem for problem in verify(path).problems)


def test_a_writer_killed_between_head_and_commit_leaves_a_log_that_verifies(
    tmp_path: Path,
) -> None:
    """The head file is written before each commit with the head it replaces."""
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    committed = json.loads(head_path(path).read_text())
    head_path(path).write_text(
        json.dumps(
            {"seq": 9, "hash": "f" * 64, "rows": {"runs": 3}, "total": 3}
            | {"pending_from": committed}
        )
    )
    assert verify(path).ok
    log = AuditLog(path)
    log.add("runs", "run:resume:1", event="resume")
    log.close()
    assert verify(path).ok
    assert "pending_from" not in json.loads(head_path(path).read_text())


@pytest.mark.tampers_audit
def test_a_log_of_an_unknown_hash_form_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    with sqlite3.connect(path) as db:
        db.execute("update audit_meta set value = '3' where name = 'hash_form'")
    with pytest.raises(AuditError, match="hashed in form '3'; this anomscan knows forms 1 and 2"):
        verify(path)
    with pytest.raises(AuditError, match="hashed in form '3'"):
        AuditLog(path)


@pytest.mark.tampers_audit
def test_annotate_appends_an_anchored_row_and_refuses_a_truncated_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    row = annotate(path, 3, "question", "why p4?", "reviewer")
    assert (row["seq"], row["decision_seq"], row["verdict"]) == (8, 3, "question")
    assert verify(path).ok
    with sqlite3.connect(path) as db:
        db.execute("delete from annotations where seq = 8")
    with pytest.raises(AuditError, match="rows after seq 7 were deleted"):
        annotate(path, 3, "agree", "", "reviewer")


@pytest.mark.tampers_audit
def test_a_row_appended_behind_the_writers_back_is_reported(tmp_path: Path) -> None:
    """Linked and hashed correctly, but the head file does not know it."""
    path = tmp_path / "audit.sqlite"
    _log(path).close()
    with sqlite3.connect(path) as db:
        (last,) = db.execute("select hash from tool_calls where seq = 7").fetchone()
        content = {"key": "late", "written_at": 1.0} | dict.fromkeys(TABLE_COLUMNS["runs"])
        record = {
            "seq": 8,
            **content,
            "prev_hash": last,
            "hash": row_hash("runs", 8, last, content),
        }
        db.execute(
            f"insert into runs ({', '.join(record)}) values ({', '.join('?' * len(record))})",
            list(record.values()),
        )
    problems = verify(path).problems
    assert problems[0].startswith("rows seq 8..8 were appended after the head"), problems
    with pytest.raises(AuditError, match=r"rows seq 8\.\.8 were appended"):
        AuditLog(path)
