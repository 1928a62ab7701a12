"""Poisson-bootstrap replicas of the scan's spectra (core.bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from core.bootstrap import SpectrumSelection, bootstrap_spectra, replica_key, replica_weights
from core.errors import InvalidInputError
from core.masses import PAIRS, STREAMS, mass_bin_edges


def _events(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    edges = mass_bin_edges()
    masses = rng.uniform(edges[0], edges[40], size=(n, len(PAIRS)))
    masses[rng.random(masses.shape) < 0.3] = np.nan
    masses[0, 0] = edges[-1]  # the last edge belongs to the last bin, as in np.histogram
    bits = rng.random((n, 7)) < 0.5
    return masses, bits


def test_replicas_are_the_histograms_weighted_by_each_events_weights() -> None:
    """Replica r of a selection is np.histogram of its events weighted by their r-th weight."""
    masses, bits = _events(20_000, np.random.default_rng(0))
    mask = np.asarray(np.random.default_rng(1).random(masses.shape[0]) < 0.6, dtype=bool)
    edges = mass_bin_edges()
    selections = [
        SpectrumSelection("T2/jm", mask, 3, 30),
        SpectrumSelection("T1/jj", np.ones_like(mask), 0, edges.size - 1),
    ]
    key = replica_key(7, 1)
    replicas = bootstrap_spectra(masses, bits, selections, 5, key)
    for replica, selection in zip(replicas, selections, strict=True):
        stream, _, pair = selection.spectrum.partition("/")
        values = masses[:, PAIRS.index(pair)]
        rows = np.flatnonzero(selection.mask & bits[:, STREAMS.index(stream)] & np.isfinite(values))
        weights = replica_weights(key, rows, 5)
        for r in range(5):
            expected = np.histogram(values[rows], edges, weights=weights[:, r])[0]
            np.testing.assert_array_equal(
                replica[r], expected[selection.first_bin : selection.stop_bin]
            )


def test_an_events_weights_depend_on_the_key_and_its_row_alone() -> None:
    """The same row has the same weights whatever else is asked; another key changes them."""
    key = replica_key(3, 0x1EE)
    together = replica_weights(key, np.array([4, 17, 90_000]), 50)
    np.testing.assert_array_equal(together[1], replica_weights(key, np.array([17]), 50)[0])
    np.testing.assert_array_equal(
        together[:, :20], replica_weights(key, np.array([4, 17, 90_000]), 20)
    )
    assert not np.array_equal(
        together, replica_weights(replica_key(4, 0x1EE), np.array([4, 17, 90_000]), 50)
    )


def test_the_weights_are_independent_poisson_ones() -> None:
    """Frequencies of 0..5+ match Poisson(1) (chi2 p > 1e-3); rows and replicas uncorrelated."""
    weights = replica_weights(replica_key(11), np.arange(5_000), 200).astype(np.float64)
    frequencies = np.bincount(np.minimum(weights.ravel(), 5).astype(int), minlength=6)
    probabilities = [math.exp(-1) / math.factorial(k) for k in range(5)]
    expected = weights.size * np.append(probabilities, 1 - sum(probabilities))
    assert stats.chisquare(frequencies, expected).pvalue > 1e-3
    centred = weights - 1.0
    # neighbouring rows and neighbouring replicas: correlation within 5 sd of 0
    limit = 5 / math.sqrt(centred.size)
    assert abs(np.mean(centred[1:] * centred[:-1])) < limit
    assert abs(np.mean(centred[:, 1:] * centred[:, :-1])) < limit


def test_replicas_share_the_weights_of_shared_events() -> None:
    """The same selection twice gives identical replicas; their mean is the data (5 sigma)."""
    masses, bits = _events(30_000, np.random.default_rng(2))
    mask = np.ones(masses.shape[0], dtype=bool)
    same = SpectrumSelection("T3/bb", mask, 0, 40)
    one, two = bootstrap_spectra(masses, bits, [same, same], 400, replica_key(3))
    np.testing.assert_array_equal(one, two)
    data = np.histogram(masses[bits[:, 2], PAIRS.index("bb")], mass_bin_edges())[0][:40]
    error = np.sqrt(np.maximum(data, 1) / 400)
    assert np.all(np.abs(one.mean(axis=0) - data) < 5 * error)


def test_a_bad_selection_is_refused() -> None:
    masses, bits = _events(10, np.random.default_rng(4))
    key = replica_key(5)
    with pytest.raises(InvalidInputError, match="unknown spectrum"):
        bootstrap_spectra(masses, bits, [SpectrumSelection("T9/jj", bits[:, 0], 0, 5)], 3, key)
    with pytest.raises(InvalidInputError, match="not a range"):
        bootstrap_spectra(masses, bits, [SpectrumSelection("T1/jj", bits[:, 0], 5, 5)], 3, key)
