"""`anomscan audit verify` on tampered logs, through the real command line: every edited,
deleted, inserted, swapped or re-linked row is named and the exit status is 1; a damaged
file exits 2 with one line; an untouched log exits 0, whatever values its rows hold."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlite_utils

from agent.runtime.audit import GENESIS_HASH, TABLE_COLUMNS, AuditLog, head_path, row_hash, verify
from tests.agent.conftest import run_cli

pytestmark = pytest.mark.tampers_audit
"""Each test breaks a copy of the log in its tmp_path (the module's own log stays intact)."""

TABLES = sorted(TABLE_COLUMNS)
ROUNDS = 3
N_ROWS = ROUNDS * len(TABLES)
REOPENED_AT = N_ROWS // 3 + 1
"""The first row the second writer appended (its hash binds the head file it found)."""

SAMPLE: dict[type, list[Any]] = {
    float: [-0.0, 1, np.float32(0.1), math.nan, math.inf, 5e-324],
    int: [np.int64(7), True, 3.0, 2**62],
    str: ["text \ud800", {"z": -0.0, "nested": [np.float32(1.5), (1, 2)]}, None],
}


def _content(table: str, round_: int) -> dict[str, Any]:
    """Values that differ between writing and reading unless normalised (-0.0, NaN, ...)."""
    return {
        name: SAMPLE[kind][(round_ + index) % len(SAMPLE[kind])]
        for index, (name, kind) in enumerate(TABLE_COLUMNS[table].items())
    }


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose log holds 3 rows of every table, by two writers (one reopened)."""
    run = tmp_path_factory.mktemp("tamper") / "run"
    run.mkdir()
    rows = [(table, round_) for round_ in range(ROUNDS) for table in TABLES]
    for part in (rows[: REOPENED_AT - 1], rows[REOPENED_AT - 1 :]):
        log = AuditLog(run / "audit.sqlite")
        with log.transaction():
            for table, round_ in part:
                log.add(table, f"{table}:{round_}", **_content(table, round_))
        log.close()
    return run


def _tables(db: sqlite3.Connection) -> dict[int, str]:
    return {seq: table for table in TABLES for (seq,) in db.execute(f"select seq from [{table}]")}


def _key(db: sqlite3.Connection, seq: int) -> str:
    table = _tables(db)[seq]
    return str(db.execute(f"select key from [{table}] where seq = ?", (seq,)).fetchone()[0])


def _row(db: sqlite3.Connection, table: str, seq: int) -> dict[str, Any]:
    cursor = db.execute(f"select * from [{table}] where seq = ?", (seq,))
    names = [column[0] for column in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


def _rehash(db: sqlite3.Connection, first: int, prev: str) -> None:
    """Recompute prev_hash and hash of every row from seq `first` on (a forger's rewrite)."""
    tables = _tables(db)
    for seq in sorted(s for s in tables if s >= first):
        row = _row(db, tables[seq], seq)
        content = {k: v for k, v in row.items() if k not in ("seq", "prev_hash", "hash")}
        digest = row_hash(tables[seq], seq, prev, content)
        db.execute(
            f"update [{tables[seq]}] set prev_hash = ?, hash = ? where seq = ?",
            (prev, digest, seq),
        )
        prev = digest


def _insert_forged(db: sqlite3.Connection, table: str, seq: int) -> None:
    """A self-consistent row in `table` at `seq`: linked to seq - 1 and hashed correctly."""
    tables = _tables(db)
    prev = _row(db, tables[seq - 1], seq - 1)["hash"] if seq > 1 else GENESIS_HASH
    content = {"key": "forged", "written_at": 1.0} | dict.fromkeys(TABLE_COLUMNS[table])
    record = {"seq": seq, **content, "prev_hash": prev, "hash": row_hash(table, seq, prev, content)}
    db.execute(
        f"insert into [{table}] ({', '.join(record)}) values ({', '.join('?' * len(record))})",
        list(record.values()),
    )


def _middle_seq_outside(db: sqlite3.Connection, table: str) -> int:
    """A seq past the reopening, held by a row of another table."""
    tables = _tables(db)
    return next(s for s in sorted(tables) if s > REOPENED_AT + 1 and tables[s] != table)


def _tampered(
    logged: Path, tmp_path: Path, tamper: Callable[[sqlite3.Connection], str]
) -> tuple[Path, str]:
    run = tmp_path / "run"
    shutil.copytree(logged, run)
    with sqlite3.connect(run / "audit.sqlite") as db:
        expected = tamper(db)
    return run, expected


def _verify_names(run: Path, expected: str) -> str:
    done = run_cli("audit", "verify", str(run))
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert expected in done.stdout, done.stdout
    assert not done.stderr
    return done.stdout


def test_the_untouched_log_verifies(logged: Path) -> None:
    done = run_cli("audit", "verify", str(logged))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{N_ROWS} rows, hash chain intact" in done.stdout


def _edit(db: sqlite3.Connection) -> str:
    seq = next(s for s, t in sorted(_tables(db).items()) if t == "decisions" and s > 1)
    db.execute("update decisions set chosen = '\"p6\"' where seq = ?", (seq,))
    key = _key(db, seq)
    return f"decisions row seq {seq} (key {key!r}): its content does not match its hash: edited"


def _delete(seq: Callable[[sqlite3.Connection], int]) -> Callable[[sqlite3.Connection], str]:
    def tamper(db: sqlite3.Connection) -> str:
        target = seq(db)
        db.execute(f"delete from [{_tables(db)[target]}] where seq = ?", (target,))
        if target == N_ROWS:
            return f"rows after seq {N_ROWS - 1} were deleted: the head file records seq {N_ROWS}"
        before = "the start of the log" if target == 1 else ""
        return f"rows seq {target}..{target} are missing between {before}"

    return tamper


def _truncate(db: sqlite3.Connection) -> str:
    for table in TABLES:
        db.execute(f"delete from [{table}] where seq > ?", (N_ROWS - 4,))
    return f"rows after seq {N_ROWS - 4} were deleted: the head file records seq {N_ROWS}, hash"


def _swap(db: sqlite3.Connection) -> str:
    first, second = [s for s, t in sorted(_tables(db).items()) if t == "fits"][:2]
    key = _key(db, second)
    db.execute("update fits set seq = -1 where seq = ?", (first,))
    db.execute("update fits set seq = ? where seq = ?", (first, second))
    db.execute("update fits set seq = ? where seq = -1", (second,))
    return f"fits row seq {first} (key {key!r}): this row was written as seq {second}"


def _relink(db: sqlite3.Connection) -> str:
    seq = REOPENED_AT + 3
    table = _tables(db)[seq]
    row = _row(db, table, seq)
    content = {k: v for k, v in row.items() if k not in ("seq", "prev_hash", "hash")}
    forged_prev = "1" * 64
    db.execute(
        f"update [{table}] set prev_hash = ?, hash = ? where seq = ?",
        (forged_prev, row_hash(table, seq, forged_prev, content), seq),
    )
    return f"{table} row seq {seq} (key {row['key']!r}): prev_hash does not match the hash of"


def _rehash_after_deleting(renumber: bool) -> Callable[[sqlite3.Connection], str]:
    def tamper(db: sqlite3.Connection) -> str:
        gone = N_ROWS - 5
        tables = _tables(db)
        db.execute(f"delete from [{tables[gone]}] where seq = ?", (gone,))
        if renumber:
            for seq in range(gone + 1, N_ROWS + 1):
                db.execute(f"update [{tables[seq]}] set seq = ? where seq = ?", (seq - 1, seq))
        previous = _row(db, tables[gone - 1], gone - 1)["hash"]
        _rehash(db, gone if renumber else gone + 1, previous)
        if renumber:
            return f"rows after seq {N_ROWS - 1} were deleted: the head file records seq {N_ROWS}"
        return f"rows seq {gone}..{gone} are missing"

    return tamper


@pytest.mark.parametrize(
    "tamper",
    [
        _edit,
        _delete(lambda db: 1),
        _delete(lambda db: N_ROWS // 2),
        _delete(lambda db: N_ROWS),
        _truncate,
        _swap,
        _relink,
        _rehash_after_deleting(renumber=True),
        _rehash_after_deleting(renumber=False),
    ],
    ids=[
        "edit",
        "delete-first",
        "delete-middle",
        "delete-last",
        "truncate-tail",
        "swap",
        "relink",
        "rehash-renumbered-after-deletion",
        "rehash-after-deletion",
    ],
)
def test_verify_names_the_tampered_row(
    logged: Path, tmp_path: Path, tamper: Callable[[sqlite3.Connection], str]
) -> None:
    run, expected = _tampered(logged, tmp_path, tamper)
    _verify_names(run, expected)


def test_a_rewritten_chain_after_a_deletion_is_caught_by_the_head_alone(
    logged: Path, tmp_path: Path
) -> None:
    """Renumbered and rehashed: the chain itself is consistent, only the head file differs."""
    run, expected = _tampered(logged, tmp_path, _rehash_after_deleting(renumber=True))
    stdout = _verify_names(run, expected)
    assert "missing" not in stdout and "edited" not in stdout


@pytest.mark.parametrize("table", TABLES)
def test_verify_names_a_self_consistent_row_inserted_with_a_duplicated_seq(
    logged: Path, tmp_path: Path, table: str
) -> None:
    genuine: list[str] = []

    def tamper(db: sqlite3.Connection) -> str:
        seq = _middle_seq_outside(db, table)
        genuine.append(f"{_tables(db)[seq]} row seq {seq}")
        _insert_forged(db, table, seq)
        return (
            f"{table} row seq {seq} (key 'forged'): seq {seq} appears twice and this row "
            "does not link: inserted"
        )

    run, expected = _tampered(logged, tmp_path, tamper)
    stdout = _verify_names(run, expected)
    assert genuine[0] not in stdout, "the genuine row was named"


def test_verify_names_a_row_inserted_at_the_last_seq_by_the_head_file(
    logged: Path, tmp_path: Path
) -> None:
    def tamper(db: sqlite3.Connection) -> str:
        table = next(t for t in TABLES if t != _tables(db)[N_ROWS])
        _insert_forged(db, table, N_ROWS)
        return (
            f"{table} row seq {N_ROWS} (key 'forged'): seq {N_ROWS} appears twice and this "
            "row does not link"
        )

    run, expected = _tampered(logged, tmp_path, tamper)
    _verify_names(run, expected)


def test_an_edited_or_missing_head_file_is_reported(logged: Path, tmp_path: Path) -> None:
    run, _ = _tampered(logged, tmp_path, lambda db: "")
    head_path(run / "audit.sqlite").write_text("{not json")
    _verify_names(run, "is not a head record")
    head_path(run / "audit.sqlite").unlink()
    _verify_names(run, "the head file audit.head.json is missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_log_exits_2_with_one_line(logged: Path, tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(logged, run)
    path = run / "audit.sqlite"
    data = path.read_bytes()
    path.write_bytes(b"not a database " * 100 if damage == "garbage" else data[: len(data) // 2])
    done = run_cli("audit", "verify", str(run))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot read the audit log" in done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_a_form1_log_verifies_or_is_named_never_falsely_edited(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _write_form1_log(run / "audit.sqlite")
    done = run_cli("audit", "verify", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hash chain intact" in done.stdout and "edited" not in done.stdout
    assert "hash form 1" in done.stdout


def _write_form1_log(path: Path) -> None:
    """A log as anomscan wrote it before hash form 2 (no audit_meta, no head file)."""
    db = sqlite_utils.Database(path)
    for table, columns in TABLE_COLUMNS.items():
        db[table].create(  # type: ignore[union-attr]
            {"seq": int, "key": str, "written_at": float, **columns}
            | {"prev_hash": str, "hash": str},
            pk="seq",
        )
    rows = [
        ("runs", {"run_id": "r", "event": "start", "config": '{"seed":1}', "seed": 1}),
        ("bumps", {"spectrum": "T1/jj", "global_z": -0.0, "local_p": math.nan, "data": 3.0}),
        ("fits", {"spectrum": "T1/jj", "p_value": math.nan, "chi2": -0.0, "ndf": 4}),
        ("decisions", {"kind": "background", "chosen": "p4", "point_pb": 1.0}),
    ]
    last = "0" * 64
    for seq, (table, values) in enumerate(rows, start=1):
        content = {"key": f"k{seq}", "written_at": 1.5} | {
            name: values.get(name) for name in TABLE_COLUMNS[table]
        }
        text = json.dumps([table, seq, last, content], sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        db[table].insert({"seq": seq, **content, "prev_hash": last, "hash": digest})  # type: ignore[union-attr]
        last = digest
    db.close()


def test_a_form1_log_verifies_with_its_own_rule_and_takes_form2_rows(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    _write_form1_log(path)
    report = verify(path)
    assert report.ok, report.problems
    assert "hash form 1" in report.notes[0]

    log = AuditLog(path)  # a resumed old run: its new rows are form 2, anchored
    log.add("bumps", "new", global_z=-0.0)
    log.close()
    report = verify(path)
    assert report.ok and report.n_rows == 5 and not report.notes, report
    with sqlite3.connect(path) as db:
        db.execute("update fits set ndf = 5 where seq = 3")
    assert verify(path).problems == (
        "fits row seq 3 (key 'k3'): its content does not match its hash: edited",
    )
