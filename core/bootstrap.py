"""Poisson-bootstrap replicas of the scan's spectra: one weight per event, shared by all spectra.

Replica r gives every event a weight w_er ~ Poisson(1), independent between events and
replicas, and the same in every spectrum and anomaly-region point the event enters. So the
replicas of two spectra fluctuate together exactly as far as they share events (one event
enters several pair masses and streams; AR points are nested), which is what the scan-wide
look-elsewhere test needs to know about the spectra's correlation
(`core.lookelsewhere.bootstrap_correlation`).

The weights are counter-based: w_er is a function of (key, e, r) alone, the inverse
Poisson(1) distribution function at a uniform number hashed from them (SplitMix64's
finaliser, Steele, Lea and Flood 2014). Nothing is drawn for an event no selection holds,
and every call, AR point and spectrum sees the same weight for the same event without
holding a table of weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numba
import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError
from core.masses import PAIRS, STREAMS, mass_bin_edges

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_POISSON_ONE_CDF: Final = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(19)])
"""P(w <= k) for w ~ Poisson(1), k = 0..18; beyond 18 the rest (< 1e-17) is cut."""


@dataclass(frozen=True)
class SpectrumSelection:
    """One spectrum ("T2/jm") at one AR point: its events (`mask`, n) and bins [first, stop)."""

    spectrum: str
    mask: BoolArray
    first_bin: int
    stop_bin: int


def replica_key(*seed: int) -> int:
    """The 64-bit key of the weights for a seed (e.g. the scan's seed and a stream number)."""
    return int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0])


def bootstrap_spectra(
    masses: FloatArray,
    stream_bits: BoolArray,
    selections: Sequence[SpectrumSelection],
    n_replicas: int,
    key: int,
) -> list[npt.NDArray[np.int32]]:
    """Replica counts (n_replicas, stop - first) of every selection, on `mass_bin_edges()`.

    `masses` (n, 9) GeV and `stream_bits` (n, 7) as in the event table; event e of the
    table has the weights `replica_weights(key, [e], n_replicas)`. Raises
    InvalidInputError on a bad spectrum name, mask shape or bin range, or n_replicas < 3.
    """
    if n_replicas < 3:
        raise InvalidInputError(f"bootstrap_spectra needs n_replicas >= 3, found {n_replicas}")
    edges = mass_bin_edges()
    replicas = []
    for selection in selections:
        events, bins = _bins_of(masses, stream_bits, edges, selection)
        totals = np.zeros((selection.stop_bin - selection.first_bin, n_replicas), np.int32)
        add_replica_counts(totals, events, bins - selection.first_bin, key)
        replicas.append(np.ascontiguousarray(totals.T))
    return replicas


def add_replica_counts(
    totals: npt.NDArray[np.int32], events: IntArray, rows: IntArray, key: int
) -> None:
    """totals[rows[i], r] += w(key, events[i], r) for every i and replica r (in place).

    `events` are table rows (the weights' identity), `rows` the bins they fall in, counted
    from the first row of `totals` (n_bins, n_replicas).
    """
    _add_weights(
        np.asarray(events, np.int64),
        np.asarray(rows, np.int64),
        np.uint64(key),
        _POISSON_ONE_CDF,
        totals,
    )


def replica_weights(key: int, events: IntArray, n_replicas: int) -> npt.NDArray[np.int32]:
    """The Poisson(1) weights (len(events), n_replicas) of the given table rows."""
    weights = np.zeros((len(events), n_replicas), np.int32)
    rows = np.arange(len(events), dtype=np.int64)
    _add_weights(np.asarray(events, np.int64), rows, np.uint64(key), _POISSON_ONE_CDF, weights)
    return weights


@numba.njit(cache=True, nogil=True)
def _mix(z: np.uint64) -> np.uint64:
    """SplitMix64's finaliser: a bijection of 64-bit words that scrambles every bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _add_weights(
    events: IntArray,
    rows: IntArray,
    key: np.uint64,
    cdf: FloatArray,
    totals: npt.NDArray[np.int32],
) -> None:
    """totals[rows[i], r] += w(key, events[i], r) for every i and replica r."""
    n_replicas = totals.shape[1]
    last = cdf.size - 1
    scale = 2.0**-53
    for i in range(events.size):
        base = _mix(key + np.uint64(events[i]) * _GOLDEN)
        row = rows[i]
        for r in range(n_replicas):
            uniform = float(_mix(base + np.uint64(r + 1) * _GOLDEN) >> np.uint64(11)) * scale
            weight = 0
            while weight < last and uniform >= cdf[weight]:
                weight += 1
            totals[row, r] += weight


def _bins_of(
    masses: FloatArray, stream_bits: BoolArray, edges: FloatArray, selection: SpectrumSelection
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(events, bins) of the selection's events whose pair mass falls in [first, stop)."""
    stream, _, pair = selection.spectrum.partition("/")
    if stream not in STREAMS or pair not in PAIRS:
        raise InvalidInputError(
            f"bootstrap_spectra: unknown spectrum {selection.spectrum!r}; expected STREAM/PAIR "
            f"with a stream of {STREAMS} and a pair of {PAIRS}"
        )
    if selection.mask.shape != (masses.shape[0],):
        raise InvalidInputError(
            f"bootstrap_spectra: the mask of {selection.spectrum!r} has shape "
            f"{selection.mask.shape}, expected ({masses.shape[0]},) (one entry per event)"
        )
    if not 0 <= selection.first_bin < selection.stop_bin <= edges.size - 1:
        raise InvalidInputError(
            f"bootstrap_spectra: bins [{selection.first_bin}, {selection.stop_bin}) of "
            f"{selection.spectrum!r} are not a range of the {edges.size - 1} mass bins"
        )
    values = masses[:, PAIRS.index(pair)]
    chosen = selection.mask & stream_bits[:, STREAMS.index(stream)] & np.isfinite(values)
    events = np.flatnonzero(chosen)
    bins = np.searchsorted(edges, values[events], side="right") - 1
    inside = (bins >= selection.first_bin) & (bins < selection.stop_bin)
    # np.histogram puts the last edge into the last bin
    last = values[events] == edges[-1]
    bins[last] = edges.size - 2
    inside |= last & (edges.size - 2 >= selection.first_bin) & (edges.size - 2 < selection.stop_bin)
    return events[inside], bins[inside]
