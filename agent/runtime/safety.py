"""Guards between a model (an LLM, an MCP client) and the machine: paths and secrets.

A path a model gives is confined to the allowed folders (the run folder) and the declared input
files; symbolic links are resolved first, so a link inside the run pointing elsewhere is refused.
URLs are refused unless they are declared inputs. Secrets (the API key) are replaced by a marker
before any text is logged, stored in the audit or put in an exception message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.errors import InvalidInputError

PATH_FIELDS = frozenset(
    {
        "inputs",
        "mapping",
        "path",
        "output",
        "output_dir",
        "features",
        "model",
        "table",
        "compare_with",
    }
)
"""Tool-input fields whose string values name files (Path-typed values are paths anywhere)."""

REDACTED = "[redacted]"


class PathConfinementError(InvalidInputError):
    """A path given by a model lies outside the run folder and the declared inputs."""


def _paths_in(value: Any, field: str | None) -> Iterator[tuple[str, str]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _paths_in(getattr(value, name), name)
    elif isinstance(value, Path):
        yield (field or "?", str(value))
    elif isinstance(value, str):
        if field in PATH_FIELDS:
            yield (field, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _paths_in(item, str(key))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _paths_in(item, field)


def paths_in(model: BaseModel) -> list[tuple[str, str]]:
    """Every (field, path) pair in a validated tool input, nested models and lists included."""
    return list(_paths_in(model, None))


def _is_url(text: str) -> bool:
    return "://" in text


def check_path(
    text: str, allowed_dirs: Sequence[Path], allowed_files: Iterable[str] = (), field: str = "path"
) -> None:
    """Raise PathConfinementError unless `text` is a declared input or inside an allowed folder."""
    declared = set(allowed_files)
    if text in declared:
        return
    if _is_url(text):
        raise PathConfinementError(
            f"field {field!r}: URL {text!r} is not one of the declared inputs; "
            "only the run folder and the declared inputs may be used"
        )
    resolved = Path(text).resolve()
    declared_resolved = {Path(item).resolve() for item in declared if not _is_url(item)}
    if resolved in declared_resolved:
        return
    if any(resolved.is_relative_to(folder.resolve()) for folder in allowed_dirs):
        return
    where = ", ".join(str(folder) for folder in allowed_dirs) or "(no folder)"
    raise PathConfinementError(
        f"field {field!r}: path {text!r} resolves to {resolved}, outside the allowed "
        f"folder(s) {where} and the declared inputs; give a path inside the run folder"
    )


def confine_paths(
    model: BaseModel, allowed: Sequence[Path], allowed_files: Iterable[str] = ()
) -> None:
    """Raise PathConfinementError when any path in `model` is outside `allowed` and the inputs."""
    files = tuple(allowed_files)
    for field, text in paths_in(model):
        check_path(text, allowed, files, field)


MIN_SECRET_LENGTH = 8
"""Shorter keys (a dummy `OPENAI_API_KEY=k` for a local server) are no secret to hide, and
replacing every "k" in the audit would mangle it; real API keys are far longer."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret of `MIN_SECRET_LENGTH` characters or more replaced."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return text


def redact_data(value: Any, secrets: Sequence[str | None]) -> Any:
    """A copy of JSON-like `value` with every secret redacted from its strings."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact(str(k), secrets): redact_data(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(item, secrets) for item in value]
    return value
