"""The audit log: hash-chained rows across tables, idempotent per key, atomic per step,
and `verify` names an edited, deleted or inserted row."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.audit import AuditError, AuditLog, export_jsonl, verify


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
