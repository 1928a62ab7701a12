"""Shared fixtures: the real ROOT files in ../shared/data, checked against SHA256SUMS; and
`anomscan audit verify` on every run folder the suite made (at the end of the session)."""

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


_TAMPERED: set[Path] = set()
"""Temporary folders of tests marked `tampers_audit` (their broken logs are the point)."""


@pytest.fixture(autouse=True)
def _note_tampering(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("tampers_audit") is not None:
        _TAMPERED.add(Path(request.getfixturevalue("tmp_path")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every audit log the suite wrote verifies: the chain's own check must never cry wolf."""
    from agent.runtime.audit import AuditError, verify

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or exitstatus not in (0, 1):
        return
    problems = []
    logs = sorted(factory.getbasetemp().rglob("audit.sqlite"))
    for log in logs:
        if any(log.is_relative_to(folder) for folder in _TAMPERED):
            continue
        try:
            report = verify(log)
        except AuditError as error:
            problems.append(f"{log}: {error}")
            continue
        problems.extend(f"{log}: {problem}" for problem in report.problems)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", f"audit verify: {len(logs)} logs, {len(problems)} problems")
        for problem in problems:
            reporter.write_line(f"  {problem}", red=True)
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
