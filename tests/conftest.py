"""Shared fixtures: the real ROOT files in ../shared/data, checked against SHA256SUMS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of small real ROOT files, after checking their SHA-256 sums."""
    sums = (SHARED_DATA / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, name = line.split()
        actual = hashlib.sha256((SHARED_DATA / name.lstrip("*")).read_bytes()).hexdigest()
        assert actual == digest, f"{name} does not match SHA256SUMS"
    return SHARED_DATA
