"""Tools `fit_background`, `choose_background` and `robustness_checks` through the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import InvalidInputError
from tests.spectra import EDGES, SHAPES, expected_counts
from tools.registry import get_tool


def spectrum(n_events: float, seed: int) -> np.ndarray:
    """A p4 toy (SHAPES["p4"]) with n_events expected in [300, 6000] GeV and none above it."""
    counts = np.random.default_rng(seed).poisson(expected_counts("p4", n_events)).astype(float)
    counts[EDGES[:-1] >= 6000.0] = 0.0
    return counts


def test_fit_background_tool_recovers_the_shape_and_is_json_ready():
    counts = spectrum(1.0e5, seed=1)
    out = get_tool("fit_background").call(
        {
            "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
            "function": "p4",
            "fit_range": [300.0, None],
        }
    )
    json.dumps(out, allow_nan=False)
    assert out["function"] == "p4" and out["valid"] and out["accurate_covariance"]
    first, stop = out["bins"]
    assert len(out["expected"]) == stop - first == len(out["used"])
    assert out["fit_range"][1] == pytest.approx(0.65 * 13000.0, rel=0.05)
    assert out["ndf"] == stop - first - 4
    shape = np.array(out["parameters"][1:])
    errors = np.array(out["errors"][1:])
    assert np.all(np.abs(shape - np.array(SHAPES["p4"])) < 4 * errors)
    assert sum(out["expected"]) == pytest.approx(counts[first:stop].sum(), rel=1e-9)


def test_fit_background_tool_reads_npz_and_masks_a_window(tmp_path):
    counts = spectrum(5.0e4, seed=2)
    path = tmp_path / "h.npz"
    np.savez(path, edges=EDGES, counts=counts)
    out = get_tool("fit_background").call(
        {
            "histogram": {"path": str(path)},
            "function": "ua2",
            "fit_range": [300.0, 6000.0],
            "exclude": [1000.0, 1200.0],
        }
    )
    assert out["function"] == "ua2"
    assert not all(out["used"]) and out["ndf"] == sum(out["used"]) - 4


def test_fit_background_tool_rejects_bad_input():
    counts = spectrum(1.0e4, seed=3)
    bad = counts.copy()
    bad[50] = -1.0
    with pytest.raises(InvalidInputError, match="non-negative"):
        get_tool("fit_background").call(
            {"histogram": {"edges": EDGES.tolist(), "counts": bad.tolist()}, "function": "p4"}
        )
    with pytest.raises(ValidationError):
        get_tool("fit_background").call(
            {"histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()}, "function": "p9"}
        )
    with pytest.raises(ValidationError):
        get_tool("fit_background").call(
            {"histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()}, "colour": "red"}
        )


def test_choose_background_tool_returns_the_decision_trail():
    counts = spectrum(1.0e5, seed=4)
    out = get_tool("choose_background").call(
        {
            "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
            "fit_range": [300.0, 6000.0],
            "checks": {"spurious_method": "asimov", "alternative": ["ua2", "ua2_5", "p6"]},
        }
    )
    json.dumps(out, allow_nan=False)
    assert out["tests"][0]["lower"] == "p2" and out["tests"][0]["significant"]
    assert out["fallback"] is None
    assert out["trail"][1].startswith("ftest:")
    assert out["fit_range"]["lo_gev"] >= 300.0 and out["fit_range"]["reason"]
    rows = {row["function"]: row for row in out["candidates"]}
    assert set(rows) >= {"p2", "p3"}
    assert all(
        row["passed"]
        == (row["checked"] and all(check["status"] != "fail" for check in row["checks"]))
        for row in rows.values()
    )
    if out["passed"]:
        assert rows[out["chosen"]]["passed"]
    assert out["passed"] == (out["chosen"] is not None)
    if out["passed"]:
        assert out["fit"]["function"] == out["chosen"]
        assert out["checks"][-1]["passed"]
    names = [check["name"] for check in out["checks"][0]["checks"]]
    assert names == [
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    ]


def test_choose_background_tool_validates_its_options():
    counts = spectrum(1.0e4, seed=5)
    histogram = {"edges": EDGES.tolist(), "counts": counts.tolist()}
    with pytest.raises(ValidationError):
        get_tool("choose_background").call({"histogram": histogram, "method": "bayes"})
    with pytest.raises(ValidationError):
        get_tool("choose_background").call({"histogram": histogram, "functions": ["ua2"]})
    with pytest.raises(InvalidInputError, match="one-parameter extension"):
        get_tool("choose_background").call({"histogram": histogram, "functions": ["p2", "p4"]})


def test_robustness_checks_tool_runs_every_check_with_a_window():
    counts = spectrum(5.0e4, seed=6)
    out = get_tool("robustness_checks").call(
        {
            "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
            "function": "p4",
            "fit_range": [300.0, 6000.0],
            "checks": {
                "spurious_method": "asimov",
                "window": [1000.0, 1200.0],
                "alternative": ["p4"],
            },
        }
    )
    json.dumps(out, allow_nan=False)
    names = [check["name"] for check in out["report"]["checks"]]
    assert names == [
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "window_exclusion",
        "falling_background",
    ]
    assert out["fit"]["function"] == "p4"
    assert out["report"]["passed"] == all(check["passed"] for check in out["report"]["checks"])
    spurious = out["report"]["checks"][2]
    assert spurious["passed"] and spurious["numbers"]["max_abs_median_pull"] < 0.1


def test_choose_background_tool_reports_the_symbolic_fallback():
    """p2 and p3 fail on p4 data: the fallback's expression, constants and GOF p are output."""
    counts = spectrum(2.0e5, seed=7)
    out = get_tool("choose_background").call(
        {
            "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
            "fit_range": [300.0, 6000.0],
            "functions": ["p2", "p3"],
            "checks": {"spurious_method": "asimov"},
            "fallback_search": {
                "backend": "pyoperon",
                "population_size": 60,
                "generations": 8,
                "max_length": 12,
                "n_seeds": 1,
            },
            "seed": 3,
        }
    )
    json.dumps(out, allow_nan=False)
    assert all(not report["checks"][0]["passed"] for report in out["checks"][:-1])
    fallback = out["fallback"]
    assert fallback is not None
    assert fallback["fit"]["function"] == f"symbolic: {fallback['expression']}"
    assert list(fallback["constants"]) == fallback["fit"]["parameter_names"][1:]
    assert list(fallback["constants"].values()) == fallback["fit"]["parameters"][1:]
    assert fallback["p_value"] == fallback["fit"]["p_value"]  # a tiny search: p not asserted
    assert fallback["formula"].startswith(repr(fallback["fit"]["parameters"][0]))
    assert out["checks"][-1]["function"] == fallback["fit"]["function"]
    assert f"fallback fitted {fallback['fit']['function']}" in out["trail"]
    assert out["passed"] == (out["chosen"] == fallback["fit"]["function"])


