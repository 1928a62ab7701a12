"""Tool `symbolic_fit`: JSON in, JSON out, inline or NPZ histograms, validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import InvalidInputError
from tools.registry import get_tool
from tools.symbolic import SymbolicFitInput, symbolic_fit_tool

SQRT_S = 13000.0
SMALL_SEARCH = {"population_size": 60, "generations": 8, "max_length": 12, "seed": 3}


def p3_histogram(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """60 log-spaced bins from 300 GeV to 6 TeV of a (1-x)^8 x^-4.5 law, 2e5 events."""
    edges = np.geomspace(300.0, 6000.0, 61)
    centres = np.sqrt(edges[:-1] * edges[1:]) / SQRT_S
    density = (1 - centres) ** 8 * centres**-4.5
    expected = density * np.diff(edges)
    expected *= 2e5 / expected.sum()
    return edges, np.random.default_rng(seed).poisson(expected).astype(float)


def test_inline_histogram_gives_a_recorded_expression() -> None:
    edges, counts = p3_histogram(seed=1)
    payload = {
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "fit_range": [300.0, None],
        **SMALL_SEARCH,
    }
    output = symbolic_fit_tool(SymbolicFitInput.model_validate(payload))
    data = output.model_dump(mode="json")
    assert data["backend"] == "pyoperon"
    assert all(f"{name}=" in " ".join(data["fit"]["notes"]) for name in data["constants"])
    assert data["expression"] in data["fit"]["function"]
    assert data["fit"]["valid"] and data["fit"]["accurate_covariance"]
    assert data["fit"]["p_value"] > 0.01
    assert len(data["fit"]["expected"]) == data["fit"]["bins"][1] - data["fit"]["bins"][0]
    assert sum(data["fit"]["expected"]) == pytest.approx(counts.sum(), rel=1e-6)
    chosen = data["candidates"][data["chosen_index"]]
    assert chosen["converged"]
    assert chosen["expression"] == data["expression"]
    assert all(name.startswith("c") for name in data["constants"])


def test_npz_histogram_and_registry_call_agree(tmp_path: Path) -> None:
    """The same spectrum by NPZ path through the registered tool gives the same fit."""
    edges, counts = p3_histogram(seed=2)
    path = tmp_path / "spectrum.npz"
    np.savez(path, edges=edges, counts=counts)
    tool = get_tool("symbolic_fit")
    by_path = tool.call({"histogram": {"path": str(path)}, **SMALL_SEARCH})
    inline = tool.call(
        {"histogram": {"edges": edges.tolist(), "counts": counts.tolist()}, **SMALL_SEARCH}
    )
    assert by_path["expression"] == inline["expression"]
    assert by_path["fit"]["deviance"] == inline["fit"]["deviance"]


@pytest.mark.parametrize(
    "change",
    [
        {"unknown_field": 1},
        {"backend": "eureqa"},
        {"selection": "aicc"},
        {"generations": 0},
        {"seed": -1},
        {"sqrt_s": 0.0},
    ],
)
def test_invalid_inputs_are_validation_errors(change: dict[str, object]) -> None:
    payload = {"histogram": {"edges": [1.0, 2.0], "counts": [3.0]}, **change}
    with pytest.raises(ValidationError):
        SymbolicFitInput.model_validate(payload)


def test_bad_spectrum_is_refused_where_it_enters() -> None:
    edges, counts = p3_histogram(seed=3)
    counts[5] = np.nan
    payload = {"histogram": {"edges": edges.tolist(), "counts": counts.tolist()}, **SMALL_SEARCH}
    with pytest.raises(ValidationError, match="finite"):
        SymbolicFitInput.model_validate(payload)
    counts[5] = -3.0
    payload = {"histogram": {"edges": edges.tolist(), "counts": counts.tolist()}, **SMALL_SEARCH}
    with pytest.raises(InvalidInputError, match="negative"):
        symbolic_fit_tool(SymbolicFitInput.model_validate(payload))
