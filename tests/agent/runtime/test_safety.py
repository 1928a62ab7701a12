"""Path confinement and secret redaction (agent/runtime/safety.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.runtime.safety import (
    REDACTED,
    PathConfinementError,
    confine_paths,
    paths_in,
    redact_data,
)
from core.errors import InvalidInputError
from tools.registry import get_tool


def _bump_input(path: str) -> BaseModel:
    return get_tool("bump_hunt").input_model.model_validate({"histogram": {"path": path}})


def test_paths_are_found_in_nested_models_and_lists(tmp_path: Path) -> None:
    model = get_tool("event_table").input_model.model_validate(
        {"inputs": ["a.root", "b.root"], "output": str(tmp_path / "t.parquet")}
    )
    found = dict.fromkeys(text for _field, text in paths_in(model))
    assert list(found) == ["a.root", "b.root", str(tmp_path / "t.parquet")]
    assert [field for field, _ in paths_in(_bump_input("h.npz"))] == ["path"]


def test_inside_the_run_is_allowed_and_outside_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    confine_paths(_bump_input(str(run / "spectra" / "h.npz")), [run])
    for escape in (str(tmp_path / "h.npz"), str(run / ".." / "h.npz"), "/etc/passwd"):
        with pytest.raises(PathConfinementError, match="outside the allowed folder") as caught:
            confine_paths(_bump_input(escape), [run])
        assert isinstance(caught.value, InvalidInputError)
        assert escape in str(caught.value)


def test_a_symlink_out_of_the_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.npz").write_bytes(b"x")
    (run / "link.npz").symlink_to(tmp_path / "secret.npz")
    with pytest.raises(PathConfinementError, match=r"secret\.npz"):
        confine_paths(_bump_input(str(run / "link.npz")), [run])


def test_declared_inputs_and_urls(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    data = tmp_path / "data.root"
    url = "https://example.org/data.root"
    model = get_tool("read_events").input_model.model_validate({"inputs": [str(data), url]})
    confine_paths(model, [run], allowed_files=[str(data), url])
    with pytest.raises(PathConfinementError, match="URL"):
        confine_paths(model, [run], allowed_files=[str(data)])
    with pytest.raises(PathConfinementError, match=r"data\.root"):
        confine_paths(model, [run], allowed_files=[url])


def test_redaction_reaches_keys_values_and_lists() -> None:
    secret = "sk-test-SECRET-1234"
    data = {"auth": f"Bearer {secret}", secret: [f"x{secret}y", 3, None]}
    cleaned = redact_data(data, [secret, None, ""])
    assert secret not in repr(cleaned)
    assert cleaned == {"auth": f"Bearer {REDACTED}", REDACTED: [f"x{REDACTED}y", 3, None]}


def test_a_dummy_short_key_does_not_mangle_the_audit() -> None:
    from agent.runtime.safety import redact

    assert redact("kept key k in the log", ["k"]) == "kept key k in the log"
    assert redact("key sk-0123456789abcdef here", ["sk-0123456789abcdef"]) == (
        "key [redacted] here"
    )