def test_choose_background_tool_without_fallback_and_bad_search_settings():
    counts = spectrum(2.0e5, seed=7)
    histogram = {"edges": EDGES.tolist(), "counts": counts.tolist()}
    out = get_tool("choose_background").call(
        {
            "histogram": histogram,
            "fit_range": [300.0, 6000.0],
            "functions": ["p2", "p3"],
            "checks": {"spurious_method": "asimov"},
            "use_fallback": False,
        }
    )
    assert out["fallback"] is None and out["chosen"] is None
    assert out["trail"][-1] == "no analytic function passed and no fallback was given"
    for bad in ({"n_seeds": 0}, {"time_budget_s": 0.0}, {"backend": "eureqa"}, {"seeds": 3}):
        with pytest.raises(ValidationError):
            get_tool("choose_background").call({"histogram": histogram, "fallback_search": bad})


def test_choose_background_tool_from_the_stream_start_records_range_and_candidates():
    counts = spectrum(1.0e5, seed=7)
    counts[: int(np.searchsorted(EDGES, 300.0))] = 0.0
    out = get_tool("choose_background").call(
        {
            "histogram": {"edges": EDGES.tolist(), "counts": counts.tolist()},
            "stream_start_gev": 300.0,
            "use_fallback": False,
        }
    )
    json.dumps(out, allow_nan=False)
    chosen_range = out["fit_range"]
    assert chosen_range["lo_gev"] >= 300.0 and chosen_range["hi_gev"] == pytest.approx(
        8534.6, abs=1.0
    )
    assert "stream's start" in chosen_range["reason"]
    assert out["trail"][0] == chosen_range["reason"]
    rows = out["candidates"]
    assert [row["function"] for row in rows][:2] == ["p2", "p3"]
    for row in rows:
        assert tuple(row["bins"]) == (chosen_range["first_bin"], chosen_range["stop_bin"])
        assert row["passed"] == (
            row["checked"] and all(check["status"] != "fail" for check in row["checks"])
        )
        if row["checked"]:
            assert {check["status"] for check in row["checks"]} <= {
                "pass",
                "fail",
                "not_applicable",
            }
    assert out["passed"] and out["chosen"] == "p4"
    chosen_row = next(row for row in rows if row["function"] == "p4")
    assert chosen_row["passed"] and chosen_row["test_to_higher"]["method"] == "wilks"
    assert chosen_row["test_from_lower"]["significant"]
