"""Object selection (PHYSICS.md section 1): kinematic cuts, identification, b-tag, overlap, MET.

`ObjectSelection` holds the cuts (recorded with every result); `select_objects` applies them
to the raw objects of a chunk and splits the jets into light jets and b-jets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import awkward as ak
import numpy as np

from core.events.raw import LEPTON_TYPES, RawEvents, numpy_values
from core.objects import EventChunk, make_collection


@dataclass(frozen=True)
class ObjectSelection:
    """Object selection and overlap removal (PHYSICS.md section 1); recorded with every result.

    Momenta in GeV. `btag_branch` / `btag_working_point` override the schema's tagger;
    ``"auto"`` takes the schema's first tagger that is filled in the file.
    """

    jet_pt_min: float = 30.0
    jet_abs_eta_max: float = 2.4
    muon_pt_min: float = 30.0
    electron_pt_min: float = 30.0
    photon_pt_min: float = 30.0
    lepton_abs_eta_max: float = 2.4
    photon_abs_eta_max: float = 2.4
    overlap_delta_r: float = 0.4
    met_min: float = 30.0
    use_identification: bool = True
    btag_branch: str = "auto"
    btag_working_point: float | None = None
    met_branches: tuple[str, str] | None = None
    """(px, py) branches, in the file's energy unit, that replace the schema's MET."""

    def as_dict(self) -> dict[str, Any]:
        """The selection as plain data, for run records and tool outputs."""
        return asdict(self)


def delta_phi(a: ak.Array, b: ak.Array) -> ak.Array:
    """Azimuthal difference a - b wrapped into [-pi, pi)."""
    return (a - b + np.pi) % (2 * np.pi) - np.pi


def select_objects(
    raw: RawEvents,
    selection: ObjectSelection,
    btag_working_point: float,
    *,
    source: str = "",
    entry_start: int = 0,
) -> EventChunk:
    """Apply the selection of PHYSICS.md section 1 to raw objects and split jets into j and b."""
    cuts = {
        "jets": (selection.jet_pt_min, selection.jet_abs_eta_max),
        "muons": (selection.muon_pt_min, selection.lepton_abs_eta_max),
        "electrons": (selection.electron_pt_min, selection.lepton_abs_eta_max),
        "photons": (selection.photon_pt_min, selection.photon_abs_eta_max),
    }
    selected = {}
    for name, (pt_min, eta_max) in cuts.items():
        objects = raw.collections[name]
        keep = (objects.pt > pt_min) & (abs(objects.eta) < eta_max)
        if selection.use_identification:
            keep = keep & objects.passes_id
        selected[name] = objects[keep]
    jets = selected["jets"]
    others = ak.concatenate([selected[n][["eta", "phi"]] for n in LEPTON_TYPES], axis=1)
    pairs = ak.cartesian({"jet": jets[["eta", "phi"]], "other": others}, nested=True)
    delta_r2 = (pairs.jet.eta - pairs.other.eta) ** 2 + delta_phi(
        pairs.jet.phi, pairs.other.phi
    ) ** 2
    isolated = ak.all(delta_r2 >= selection.overlap_delta_r**2, axis=2)
    jets = jets[isolated]
    is_b = jets.btag > btag_working_point
    collections = {"jets": jets[~is_b], "bjets": jets[is_b]}
    collections.update({n: selected[n] for n in LEPTON_TYPES})
    built = {n: make_collection(c.pt, c.eta, c.phi, c.mass) for n, c in collections.items()}
    met_pt, met_phi = raw.met_pt, raw.met_phi
    if raw.soft_met is not None:
        px, py = raw.soft_met
        for collection in built.values():
            px = px - numpy_values(ak.sum(collection.pt * np.cos(collection.phi), axis=1))
            py = py - numpy_values(ak.sum(collection.pt * np.sin(collection.phi), axis=1))
        met_pt, met_phi = np.hypot(px, py), np.arctan2(py, px)
    met_pt = np.where(met_pt < selection.met_min, 0.0, met_pt)
    return EventChunk(
        **built,
        met_pt=met_pt,
        met_phi=met_phi,
        run=raw.run,
        event=raw.event,
        weight=raw.weight,
        source=source,
        entry_start=entry_start,
    )
