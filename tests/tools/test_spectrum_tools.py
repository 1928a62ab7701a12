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
    assert again["bump"]["local_z"] == pytest.approx(
        search["bump"]["local_z"], rel=1e-4
    )  # refit covariance folded in
    assert again["window_exclusion"] is None or "agrees" in again["window_exclusion"]


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


def _band_histogram(signal: float) -> tuple[dict[str, list[float]], np.ndarray]:
    mu = expected_counts("p4", 2e4)
    centres = 0.5 * (EDGES[:-1] + EDGES[1:])
    signal_mu = signal * np.exp(-0.5 * ((centres - 1500.0) / 40.0) ** 2)
    signal_mu *= 0 if signal == 0 else signal / signal_mu.sum()
    counts = np.random.default_rng(8).poisson(mu + signal_mu).astype(float)
    return {"edges": EDGES.tolist(), "counts": counts.tolist()}, counts


@pytest.mark.parametrize(
    ("function", "signal"),
    [("p4", 0.0), ("p4", 100.0), ("10.0*ln1mx - 4.0*lnx - 0.3*lnx*lnx", 0.0)],
)
def test_search_outputs_the_band_of_its_final_background(function: str, signal: float) -> None:
    from core.fit import expected_errors, fit_background
    from core.spectrum import resolve_background_function

    histogram, counts = _band_histogram(signal)
    out = get_tool("search_spectrum").call(
        {"histogram": histogram, "fit_range": [300, 6000], "function": function, "seed": 2}
    )
    error = np.array(out["background_error"])
    background = np.array(out["background"])
    assert error.shape == background.shape
    assert np.all(np.isfinite(error)) and np.all(error[background > 1e-3] > 0)
    # the band is the final fit's propagation: recompute it from the parameters output; the
    # window exclusion runs on the signal but never masks the background (issue 23)
    exclusion = out["window_exclusion"]
    if signal > 0:
        assert exclusion is not None and exclusion["agrees"], exclusion
    assert out["masked_window_gev"] is None
    refit = fit_background(
        EDGES,
        counts,
        resolve_background_function(out["function"], tuple(out["parameters"])),
        tuple(out["fit_range"]),
        starts=[out["parameters"]],
    )
    np.testing.assert_allclose(background, refit.expected, rtol=1e-3)
    np.testing.assert_allclose(error, expected_errors(refit, EDGES), rtol=0.02)
