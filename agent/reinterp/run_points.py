"""A finished run's AR points as it wrote them: data, accepted backgrounds and functions.

Read once by `anomscan inject` from RUN/points/: point-NNN.json (per-spectrum statuses) and
its NPZ (counts and the final accepted background per spectrum), and
point-NNN-backgrounds.json (the accepted functions with their fitted parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from core.masses import SPECTRUM_NAMES
from tools.reinterp import RunInputs

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RunPoint:
    """One AR point as the run wrote it (points/point-NNN.json and its NPZ).

    `counts` and `background` are (63, bins) over the whole histogram, rows in
    SPECTRUM_NAMES order: the data under the run's AR cut and the final accepted background
    (0 where none); `spectra` the JSON's per-spectrum records.
    """

    point_pb: float
    edges: FloatArray
    counts: FloatArray
    background: FloatArray
    spectra: list[dict[str, Any]]

    def status(self, name: str) -> str | None:
        """The spectrum's status at this point ("excess": a background was accepted)."""
        return next((s["status"] for s in self.spectra if s["spectrum"] == name), None)

    def accepted_background(self, name: str) -> FloatArray | None:
        """The run's final background of `name` here when it was accepted, else None."""
        if self.status(name) != "excess":
            return None
        return np.asarray(self.background[SPECTRUM_NAMES.index(name)], dtype=np.float64)


def read_run_points(run: RunInputs) -> dict[float, RunPoint]:
    """Every AR point of the run (points/point-NNN.json), read once."""
    found = {}
    for path in sorted((run.run_dir / "points").glob("point-[0-9][0-9][0-9].json")):
        record = json.loads(path.read_text())
        with np.load(path.with_name(record["arrays"])) as data:
            found[float(record["point_pb"])] = RunPoint(
                float(record["point_pb"]),
                np.asarray(data["edges"], dtype=np.float64),
                np.asarray(data["counts"], dtype=np.float64),
                np.asarray(data["background"], dtype=np.float64),
                list(record["spectra"]),
            )
    return found


def run_accepted_backgrounds(
    run: RunInputs, points: dict[float, RunPoint]
) -> dict[tuple[float, str], dict[str, Any]]:
    """(point, spectrum) -> the background the run accepted there (function, fit range).

    From points/*-backgrounds.json (with the fitted parameters as the refit's start); a
    spectrum whose first background was provisional and whose window exclusion found the
    final one (status "excess" in points/point-NNN.json) takes that final function and the
    bins of its fit range, without start parameters.
    """
    found = {}
    for path in sorted((run.run_dir / "points").glob("point-*-backgrounds.json")):
        record = json.loads(path.read_text())
        for name, entry in record["backgrounds"].items():
            if entry.get("status") == "accepted":
                found[(float(record["point_pb"]), name)] = entry
    for point, record in points.items():
        edges = record.edges
        for entry in record.spectra:
            key = (point, entry["spectrum"])
            if key in found or entry["status"] != "excess" or not entry.get("function"):
                continue
            first, stop = (int(v) for v in entry["bins"])
            found[key] = {
                "name": entry["function"],
                "function": entry["function"],
                "fit_range": [float(edges[first]), float(edges[stop])],
                "parameters": None,
                "status": "accepted after the window exclusion",
            }
    return found
