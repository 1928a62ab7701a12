"""Poisson-bootstrap replicas of the scan's spectra: one weight per event, shared by all spectra.

Replica r gives every event a weight w_er ~ Poisson(1), independent between events and
replicas, and the same in every spectrum and anomaly-region point the event enters. So the
replicas of two spectra fluctuate together exactly as far as they share events (one event
enters several pair masses and streams; AR points are nested), which is what the scan-wide
look-elsewhere test needs to know about the spectra's correlation
(`core.lookelsewhere.bootstrap_correlation`). Weights are drawn event chunk by event chunk
from one generator, so the replicas depend only on the seed and the event order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import sparse

from core.errors import InvalidInputError
from core.masses import PAIRS, STREAMS, mass_bin_edges

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

EVENTS_PER_CHUNK: Final = 20_000
"""Events whose replica weights are held at once (n_replicas x this many)."""


@dataclass(frozen=True)
class SpectrumSelection:
    """One spectrum ("T2/jm") at one AR point: its events (`mask`, n) and bins [first, stop)."""

    spectrum: str
    mask: BoolArray
    first_bin: int
    stop_bin: int


def bootstrap_spectra(
    masses: FloatArray,
    stream_bits: BoolArray,
    selections: Sequence[SpectrumSelection],
    n_replicas: int,
    rng: np.random.Generator,
) -> list[npt.NDArray[np.int32]]:
    """Replica counts (n_replicas, stop - first) of every selection, on `mass_bin_edges()`.

    `masses` (n, 9) GeV and `stream_bits` (n, 7) as in the event table. Raises
    InvalidInputError on a bad spectrum name, mask shape or bin range, or n_replicas < 3.
    """
    n_events = masses.shape[0]
    if n_replicas < 3:
        raise InvalidInputError(f"bootstrap_spectra needs n_replicas >= 3, found {n_replicas}")
    edges = mass_bin_edges()
    columns = [_bins_of(masses, stream_bits, edges, selection) for selection in selections]
    totals = [
        np.zeros((n_replicas, s.stop_bin - s.first_bin), dtype=np.float64) for s in selections
    ]
    for start in range(0, n_events, EVENTS_PER_CHUNK):
        stop = min(start + EVENTS_PER_CHUNK, n_events)
        weights = rng.poisson(1.0, size=(n_replicas, stop - start)).astype(np.float64)
        for total, (events, bins), selection in zip(totals, columns, selections, strict=True):
            lo, hi = np.searchsorted(events, [start, stop])
            if hi == lo:
                continue
            onehot = sparse.csr_array(
                (np.ones(hi - lo), (events[lo:hi] - start, bins[lo:hi] - selection.first_bin)),
                shape=(stop - start, total.shape[1]),
            )
            np.add(total, (onehot.T @ weights.T).T, out=total)
    return [np.rint(total).astype(np.int32) for total in totals]


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
