"""The `set_limits` tool: inline spectra or an NPZ, output fields, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import InvalidInputError
from tests.spectra import EDGES
from tools.registry import get_tool


def _spectrum() -> dict[str, object]:
    edges = EDGES[(EDGES > 300) & (EDGES < 3000)]
    centres = np.sqrt(edges[:-1] * edges[1:])
    background = 2e4 * (centres / 300.0) ** -4.0 * np.diff(edges) / 30.0
    counts = np.random.default_rng(3).poisson(background).astype(float)
    return {
        "spectrum": "T2/jm",
        "point_pb": 1.0,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "background": background.tolist(),
        "background_error": (0.03 * background).tolist(),
    }


def test_inline_and_npz_inputs_give_the_same_limits(tmp_path: Path) -> None:
    tool = get_tool("set_limits")
    spectrum = _spectrum()
    inline = tool.call({"lumi_pb": 50.0, "spectra": [spectrum], "n_masses": 5, "widths": [0, 0.1]})
    path = tmp_path / "points.npz"
    np.savez(
        path,
        spectrum=np.array(["T2/jm"]),
        point_pb=np.array([1.0]),
        edges_0=np.array(spectrum["edges"]),
        counts_0=np.array(spectrum["counts"]),
        background_0=np.array(spectrum["background"]),
        background_error_0=np.array(spectrum["background_error"]),
    )
    stored = tool.call(
        {"lumi_pb": 50.0, "points_path": str(path), "n_masses": 5, "widths": [0, 0.1]}
    )
    assert inline == stored
    assert inline["bands"] == [-2, -1, 0, 1, 2] and inline["test_statistic"] == "qtilde"
    assert [c["width"] for c in inline["curves"]] == [0.0, 0.1]
    assert inline["n_limits"] == sum(len(c["masses_gev"]) for c in inline["curves"])
    for curve in inline["curves"]:
        assert set(curve["expected_pb"]) == {"-2", "-1", "0", "+1", "+2"}
        events = np.array(curve["observed_events"])
        np.testing.assert_allclose(np.array(curve["observed_pb"]), events / 50.0)
        assert len(curve["window_background"]) == len(curve["masses_gev"])


def test_refusals(tmp_path: Path) -> None:
    tool = get_tool("set_limits")
    spectrum = _spectrum()
    with pytest.raises(ValidationError, match="either"):
        tool.call({"lumi_pb": 1.0})
    with pytest.raises(ValidationError, match="distinct"):
        tool.call({"lumi_pb": 1.0, "spectra": [spectrum], "widths": [0.1, 0.1]})
    with pytest.raises(ValidationError, match=r"\[0, 0.5\]"):
        tool.call({"lumi_pb": 1.0, "spectra": [spectrum], "widths": [0.9]})
    with pytest.raises(InvalidInputError, match="unknown spectrum"):
        tool.call({"lumi_pb": 1.0, "spectra": [spectrum | {"spectrum": "T8/jm"}]})
    with pytest.raises(InvalidInputError, match="does not exist"):
        tool.call({"lumi_pb": 1.0, "points_path": str(tmp_path / "none.npz")})
    path = tmp_path / "partial.npz"
    np.savez(path, spectrum=np.array(["T2/jm"]), point_pb=np.array([1.0]))
    with pytest.raises(InvalidInputError, match="edges_0"):
        tool.call({"lumi_pb": 1.0, "points_path": str(path)})
    short = spectrum | {"counts": spectrum["counts"][:-1]}  # type: ignore[index]
    with pytest.raises(InvalidInputError, match="K \\+ 1 edges and K counts"):
        tool.call({"lumi_pb": 1.0, "spectra": [short]})
