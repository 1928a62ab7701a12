"""Trigger streams, leading-pair invariant masses and the 63 spectra (PHYSICS.md section 3).

Seven offline trigger streams (an event may be in several) times nine masses of leading
objects give 63 spectra named like "T2/jm", binned with the detector-resolution binning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, overload

import awkward as ak
import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError
from core.objects import EventChunk
from core.rmm import check_kinematics

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

STREAMS: Final = ("T1", "T2", "T3", "T4", "T5", "T6", "T7")
"""Trigger-stream names, the order of the columns of `stream_bits`."""

STREAM_LABELS: Final[Mapping[str, str]] = {
    "T1": "MET",
    "T2": "1L",
    "T3": "2L",
    "T4": "1G",
    "T5": "2G",
    "T6": "1J",
    "T7": "4J",
}
"""Long name of each stream."""

STREAM_FIT_FROM_GEV: Final[Mapping[str, float]] = {
    "T1": 600.0,
    "T2": 300.0,
    "T3": 300.0,
    "T4": 500.0,
    "T5": 300.0,
    "T6": 1500.0,
    "T7": 600.0,
}
"""Lower edge of the background fit of each stream's spectra, GeV."""

PAIRS: Final = ("jj", "jb", "bb", "je", "be", "jm", "bm", "jg", "bg")
"""The nine leading-object pairs in PHYSICS.md order, the columns of `leading_pair_masses`."""

PAIR_OBJECTS: Final[Mapping[str, tuple[tuple[str, int], tuple[str, int]]]] = {
    "jj": (("jets", 0), ("jets", 1)),
    "jb": (("jets", 0), ("bjets", 0)),
    "bb": (("bjets", 0), ("bjets", 1)),
    "je": (("jets", 0), ("electrons", 0)),
    "be": (("bjets", 0), ("electrons", 0)),
    "jm": (("jets", 0), ("muons", 0)),
    "bm": (("bjets", 0), ("muons", 0)),
    "jg": (("jets", 0), ("photons", 0)),
    "bg": (("bjets", 0), ("photons", 0)),
}
"""(collection, rank) of the two objects of each pair; rank 0 is the leading object."""

SPECTRUM_NAMES: Final = tuple(f"{stream}/{pair}" for stream in STREAMS for pair in PAIRS)
"""The 63 spectra, stream-major: "T1/jj", "T1/jb", ..., "T7/bg"."""

BINNING_START_GEV: Final = 35.0
"""First edge of the resolution binning, GeV."""

BINNING_STOP_GEV: Final = 13000.0
"""The binning ends at the first edge above this mass, GeV."""


@dataclass(frozen=True)
class StreamRequirements:
    """Offline stream thresholds on selected objects (PHYSICS.md table 3), all in GeV."""

    met_min: float = 200.0
    lepton_pt_min: float = 60.0
    dilepton_pt_min: float = 25.0
    photon_pt_min: float = 150.0
    diphoton_pt_min: float = 30.0
    jet_pt_min: float = 500.0
    fourjet_leading_pt_min: float = 200.0
    fourjet_other_pt_min: float = 100.0


DEFAULT_STREAM_REQUIREMENTS: Final = StreamRequirements()
"""The stream thresholds of PHYSICS.md table 3."""


def _count_above(collection: ak.Array, threshold: float) -> IntArray:
    return np.asarray(ak.to_numpy(ak.sum(collection.pt > threshold, axis=1)), dtype=np.int64)


def _leading_pt(collection: ak.Array) -> FloatArray:
    leading = ak.fill_none(ak.max(collection.pt, axis=1), 0.0)
    return np.asarray(ak.to_numpy(leading), dtype=np.float64)


def stream_bits(
    chunk: EventChunk,
    requirements: StreamRequirements = DEFAULT_STREAM_REQUIREMENTS,
    *,
    validate: bool = True,
) -> BoolArray:
    """Membership of each event in the 7 trigger streams, bool (n, 7) in `STREAMS` order.

    Leptons are electrons and muons; jets are light and b-jets together (T6, T7). T7 asks
    for four jets above `fourjet_other_pt_min` of which the leading one is above
    `fourjet_leading_pt_min`. `validate=False` skips `check_kinematics` (already done).
    """
    if validate:
        check_kinematics(chunk)
    req = requirements
    leptons = [chunk.muons, chunk.electrons]
    jets = [chunk.jets, chunk.bjets]
    leading_jet = np.maximum(_leading_pt(chunk.jets), _leading_pt(chunk.bjets))
    bits = np.column_stack(
        [
            chunk.met_pt > req.met_min,
            sum(_count_above(c, req.lepton_pt_min) for c in leptons) >= 1,
            sum(_count_above(c, req.dilepton_pt_min) for c in leptons) >= 2,
            _count_above(chunk.photons, req.photon_pt_min) >= 1,
            _count_above(chunk.photons, req.diphoton_pt_min) >= 2,
            leading_jet > req.jet_pt_min,
            (sum(_count_above(c, req.fourjet_other_pt_min) for c in jets) >= 4)
            & (leading_jet > req.fourjet_leading_pt_min),
        ]
    )
    return np.asarray(bits, dtype=np.bool_).reshape(len(chunk), len(STREAMS))


