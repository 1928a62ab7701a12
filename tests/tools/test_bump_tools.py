"""The bump_hunt, signal_fit and scan_significance tools: JSON in, JSON out, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from core.bumphunt import BumpHuntResult, LocalExcess
from core.errors import InvalidInputError
from core.lookelsewhere import ScanSignificance
from core.masses import mass_resolution
from core.significance import SignalFitResult, gaussian_bin_fractions
from tools.bumps import BumpHuntOutput, ScanPointOutput, ScanSignificanceOutput, SignalFitOutput
from tools.registry import get_tool

EDGES = np.linspace(1000.0, 3000.0, 41)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])
BACKGROUND = 4000.0 * np.exp(-(CENTRES - 1000.0) / 500.0)


def _data_with_bump(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = 500.0 * gaussian_bin_fractions(EDGES, 2000.0, 40.0)
    return rng.poisson(BACKGROUND + signal).astype(float)


def test_bump_hunt_tool_inline_finds_the_bump() -> None:
    counts = _data_with_bump(1)
    payload = {
        "histogram": {
            "edges": EDGES.tolist(),
            "counts": counts.tolist(),
            "background": BACKGROUND.tolist(),
        },
        "width_max": 8,
        "n_toys": 500,
        "max_toys": 10_000,
        "seed": 3,
    }
    output = get_tool("bump_hunt").call(payload)
    json.dumps(output)
    assert output["window"][0] <= 2000.0 <= output["window"][1]
    assert output["bins"][1] - output["bins"][0] <= 8
    assert output["global_p"] < 0.01
    assert output["n_toys"] >= 10_000 or output["global_p_method"] == "bonferroni bound"
    assert output["local_z"] > output["global_z"] > 2


def test_bump_hunt_tool_reads_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    counts = np.floor(BACKGROUND)
    np.savez(path, edges=EDGES, counts=counts, background=BACKGROUND)
    output = get_tool("bump_hunt").call({"histogram": {"path": str(path)}, "seed": 1})
    assert output["width_max"] == 20
    assert output["statistic"] == 0.0
    assert output["global_p"] == 1.0


def test_bump_hunt_tool_errors() -> None:
    histogram = {"edges": EDGES.tolist(), "counts": np.floor(BACKGROUND).tolist()}
    with pytest.raises(InvalidInputError, match="needs the histogram's expected 'background'"):
        get_tool("bump_hunt").call({"histogram": histogram})
    with pytest.raises(ValidationError):
        get_tool("bump_hunt").call({"histogram": histogram, "width_min": 0})
    with pytest.raises(ValidationError):
        get_tool("bump_hunt").call({"histogram": histogram, "toys": 5})
    bad = {**histogram, "background": (-BACKGROUND).tolist()}
    with pytest.raises(InvalidInputError, match="background must be >= 0"):
        get_tool("bump_hunt").call({"histogram": bad})


def test_signal_fit_tool_defaults_to_the_mass_resolution() -> None:
    width = mass_resolution(2000.0)
    signal = 300.0 * gaussian_bin_fractions(EDGES, 2000.0, width)
    histogram = {
        "edges": EDGES.tolist(),
        "counts": (BACKGROUND + signal).tolist(),
        "background": BACKGROUND.tolist(),
    }
    output = get_tool("signal_fit").call({"histogram": histogram, "mass": 2000.0})
    json.dumps(output)
    assert output["width"] == pytest.approx(width)
    assert output["signal_yield"] == pytest.approx(300.0, rel=1e-3)
    assert output["local_z"] > 0
    floating = get_tool("signal_fit").call(
        {"histogram": histogram, "mass": 2000.0, "background_normalisation": "floating"}
    )
    assert floating["background_scale_error"] > 0
    with pytest.raises(ValidationError):
        get_tool("signal_fit").call({"histogram": histogram, "mass": -1.0})
    with pytest.raises(ValidationError):
        get_tool("signal_fit").call(
            {"histogram": histogram, "mass": 2000.0, "background_normalisation": "free"}
        )


def _scan_spectrum(name: str, seed: int) -> dict[str, object]:
    sigmas = [10.0, 1.0]
    background = np.array([BACKGROUND, 0.1 * BACKGROUND])
    rng = np.random.default_rng(seed)
    tight = rng.poisson(background[1])
    loose = tight + rng.poisson(background[0] - background[1])
    return {
        "name": name,
        "cross_sections_pb": sigmas,
        "edges": EDGES.tolist(),
        "counts": [loose.tolist(), tight.tolist()],
        "background": background.tolist(),
    }


def test_scan_significance_tool_inline_and_npz(tmp_path: Path) -> None:
    first = _scan_spectrum("T1/jj", 1)
    second = _scan_spectrum("T2/jm", 2)
    path = tmp_path / "s.npz"
    np.savez(
        path,
        edges=np.asarray(second["edges"]),
        counts=np.asarray(second["counts"]),
        background=np.asarray(second["background"]),
        cross_sections_pb=np.asarray(second["cross_sections_pb"]),
    )
    payload = {
        "spectra": [first, {"name": "T2/jm", "path": str(path)}],
        "width_max": 6,
        "n_pseudo_scans": 300,
        "seed": 4,
        "top": 3,
    }
    output = get_tool("scan_significance").call(payload)
    json.dumps(output)
    assert output["n_tests"] == 4
    assert len(output["points"]) == 3
    assert output["points"][0] == output["best"]
    assert 0.0 <= output["global_p"] <= 1.0
    assert output["global_z"] <= output["local_z"]
    assert "chained" in output["method"]


def test_scan_significance_tool_errors(tmp_path: Path) -> None:
    spectrum = _scan_spectrum("T1/jj", 1)
    with pytest.raises(ValidationError):
        get_tool("scan_significance").call({"spectra": []})
    with pytest.raises(ValidationError):
        get_tool("scan_significance").call({"spectra": [{"name": "x", "edges": spectrum["edges"]}]})
    with pytest.raises(ValidationError):
        get_tool("scan_significance").call(
            {"spectra": [{**spectrum, "path": str(tmp_path / "x.npz")}]}
        )
    ragged = {**spectrum, "counts": [spectrum["counts"][0], spectrum["counts"][1][:-1]]}  # type: ignore[index]
    with pytest.raises(InvalidInputError, match="same number of bins"):
        get_tool("scan_significance").call({"spectra": [ragged]})
    with pytest.raises(InvalidInputError, match="does not exist"):
        get_tool("scan_significance").call(
            {"spectra": [{"name": "x", "path": str(tmp_path / "missing.npz")}]}
        )
    partial = tmp_path / "partial.npz"
    np.savez(partial, edges=EDGES)
    with pytest.raises(InvalidInputError, match="lacks arrays"):
        get_tool("scan_significance").call({"spectra": [{"name": "x", "path": str(partial)}]})


def test_outputs_carry_every_field_of_their_core_results() -> None:
    """The output models mirror core results: a field added in core must reach the JSON."""

    def names(result: type) -> set[str]:
        return {field.name for field in dataclasses.fields(result)}

    window = {"mass_low", "mass_high", "first_bin", "stop_bin"}
    assert set(BumpHuntOutput.model_fields) == names(BumpHuntResult) - window | {"window", "bins"}
    assert set(ScanPointOutput.model_fields) == (
        names(LocalExcess) - window | {"window", "bins", "spectrum", "cross_section_pb"}
    )
    assert set(ScanSignificanceOutput.model_fields) == names(ScanSignificance) | {"excluded"}
    assert set(SignalFitOutput.model_fields) == names(SignalFitResult)


def test_scan_significance_takes_search_spectrum_points(tmp_path: Path) -> None:
    # Two AR points of one spectrum from search_spectrum (different fit ranges), one point
    # of another spectrum left out with its status: the test runs on the accepted points,
    # lists the excluded one, and a whole-stream repeat (same events and background) enters
    # once.
    search = get_tool("search_spectrum")
    outputs = []
    for seed, scale in ((1, 1.0), (2, 0.3)):
        rng = np.random.default_rng(seed)
        counts = rng.poisson(scale * BACKGROUND).astype(float)
        outputs.append(
            search.call(
                {
                    "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
                    "fit_range": [float(EDGES[seed]), float(EDGES[-1])],
                    "function": "p4",
                    "n_toys": 200,
                    "max_toys": 200,
                }
            )
        )
    points = [
        {
            "spectrum": "T2/jj",
            "cross_section_pb": xsec,
            "first_bin": out["first_bin"],
            "stop_bin": out["stop_bin"],
            "edges": out["edges"],
            "counts": out["counts"],
            "background": out["background"],
            "jacobian": out["jacobian"],
            "covariance": out["covariance"],
            "bump": out["bump"],
        }
        for xsec, out in ((10.0, outputs[0]), (1.0, outputs[1]), (100.0, outputs[0]))
    ]
    points.append(
        {
            "spectrum": "T3/jj",
            "cross_section_pb": 1.0,
            "first_bin": 0,
            "edges": [1.0, 2.0],
            "counts": [0.0],
            "background": [1.0],
            "status": "no accepted background",
            "reason": "p2..p6 fail goodness_of_fit",
        }
    )
    result = get_tool("scan_significance").call(
        {"points": points, "n_pseudo_scans": 300, "max_pseudo_scans": 2000}
    )
    assert result["n_spectra"] == 1
    assert result["n_tests"] == 2
    assert result["merged_points"] == [["T2/jj", 10.0, 100.0]]
    assert result["excluded"][0]["status"] == "no accepted background"
    assert result["best"]["window"][0] >= EDGES[1]
    assert 0.0 < result["global_p"] <= 1.0
    # the scan-wide statistic is the hunts' own (the fit uncertainty folded in the same way)
    assert all(out["bump"]["background_uncertainty"] for out in outputs)
    hunts = max(out["bump"]["statistic"] for out in outputs)
    assert result["statistic"] == pytest.approx(hunts, rel=1e-12)

    # the accepted points as the scan's points NPZ (RUN/lee/points.npz): the same result
    accepted = points[:3]
    columns: dict[str, object] = {
        "spectrum": np.array([p["spectrum"] for p in accepted]),
        "cross_section_pb": np.array([p["cross_section_pb"] for p in accepted]),
        "first_bin": np.array([p["first_bin"] for p in accepted]),
        **{
            key: np.array([p["bump"][key] or 0 for p in accepted])  # type: ignore[index]
            for key in ("width_min", "width_max", "min_window_background", "min_window_count")
        },
    }
    for i, point in enumerate(accepted):
        for key in ("edges", "counts", "background", "jacobian", "covariance"):
            columns[f"{key}_{i}"] = np.asarray(point[key])
    path = tmp_path / "points.npz"
    np.savez(path, **columns)  # type: ignore[arg-type]
    from_file = get_tool("scan_significance").call(
        {"points_path": str(path), "n_pseudo_scans": 300, "max_pseudo_scans": 2000}
    )
    assert {k: v for k, v in from_file.items() if k != "excluded"} == {
        k: v for k, v in result.items() if k != "excluded"
    }
    columns["cross_section_pb"] = np.array([10.0, -1.0, 100.0])
    np.savez(path, **columns)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"(?s)not a scan-points NPZ .*cross_section_pb"):
        get_tool("scan_significance").call({"points_path": str(path)})
