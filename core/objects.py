"""The selected physics objects of a chunk of events, the common currency of the core.

Every reader (NanoAOD, ATLAS open data, PHYSLITE, cartesian, user mapping) produces an
`EventChunk`; the RMM, the masses and the event table consume it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import awkward as ak
import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError

OBJECT_TYPES: Final = ("jets", "bjets", "muons", "electrons", "photons")
"""Object collections in RMM block order (after MET)."""

OBJECT_FIELDS: Final = ("pt", "eta", "phi", "mass")
"""Fields of every object record: pt and mass in GeV, eta and phi dimensionless.

A mass may be negative: it then stands for m^2 = -mass^2 (a four-vector whose m^2 < 0
from rounding), so that E^2 = p^2 + sign(mass) mass^2 is exact.
"""


IntArray = npt.NDArray[np.int64]

_MIX_1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2: Final = np.uint64(0x94D049BB133111EB)
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)


def _mix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finaliser: a bijection of uint64 that spreads every input bit."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def file_id(identity: uuid.UUID | str | None, path: str = "") -> int:
    """A 63-bit number that names one input file: from its ROOT UUID (path if it has none).

    The UUID travels with the file's bytes (a copy keeps it, a regenerated file gets a new
    one), so the same events read from a moved file keep their keys.
    """
    text = str(identity) if identity is not None else f"path:{path}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def event_keys(
    run: npt.ArrayLike,
    lumi_block: npt.ArrayLike | None,
    event: npt.ArrayLike,
    source: int = 0,
) -> IntArray:
    """The identity of each event as one int64: (source file, run, luminosity block, event).

    Multi-run data repeats event numbers, and two simulated files repeat (run, event); every
    join, tie-break and training selection uses this key so that neither can alias. A
    missing luminosity block counts as 0.
    """
    runs = np.asarray(run, dtype=np.int64).astype(np.uint64)
    events = np.asarray(event, dtype=np.int64).astype(np.uint64)
    blocks = (
        np.zeros_like(runs)
        if lumi_block is None
        else np.asarray(lumi_block, dtype=np.int64).astype(np.uint64)
    )
    if not runs.shape == events.shape == blocks.shape:
        raise InvalidInputError(
            f"run {runs.shape}, luminosity block {blocks.shape} and event {events.shape} "
            "numbers must have one entry per event"
        )
    key = _mix(np.full(runs.shape, np.uint64(source), dtype=np.uint64))
    for part in (runs, blocks, events):
        key = _mix(key ^ part)
    return np.asarray(key.view(np.int64), dtype=np.int64)


@dataclass(frozen=True)
class EventChunk:
    """Selected objects of a block of events.

    Each collection is a jagged awkward array of records with fields `OBJECT_FIELDS`,
    sorted by decreasing pt within each event. `met_pt` is already set to 0 below the
    selection's MET threshold. Energies and momenta in GeV.
    """

    jets: ak.Array
    bjets: ak.Array
    muons: ak.Array
    electrons: ak.Array
    photons: ak.Array
    met_pt: npt.NDArray[np.float64]
    met_phi: npt.NDArray[np.float64]
    run: npt.NDArray[np.int64]
    event: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float64]
    source: str = ""
    entry_start: int = 0
    lumi_block: npt.NDArray[np.int64] | None = None
    n_outside_good_runs: int = 0
    """Events of this chunk's entry range dropped by the good-run list."""
    source_id: int = 0
    """`file_id` of the file the events were read from (0 for hand-made events)."""
    key: IntArray | None = None
    """Per-event identity (`event_keys`); set by the readers, which may join several files."""
    non_finite: Mapping[str, int] = field(default_factory=dict)
    """Non-finite values (NaN, inf) read per branch (core.events.NON_FINITE_RULE)."""
    dropped_non_finite: Mapping[str, int] = field(default_factory=dict)
    """Objects per type, and events (key "events"), dropped for a non-finite value."""

    def __len__(self) -> int:
        return len(self.met_pt)

    def keys(self) -> IntArray:
        """The identity key of every event (see `event_keys`)."""
        if self.key is not None:
            return self.key
        return event_keys(self.run, self.lumi_block, self.event, self.source_id)

    def collection(self, name: str) -> ak.Array:
        """Return the collection called `name` (one of `OBJECT_TYPES`)."""
        if name not in OBJECT_TYPES:
            raise KeyError(f"unknown object collection {name!r}; expected one of {OBJECT_TYPES}")
        value: ak.Array = getattr(self, name)
        return value


def make_collection(
    pt: ak.Array | npt.ArrayLike,
    eta: ak.Array | npt.ArrayLike,
    phi: ak.Array | npt.ArrayLike,
    mass: ak.Array | npt.ArrayLike,
) -> ak.Array:
    """Zip jagged pt/eta/phi/mass into records sorted by decreasing pt in each event."""
    records = ak.zip(
        {
            "pt": ak.values_astype(ak.Array(pt), np.float64),
            "eta": ak.values_astype(ak.Array(eta), np.float64),
            "phi": ak.values_astype(ak.Array(phi), np.float64),
            "mass": ak.values_astype(ak.Array(mass), np.float64),
        }
    )
    order = ak.argsort(records.pt, axis=1, ascending=False, stable=True)
    return records[order]


def chunk_from_lists(
    objects: dict[str, list[list[tuple[float, float, float, float]]]],
    met_pt: npt.ArrayLike,
    met_phi: npt.ArrayLike,
    *,
    event: npt.ArrayLike | None = None,
) -> EventChunk:
    """Build an `EventChunk` from Python lists of (pt, eta, phi, mass) per event.

    Meant for tests and hand-made events: missing collections are empty.
    """
    met = np.asarray(met_pt, dtype=np.float64)
    n = len(met)
    collections = {}
    for name in OBJECT_TYPES:
        per_event = objects.get(name, [[] for _ in range(n)])
        if len(per_event) != n:
            raise InvalidInputError(
                f"collection {name!r} has {len(per_event)} events, expected {n}"
            )
        counts = np.array([len(ev) for ev in per_event], dtype=np.int64)
        fields = [
            ak.unflatten(
                np.array([obj[i] for ev in per_event for obj in ev], dtype=np.float64), counts
            )
            for i in range(4)
        ]
        collections[name] = make_collection(*fields)
    ids = np.arange(n, dtype=np.int64) if event is None else np.asarray(event, dtype=np.int64)
    return EventChunk(
        **collections,
        met_pt=met,
        met_phi=np.asarray(met_phi, dtype=np.float64),
        run=np.ones(n, dtype=np.int64),
        event=ids,
        weight=np.ones(n, dtype=np.float64),
    )