def _object_four_vector(chunk: EventChunk, name: str, rank: int) -> FloatArray:
    """(E, px, py, pz) in GeV, shape (4, n), of the rank-th object of `name`; NaN if absent."""
    collection = chunk.collection(name)
    padded = ak.pad_none(collection[:, rank : rank + 1], 1, axis=1, clip=True)
    fields = [
        np.asarray(ak.to_numpy(ak.fill_none(padded[field][:, 0], np.nan)), dtype=np.float64)
        for field in ("pt", "eta", "phi", "mass")
    ]
    pt, eta, phi, mass = fields
    pz = pt * np.sinh(eta)
    energy = np.sqrt(pt * pt + pz * pz + np.sign(mass) * mass * mass)
    return np.stack([energy, pt * np.cos(phi), pt * np.sin(phi), pz])


def leading_pair_masses(chunk: EventChunk, *, validate: bool = True) -> FloatArray:
    """Invariant masses (n, 9) in GeV of the leading-object pairs `PAIRS`; NaN where absent.

    m = sqrt(m^2), or -sqrt(-m^2) when m^2 < 0, as in the RMM; E^2 = p^2 + sign(m) m^2.
    `validate=False` skips `check_kinematics` (already done).
    """
    if validate:
        check_kinematics(chunk)
    vectors = {
        key: _object_four_vector(chunk, *key)
        for key in {obj for pair in PAIR_OBJECTS.values() for obj in pair}
    }
    masses = np.empty((len(chunk), len(PAIRS)), dtype=np.float64)
    for column, pair in enumerate(PAIRS):
        first, second = PAIR_OBJECTS[pair]
        total = vectors[first] + vectors[second]
        m_squared = total[0] ** 2 - total[1] ** 2 - total[2] ** 2 - total[3] ** 2
        masses[:, column] = np.sign(m_squared) * np.sqrt(np.abs(m_squared))
    return masses


RESOLUTION_STOCHASTIC: Final = 0.84
"""Stochastic term a of the mass resolution w(m) = m sqrt(a^2 / m + b^2), sqrt(GeV)."""

RESOLUTION_CONSTANT: Final = 0.016
"""Constant term b of the mass resolution w(m) = m sqrt(a^2 / m + b^2)."""


@overload
def mass_resolution(mass_gev: float) -> float: ...


@overload
def mass_resolution(mass_gev: npt.ArrayLike) -> FloatArray: ...


def mass_resolution(mass_gev: float | npt.ArrayLike) -> float | FloatArray:
    """Detector mass resolution w(m) = m sqrt(0.84^2 / m + 0.016^2) in GeV (m in GeV).

    The one definition of PHYSICS.md section 3: it sets the bin widths of the spectra and
    the width of a signal. A float gives a float, an array an array of the same shape.
    """
    if isinstance(mass_gev, int | float):
        mass = float(mass_gev)
        if not (math.isfinite(mass) and mass > 0):
            raise InvalidInputError(
                f"the mass resolution needs a finite, positive mass (mass > 0 GeV), found {mass}"
            )
        return mass * math.sqrt(RESOLUTION_STOCHASTIC**2 / mass + RESOLUTION_CONSTANT**2)
    masses = np.asarray(mass_gev, dtype=np.float64)
    bad = ~(np.isfinite(masses) & (masses > 0))
    if np.any(bad):
        raise InvalidInputError(
            f"the mass resolution needs finite, positive masses (mass > 0 GeV), found "
            f"{masses[bad][:5].tolist()}"
        )
    return np.asarray(
        masses * np.sqrt(RESOLUTION_STOCHASTIC**2 / masses + RESOLUTION_CONSTANT**2),
        dtype=np.float64,
    )


@functools.cache
def _resolution_edges(start: float, stop: float) -> tuple[float, ...]:
    edges = [start]
    while edges[-1] <= stop:
        edges.append(edges[-1] + mass_resolution(edges[-1]))
    return tuple(edges)


