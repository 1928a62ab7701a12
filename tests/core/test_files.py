"""Atomic files and committed folders: a reader sees the old or the new output, never a mix."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInputError, OutputError, OutputInUseError
from core.files import (
    MANIFEST_NAME,
    atomic_path,
    check_regular_file,
    committed_folder,
    exclusive_output,
    json_text,
    read_manifest,
    recover_folder,
    write_bytes,
    write_json,
)


def test_failed_writer_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.npz"
    write_bytes(target, b"old")

    def killed_writer() -> None:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_writer()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_temporary_keeps_suffix_and_is_unique(tmp_path):
    target = tmp_path / "x.npz"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        assert first.suffix == ".npz"
        np.savez(first, a=np.arange(3))
        np.savez(second, a=np.arange(4))
    assert len(np.load(target)["a"]) == 3  # the first to finish renames last here


def _writer(args: tuple[str, int]) -> int:
    path, value = args
    for _ in range(30):
        with atomic_path(path) as temporary:
            np.savez(temporary, a=np.full(20_000, value))
    return value


def test_concurrent_writers_never_corrupt(tmp_path):
    target = tmp_path / "shared.npz"
    # spawn, not fork: a Ray session earlier in this process leaves gRPC threads behind,
    # and a child forked from them hung (a worker died holding the pool's queue lock)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert sorted(pool.map(_writer, [(str(target), 1), (str(target), 2)])) == [1, 2]
    values = np.load(target)["a"]
    assert len(set(values.tolist())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.npz"]


@pytest.mark.parametrize("case", ["missing_folder", "is_folder"])
def test_unwritable_targets_are_input_errors(tmp_path, case):
    target = tmp_path / "nope" / "x.json" if case == "missing_folder" else tmp_path
    with pytest.raises(InvalidInputError, match="cannot write"):
        write_json(target, {"a": 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_never_holds_nan_or_infinity(tmp_path, value):
    with pytest.raises(OutputError, match=r"\$\.a\[1\]"):
        json_text({"a": [1.0, value]})
    with pytest.raises(OutputError):
        write_json(tmp_path / "x.json", {"v": value})
    assert not (tmp_path / "x.json").exists()


def test_committed_folder_replaces_all_files_at_once(tmp_path):
    target = tmp_path / "sample"
    with committed_folder(target) as staging:
        for name in ("a.root", "b.root", "c.root"):
            (staging / name).write_text(name)
    assert sorted(read_manifest(target)["files"]) == ["a.root", "b.root", "c.root"]
    with committed_folder(target, info={"seed": 2}) as staging:
        (staging / "a.root").write_text("new")
        assert (target / "c.root").read_text() == "c.root"  # old state whole until commit
    assert sorted(p.name for p in target.iterdir()) == ["a.root", MANIFEST_NAME]
    assert read_manifest(target)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]


def test_failed_commit_keeps_previous_folder(tmp_path):
    target = tmp_path / "sample"
    with committed_folder(target) as staging:
        (staging / "a.root").write_text("old")

    def killed_writer() -> None:
        with committed_folder(target) as staging:
            (staging / "a.root").write_text("half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_writer()
    assert (target / "a.root").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(InvalidInputError, match="did not write"), committed_folder(tmp_path):
        pass
    assert (tmp_path / "mine.txt").read_text() == "user data"
    file_target = tmp_path / "mine.txt"
    with pytest.raises(InvalidInputError, match="is a file"), committed_folder(file_target):
        pass


def test_interrupted_swap_is_rolled_back(tmp_path):
    target = tmp_path / "sample"
    with committed_folder(target) as staging:
        (staging / "a.root").write_text("old")
    old = tmp_path / ".anomscan-old-999-abc-sample"
    target.rename(old)  # killed between the two renames of the fallback swap
    recover_folder(target)
    assert (target / "a.root").read_text() == "old"
    assert json.loads((target / MANIFEST_NAME).read_text())["files"]["a.root"]["bytes"] == 3


def test_dead_writers_staging_is_cleaned(tmp_path):
    target = tmp_path / "sample"
    stale = tmp_path / f".anomscan-tmp-{2**22 + 12345}-abc-sample"
    stale.mkdir()
    (stale / "x").write_text("x")
    recover_folder(target)
    assert not stale.exists()
    assert not Path(target).exists()


# --------------------------------------------------------------- one writer per output


def _hold_lock(path: str, ready, release) -> None:  # runs in a child process
    with exclusive_output(path, what="NPZ output"):
        ready.set()
        release.wait(30)


def test_second_writer_of_an_output_is_refused_while_the_first_holds_it(tmp_path):
    target = tmp_path / "rmm.npz"
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(target), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with (
            pytest.raises(OutputInUseError, match=r"rmm\.npz is being written by another"),
            exclusive_output(target, what="NPZ output"),
        ):
            pass
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    with exclusive_output(target) as locked:  # released: the next writer gets it
        assert locked == target
        assert (tmp_path / "rmm.npz.lock").exists()
    assert not (tmp_path / "rmm.npz.lock").exists()


def test_lock_of_a_killed_writer_is_released(tmp_path):
    target = tmp_path / "table.parquet"
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(target), ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(30)
    assert (tmp_path / "table.parquet.lock").read_text().strip() == str(holder.pid)
    with exclusive_output(target):  # the kernel dropped the dead writer's flock
        assert (tmp_path / "table.parquet.lock").read_text() == f"{os.getpid()}\n"


def test_two_locks_in_one_process_conflict_too(tmp_path):
    with (
        exclusive_output(tmp_path / "a.npz"),
        pytest.raises(OutputInUseError),
        exclusive_output(tmp_path / "a.npz"),
    ):
        pass
    with exclusive_output(tmp_path / "a.npz"), exclusive_output(tmp_path / "b.npz"):
        pass


def test_lock_creates_the_output_folder_or_says_why_not(tmp_path):
    with exclusive_output(tmp_path / "new" / "a.npz"):
        assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(InvalidInputError, match="a file is in the way of its folder"),
        exclusive_output(tmp_path / "file" / "a.npz"),
    ):
        pass


def test_write_failure_of_the_temporary_is_an_output_error(tmp_path):
    target = tmp_path / "out.txt"

    def fail(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    with (
        pytest.raises(OutputError, match=r"cannot write the report to .*out\.txt: Permission"),
        atomic_path(target, what="report") as partial,
    ):
        fail(partial)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "missing"])
def test_check_regular_file_refuses_what_would_block_or_is_not_a_file(tmp_path, kind):
    path = {"fifo": tmp_path / "p", "folder": tmp_path, "device": Path("/dev/zero")}.get(
        kind, tmp_path / "missing"
    )
    if kind == "fifo":
        os.mkfifo(path)
    expected = {
        "fifo": "FIFO",
        "folder": "is a folder",
        "device": "character device",
        "missing": "does not exist",
    }[kind]
    with pytest.raises(InvalidInputError, match=expected):
        check_regular_file(path)
    assert check_regular_file(__file__) == Path(__file__)
