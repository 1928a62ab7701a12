"""search_spectrum and analyse_spectrum tools: JSON in, JSON out, the rule's statuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import InvalidInputError
from tests.spectra import EDGES, expected_counts
from tools.registry import get_tool


def _histogram(seed: int, n_events: float = 2e4) -> dict[str, list[float]]:
    counts = np.random.default_rng(seed).poisson(expected_counts("p4", n_events))
    return {"edges": EDGES.tolist(), "counts": counts.astype(float).tolist()}


def test_analyse_then_search_round_trip() -> None:
    histogram = _histogram(3)
    analysed = get_tool("analyse_spectrum").call(
        {"histogram": histogram, "stream": "T2", "use_fallback": False, "seed": 4}
    )
    json.dumps(analysed)
    assert analysed["status"] == "accepted", analysed["trail"]
    search = analysed["search"]
    assert search["stop_bin"] - search["first_bin"] == len(search["counts"])
    assert len(search["background"]) == len(search["counts"])
    assert len(search["edges"]) == len(search["counts"]) + 1
    again = get_tool("search_spectrum").call(
        {
            "histogram": histogram,
            "fit_range": search["fit_range"],
            "function": search["function"],
            "parameters": search["parameters"],
            "seed": 4,
        }
    )
    assert again["bump"]["local_z"] == pytest.approx(search["bump"]["local_z"], rel=1e-5)
    assert again["window_exclusion"] is None or "accepted" in again["window_exclusion"]


def test_spectrum_tool_errors() -> None:
    histogram = _histogram(1)
    with pytest.raises(InvalidInputError, match="exactly one"):
        get_tool("analyse_spectrum").call({"histogram": histogram, "use_fallback": False})
    with pytest.raises(ValidationError):
        get_tool("search_spectrum").call(
            {"histogram": histogram, "fit_range": [300, 6000], "function": "p4", "n_toys": 10**12}
        )
    with pytest.raises(InvalidInputError):
        get_tool("search_spectrum").call(
            {"histogram": histogram, "fit_range": [300, 6000], "function": "exp(("}
        )
