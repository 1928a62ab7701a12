"""Input pieces shared by several tools: histograms inline or by NPZ path, safe NPZ reads."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.errors import AnomscanError, InvalidInputError
from core.events import NON_FINITE_RULE
from core.files import atomic_path, check_regular_file, make_parent_folder


def _wants_number(annotation: Any) -> bool:
    """Whether a field's annotation is a number (int or float, possibly optional or listed)."""
    if annotation in (int, float):
        return True
    return any(_wants_number(argument) for argument in getattr(annotation, "__args__", ()))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(isinstance(item, bool) for item in value)
    return False


class StrictModel(BaseModel):
    """Base of every tool model: unknown fields, NaN, infinity and booleans-as-numbers fail.

    pydantic would otherwise take ``true`` for 1.0 and ``NaN`` for a luminosity; a tool that
    gets either computes a wrong result and reports success.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        annotation = field.annotation if field is not None else None
        if _holds_bool(value) and annotation is not bool and _wants_number(annotation):
            raise ValueError("expected a number, got a boolean")
        return value


class NonFiniteReport(StrictModel):
    """What a reader says about non-finite input values (core.events.NON_FINITE_RULE)."""

    non_finite: dict[str, int] = Field(
        default_factory=dict,
        description="non-finite values (NaN, infinity) read per branch; " + NON_FINITE_RULE,
    )
    dropped_non_finite: dict[str, int] = Field(
        default_factory=dict,
        description="objects per type, and events ('events'), dropped for a non-finite value",
    )
    notes: list[str] = Field(
        default_factory=list, description="what the reader did that changes the counts"
    )


def require_file(
    path: Path, what: str, advice: str = "", error: type[AnomscanError] = InvalidInputError
) -> None:
    """Raise `error` unless `path` is a regular file.

    A missing file reads "WHAT PATH does not exist{advice}"; a folder, FIFO or device is
    refused naming its kind, before anything opens it (a FIFO would block the tool).
    """
    if path.is_file():
        return
    if not path.exists():
        raise error(f"{what} {path} does not exist{advice}")
    try:
        check_regular_file(path, what)
    except InvalidInputError as refusal:
        raise error(str(refusal)) from refusal


@contextlib.contextmanager
def open_npz(path: Path) -> Iterator[Any]:
    """An NPZ file opened without pickles; InvalidInputError when it is not one."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidInputError(
            f"{path} is not a readable NPZ file ({type(error).__name__}); give an NPZ "
            "written by numpy.savez"
        ) from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InvalidInputError(f"{path} is a .npy array, not an NPZ archive of named arrays")
    with data:
        yield data


def npz_array(data: Any, name: str, path: Path) -> npt.NDArray[Any]:
    """Array `name` of an open NPZ; InvalidInputError when it can not be read."""
    try:
        return np.asarray(data[name])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidInputError(
            f"array {name!r} of {path} can not be read ({type(error).__name__}: {error}); the "
            "file is truncated or holds objects: rewrite it"
        ) from error


def npz_integers(data: Any, name: str, path: Path) -> npt.NDArray[np.int64]:
    """A 1-d integer array of an open NPZ."""
    values = npz_array(data, name, path)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise InvalidInputError(
            f"array {name!r} of {path} must be 1-d integers, found {values.dtype} {values.shape}"
        )
    return values.astype(np.int64)


def npz_numbers(data: Any, name: str, path: Path) -> npt.NDArray[np.float64]:
    """A numeric array of an open NPZ (as stored)."""
    values = npz_array(data, name, path)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise InvalidInputError(f"array {name!r} of {path} must hold numbers, found {values.dtype}")
    return values


class HistogramInput(StrictModel):
    """A histogram: inline `edges` and `counts` (and `background`), or `path` to an NPZ."""

    edges: list[float] | None = None
    counts: list[float] | None = None
    background: list[float] | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _inline_or_path(self) -> HistogramInput:
        inline = self.edges is not None or self.counts is not None
        if inline == (self.path is not None):
            raise ValueError("give either 'edges' and 'counts' inline, or 'path' to an NPZ file")
        if inline and (self.edges is None or self.counts is None):
            raise ValueError("an inline histogram needs both 'edges' and 'counts'")
        return self

    def arrays(
        self,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
        """Return (edges in GeV, counts, background or None) as float arrays."""
        if self.path is not None:
            require_file(self.path, "histogram file")
            with open_npz(self.path) as data:
                missing = [key for key in ("edges", "counts") if key not in data]
                if missing:
                    raise InvalidInputError(
                        f"histogram file {self.path} lacks arrays {missing}; "
                        f"it holds {sorted(data.files)}"
                    )
                background = (
                    npz_numbers(data, "background", self.path).astype(np.float64)
                    if "background" in data
                    else None
                )
                return (
                    npz_numbers(data, "edges", self.path).astype(np.float64),
                    npz_numbers(data, "counts", self.path).astype(np.float64),
                    background,
                )
        assert self.edges is not None
        assert self.counts is not None
        background = (
            None if self.background is None else np.asarray(self.background, dtype=np.float64)
        )
        return (
            np.asarray(self.edges, dtype=np.float64),
            np.asarray(self.counts, dtype=np.float64),
            background,
        )


def npz_output_path(value: Path) -> Path:
    """`value` when it names an .npz file (a validator of tool output fields)."""
    if value.suffix != ".npz":
        raise ValueError(f"the output must be an .npz file, got {str(value)!r}")
    return value


def save_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Write `arrays` compressed to `path` atomically, creating its folder first."""
    make_parent_folder(path)
    with atomic_path(path, what="NPZ output") as partial:
        np.savez_compressed(partial, **arrays)  # type: ignore[arg-type]
