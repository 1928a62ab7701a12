"""Objects of a chunk as read, before selection, and the array helpers that build them.

Every schema converts its branches into `RawEvents`: jagged records with pt, eta, phi, mass
(GeV) and passes_id per collection, plus MET, the event ids and the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import awkward as ak
import numpy as np
import numpy.typing as npt

LEPTON_TYPES: Final = ("muons", "electrons", "photons")
"""The collections besides jets (photons included: they take part in the overlap removal)."""

FloatArray = npt.NDArray[np.float64]
Four = tuple[ak.Array, ak.Array, ak.Array, ak.Array]
"""(pt, eta, phi, mass) of a collection, jagged."""


@dataclass(frozen=True)
class RawEvents:
    """Objects of a chunk before selection: jagged records with pt, eta, phi, mass, passes_id.

    `jets` also carries `btag`, the discriminant of the chosen tagger. GeV throughout.
    """

    collections: Mapping[str, ak.Array]
    met_pt: FloatArray
    met_phi: FloatArray
    run: npt.NDArray[np.int64]
    event: npt.NDArray[np.int64]
    weight: FloatArray
    soft_met: tuple[FloatArray, FloatArray] | None = None
    """When set, MET is rebuilt from the selected objects plus this soft term (px, py)."""
    lumi_block: npt.NDArray[np.int64] | None = None

    def masked(self, keep: npt.NDArray[np.bool_]) -> RawEvents:
        """The events where `keep` is True."""
        soft = None if self.soft_met is None else (self.soft_met[0][keep], self.soft_met[1][keep])
        return RawEvents(
            {name: objects[keep] for name, objects in self.collections.items()},
            self.met_pt[keep],
            self.met_phi[keep],
            self.run[keep],
            self.event[keep],
            self.weight[keep],
            soft,
            None if self.lumi_block is None else self.lumi_block[keep],
        )


def float_jagged(arrays: ak.Array, name: str) -> ak.Array:
    """Branch `name` of a chunk as float64 (jagged or flat)."""
    return ak.values_astype(arrays[name], np.float64)


def numpy_values(values: Any, dtype: type[np.generic] = np.float64) -> npt.NDArray[Any]:
    """A flat awkward array as a NumPy array of `dtype`."""
    return np.asarray(ak.to_numpy(values), dtype=dtype)


def four_from_cartesian(px: ak.Array, py: ak.Array, pz: ak.Array, energy: ak.Array) -> Four:
    """(pt, eta, phi, signed mass) from (px, py, pz, E); mass < 0 encodes m^2 < 0."""
    pt = np.hypot(px, py)
    p = np.sqrt(pt**2 + pz**2)
    safe_pt = ak.where(pt > 0, pt, 1.0)
    eta = np.arcsinh(pz / safe_pt)
    phi = np.arctan2(py, px)
    mass2 = (energy - p) * (energy + p)
    mass = np.sign(mass2) * np.sqrt(np.abs(mass2))
    return pt, eta, phi, mass


def object_records(
    four: Four,
    passes_id: ak.Array | None = None,
    btag: ak.Array | None = None,
) -> ak.Array:
    """Jagged records pt, eta, phi, mass, passes_id (True when not given) and btag if given."""
    pt, eta, phi, mass = four
    fields: dict[str, ak.Array] = {"pt": pt, "eta": eta, "phi": phi, "mass": mass}
    fields["passes_id"] = ak.values_astype(
        ak.ones_like(pt, dtype=bool) if passes_id is None else passes_id, bool
    )
    if btag is not None:
        fields["btag"] = ak.values_astype(btag, np.float64)
    return ak.zip(fields)


def run_and_event_numbers(
    arrays: ak.Array, entry_start: int, run: str | None, event: str | None
) -> Any:
    """(run, event) numbers from their branches; run 0 and the entry number when absent."""
    n = len(arrays)
    run_numbers = (
        numpy_values(arrays[run], np.int64) if run is not None else np.zeros(n, dtype=np.int64)
    )
    event_numbers = (
        numpy_values(arrays[event], np.int64)
        if event is not None
        else np.arange(entry_start, entry_start + n, dtype=np.int64)
    )
    return run_numbers, event_numbers
