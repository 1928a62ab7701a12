"""Input pieces shared by several tools: histograms inline or by NPZ path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator

from core.errors import InvalidInputError


class StrictModel(BaseModel):
    """Base of every tool model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


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
            if not self.path.is_file():
                raise InvalidInputError(f"histogram file {self.path} does not exist")
            with np.load(self.path) as data:
                missing = [key for key in ("edges", "counts") if key not in data]
                if missing:
                    raise InvalidInputError(
                        f"histogram file {self.path} lacks arrays {missing}; "
                        f"it holds {sorted(data.files)}"
                    )
                background = (
                    np.asarray(data["background"], dtype=np.float64)
                    if "background" in data
                    else None
                )
                return (
                    np.asarray(data["edges"], dtype=np.float64),
                    np.asarray(data["counts"], dtype=np.float64),
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