def mass_bin_edges(
    start_gev: float = BINNING_START_GEV, stop_gev: float = BINNING_STOP_GEV
) -> FloatArray:
    """Resolution bin edges in GeV: e_{k+1} = e_k + w(e_k), w = `mass_resolution`.

    They start at `start_gev` and end at the first edge above `stop_gev` (178 bins from
    35 GeV to 13093 GeV by default).
    """
    if not (math.isfinite(start_gev) and math.isfinite(stop_gev) and 0 < start_gev < stop_gev):
        raise InvalidInputError(
            f"mass_bin_edges needs 0 < start < stop (finite, GeV), found start={start_gev}, "
            f"stop={stop_gev}"
        )
    return np.array(_resolution_edges(float(start_gev), float(stop_gev)), dtype=np.float64)


def _column_index(name: str, names: tuple[str, ...], what: str) -> int:
    if name not in names:
        raise InvalidInputError(f"unknown {what} {name!r}; expected one of {names}")
    return names.index(name)


def _check_shapes(
    masses: FloatArray, bits: BoolArray, mask: BoolArray | None
) -> tuple[FloatArray, BoolArray, BoolArray | None]:
    masses = np.asarray(masses, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.bool_)
    if masses.ndim != 2 or masses.shape[1] != len(PAIRS):
        raise InvalidInputError(
            f"masses must have shape (n, {len(PAIRS)}) (columns {PAIRS}), found {masses.shape}"
        )
    if bits.shape != (len(masses), len(STREAMS)):
        raise InvalidInputError(
            f"stream bits must have shape ({len(masses)}, {len(STREAMS)}) to match the masses, "
            f"found {bits.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(masses),):
            raise InvalidInputError(
                f"the event mask must be a bool array of shape ({len(masses)},), "
                f"found {mask.dtype} {mask.shape}"
            )
    return masses, bits, mask


def histogram(
    masses: FloatArray,
    bits: BoolArray,
    stream: str,
    pair: str,
    mask: BoolArray | None = None,
) -> tuple[IntArray, FloatArray]:
    """Spectrum of `pair` (e.g. "jm") for events in `stream` (e.g. "T2") and `mask`.

    Returns (counts per bin, edges in GeV) on `mass_bin_edges()`; events without the pair or
    outside the binning are not counted.
    """
    masses, bits, mask = _check_shapes(masses, bits, mask)
    column = _column_index(pair, PAIRS, "pair")
    selected = bits[:, _column_index(stream, STREAMS, "stream")]
    if mask is not None:
        selected = selected & mask
    return mass_counts(masses[selected, column]), mass_bin_edges()


def mass_counts(values: FloatArray) -> IntArray:
    """Counts per bin of `mass_bin_edges()` of the finite masses in `values` (GeV)."""
    counts, _ = np.histogram(values[np.isfinite(values)], bins=mass_bin_edges())
    return counts.astype(np.int64)


@dataclass(frozen=True)
class Spectra:
    """The 63 spectra: counts (63, n_bins) per `names`, on common edges in GeV."""

    names: tuple[str, ...]
    counts: IntArray
    edges: FloatArray

    def spectrum(self, name: str) -> IntArray:
        """Counts of the spectrum called `name`, e.g. "T2/jm"."""
        counts: IntArray = self.counts[_column_index(name, self.names, "spectrum")]
        return counts


def mass_bins(masses: FloatArray, edges: FloatArray) -> tuple[IntArray, BoolArray]:
    """The bin of every mass on `edges` and whether it is counted (as `np.histogram` does).

    A mass counts when finite and within [edges[0], edges[-1]]; the last edge belongs to
    the last bin. Returns (bin index, counted), each of the shape of `masses`.
    """
    n_bins = len(edges) - 1
    in_range = np.isfinite(masses) & (masses >= edges[0]) & (masses <= edges[-1])
    bin_index = np.clip(np.searchsorted(edges, masses, side="right") - 1, 0, n_bins - 1)
    return bin_index, in_range


def all_spectra(masses: FloatArray, bits: BoolArray, mask: BoolArray | None = None) -> Spectra:
    """The 63 spectra (7 streams x 9 pairs) of the events in `mask` (all events if None)."""
    masses, bits, mask = _check_shapes(masses, bits, mask)
    edges = mass_bin_edges()
    n_bins = len(edges) - 1
    bin_index, in_range = mass_bins(masses, edges)
    if mask is not None:
        bits = bits & mask[:, None]
    counts = np.zeros((len(STREAMS), len(PAIRS), n_bins), dtype=np.int64)
    for s in range(len(STREAMS)):
        for p in range(len(PAIRS)):
            chosen = bits[:, s] & in_range[:, p]
            counts[s, p] = np.bincount(bin_index[chosen, p], minlength=n_bins)
    return Spectra(SPECTRUM_NAMES, counts.reshape(len(SPECTRUM_NAMES), n_bins), edges)
