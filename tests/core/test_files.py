"""Atomic files and committed folders: a reader sees the old or the new output, never a mix."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInputError, OutputError
from core.files import (
    MANIFEST_NAME,
    atomic_path,
    committed_folder,
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
    with multiprocessing.get_context("fork").Pool(2) as pool:
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
