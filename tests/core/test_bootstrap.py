"""Poisson-bootstrap replicas of the scan's spectra (core.bootstrap)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.bootstrap import SpectrumSelection, bootstrap_spectra
from core.errors import InvalidInputError
from core.masses import PAIRS, histogram, mass_bin_edges


class _UnitWeights:
    """A generator whose Poisson draws are all 1: every replica is the data itself."""

    def poisson(self, lam: float, size: tuple[int, int]) -> np.ndarray:
        return np.ones(size, dtype=np.int64)


def _events(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    edges = mass_bin_edges()
    masses = rng.uniform(edges[0], edges[40], size=(n, len(PAIRS)))
    masses[rng.random(masses.shape) < 0.3] = np.nan
    masses[0, 0] = edges[-1]  # the last edge belongs to the last bin, as in np.histogram
    bits = rng.random((n, 7)) < 0.5
    return masses, bits


def test_unit_weights_give_the_histograms_of_the_spectra() -> None:
    """With every weight 1 a replica is the spectrum's histogram over its bin range."""
    masses, bits = _events(50_000, np.random.default_rng(0))
    mask = np.asarray(np.random.default_rng(1).random(masses.shape[0]) < 0.6, dtype=bool)
    n_bins = mass_bin_edges().size - 1
    selections = [
        SpectrumSelection("T2/jm", mask, 3, 30),
        SpectrumSelection("T1/jj", np.ones_like(mask), 0, n_bins),
    ]
    unit: Any = _UnitWeights()
    replicas = bootstrap_spectra(masses, bits, selections, 3, unit)
    expected = [histogram(masses, bits, "T2", "jm", mask)[0][3:30]]
    expected.append(histogram(masses, bits, "T1", "jj", None)[0])
    for replica, counts in zip(replicas, expected, strict=True):
        np.testing.assert_array_equal(replica, np.broadcast_to(counts, replica.shape))


def test_replicas_share_the_weights_of_shared_events() -> None:
    """The same selection twice gives identical replicas; their mean is the data (5 sigma)."""
    masses, bits = _events(30_000, np.random.default_rng(2))
    mask = np.ones(masses.shape[0], dtype=bool)
    same = SpectrumSelection("T3/bb", mask, 0, 40)
    one, two = bootstrap_spectra(masses, bits, [same, same], 400, np.random.default_rng(3))
    np.testing.assert_array_equal(one, two)
    data = histogram(masses, bits, "T3", "bb", mask)[0][:40]
    error = np.sqrt(np.maximum(data, 1) / 400)
    assert np.all(np.abs(one.mean(axis=0) - data) < 5 * error)


def test_a_bad_selection_is_refused() -> None:
    masses, bits = _events(10, np.random.default_rng(4))
    rng = np.random.default_rng(5)
    with pytest.raises(InvalidInputError, match="unknown spectrum"):
        bootstrap_spectra(masses, bits, [SpectrumSelection("T9/jj", bits[:, 0], 0, 5)], 3, rng)
    with pytest.raises(InvalidInputError, match="not a range"):
        bootstrap_spectra(masses, bits, [SpectrumSelection("T1/jj", bits[:, 0], 5, 5)], 3, rng)
