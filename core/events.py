"""Read events from ROOT files into selected physics objects (PHYSICS.md section 1).

Every input goes through `uproot` (TTree or RNTuple), chunk by chunk, so local paths,
`https://` URLs (fsspec + aiohttp) and `root://` URLs (with `fsspec-xrootd` installed)
work the same way. A schema maps the branches of one file format onto raw objects; the
`Selection` then applies the kinematic cuts, the identification flags, the b-tag split,
the overlap removal and the MET threshold, and returns an `EventChunk`.

Non-finite inputs (NaN, +-inf) are never dropped silently: every value read is checked, the
count per branch travels with the chunk (`EventChunk.non_finite`) and the objects and events
removed for it in `EventChunk.dropped_non_finite`; the rule is `NON_FINITE_RULE`.

Schemas: ``nanoaod`` (CMS NanoAOD), ``atlas_opendata`` (ATLAS 13 TeV open-data ntuples,
MeV), ``cartesian`` (Px/Py/Pz/E branches as in uproot-HZZ.root), and ``mapping`` (a user
TOML that maps any flat or jagged ntuple, see `ColumnMapping`). ``auto`` picks the first
schema whose identifying branches are all present, including the built-in mappings in
``core/mappings/``.
"""

from __future__ import annotations

import math
import struct
import tomllib
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt
import uproot

from core.errors import AnomscanError, InputFileError, InvalidInputError, SchemaError
from core.files import check_regular_file, read_user_text
from core.goodruns import GoodRunList
from core.objects import OBJECT_TYPES, EventChunk, event_keys, file_id, make_collection

SchemaName = Literal["auto", "nanoaod", "atlas_opendata", "physlite", "cartesian", "mapping"]
SCHEMA_NAMES: Final = ("auto", "nanoaod", "atlas_opendata", "physlite", "cartesian", "mapping")
LEPTON_TYPES: Final = ("muons", "electrons", "photons")
MAPPINGS_DIR: Final = Path(__file__).with_name("mappings")
EVENT_TREE_NAMES: Final = ("Events", "events", "EventData", "CollectionTree", "mini", "nominal")
"""Tree names taken first when a file holds several trees (NanoAOD, PHYSLITE, open data)."""

FloatArray = npt.NDArray[np.float64]

NON_FINITE_RULE: Final = (
    "a non-finite value (NaN or infinity) is counted per branch; an object with a non-finite "
    "pt, eta, phi or mass is dropped, an event with a non-finite MET or weight is dropped, a "
    "jet with a non-finite b-tag score is a light jet, and an object with a non-finite "
    "isolation fails the identification"
)
"""What the reader does with non-finite inputs (reported with every result that has any)."""


@dataclass(frozen=True)
class Selection:
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


@dataclass(frozen=True)
class ReadPlan:
    """How one file is read: the tree, the branches, the schema and the chosen b-tagger."""

    path: str
    tree: str
    schema: str
    branches: tuple[str, ...]
    btag_branch: str | None
    btag_working_point: float
    num_entries: int
    notes: tuple[str, ...] = ()
    file_uuid: str | None = None
    """The ROOT file's UUID (its identity for event keys and the event pass's provenance)."""


# --------------------------------------------------------------------------- helpers


def _jagged(arrays: ak.Array, name: str) -> ak.Array:
    return ak.values_astype(arrays[name], np.float64)


def _numpy(values: Any, dtype: type[np.generic] = np.float64) -> npt.NDArray[Any]:
    return np.asarray(ak.to_numpy(values), dtype=dtype)


def _per_event(arrays: ak.Array, branch: str, path: str) -> FloatArray:
    """One float per event from `branch`; SchemaError when it holds lists."""
    values = arrays[branch]
    if values.ndim != 1:
        raise SchemaError(
            f"branch {branch} of {path} holds {values.type}, not one value per event; "
            "a MET branch must be a scalar per event"
        )
    return _numpy(values)


def _signed_mass_from_cartesian(px: ak.Array, py: ak.Array, pz: ak.Array, energy: ak.Array) -> Four:
    """(pt, eta, phi, signed mass) from (px, py, pz, E); mass < 0 encodes m^2 < 0."""
    pt = np.hypot(px, py)
    p = np.sqrt(pt**2 + pz**2)
    safe_pt = ak.where(pt > 0, pt, 1.0)
    eta = np.arcsinh(pz / safe_pt)
    phi = np.arctan2(py, px)
    mass2 = (energy - p) * (energy + p)
    mass = np.sign(mass2) * np.sqrt(np.abs(mass2))
    return pt, eta, phi, mass


def _signed_mass_from_energy(pt: ak.Array, eta: ak.Array, energy: ak.Array) -> ak.Array:
    p = pt * np.cosh(eta)
    mass2 = (energy - p) * (energy + p)
    return np.sign(mass2) * np.sqrt(np.abs(mass2))


Four = tuple[ak.Array, ak.Array, ak.Array, ak.Array]


def _records(
    four: Four,
    passes_id: ak.Array | None = None,
    btag: ak.Array | None = None,
) -> ak.Array:
    pt, eta, phi, mass = four
    fields: dict[str, ak.Array] = {"pt": pt, "eta": eta, "phi": phi, "mass": mass}
    fields["passes_id"] = ak.values_astype(
        ak.ones_like(pt, dtype=bool) if passes_id is None else passes_id, bool
    )
    if btag is not None:
        fields["btag"] = ak.values_astype(btag, np.float64)
    return ak.zip(fields)


def _ids(arrays: ak.Array, entry_start: int, run: str | None, event: str | None) -> Any:
    n = len(arrays)
    run_numbers = _numpy(arrays[run], np.int64) if run is not None else np.zeros(n, dtype=np.int64)
    event_numbers = (
        _numpy(arrays[event], np.int64)
        if event is not None
        else np.arange(entry_start, entry_start + n, dtype=np.int64)
    )
    return run_numbers, event_numbers


def _empty_collection(n: int) -> ak.Array:
    values = ak.unflatten(np.zeros(0, dtype=np.float64), np.zeros(n, dtype=np.int64))
    return _records((values, values, values, values))


# --------------------------------------------------------------------------- schemas

COLLECTION_PREFIXES: Final = {
    "jets": "Jet",
    "muons": "Muon",
    "electrons": "Electron",
    "photons": "Photon",
}
"""Branch prefixes of the CMS-style schemas (NanoAOD, cartesian)."""


def _prefixed(components: tuple[str, ...]) -> list[str]:
    """``Jet_pt``-style branch names of every collection for the given components."""
    return [f"{prefix}_{c}" for prefix in COLLECTION_PREFIXES.values() for c in components]


class Schema:
    """Base of the event schemas: which branches identify it and how to convert them."""

    name: str = ""
    identifying: tuple[str, ...] = ()
    taggers: tuple[tuple[str, float], ...] = ()
    flags: tuple[str, ...] = ()
    """Identification flags: skipped with a note when unfilled (never true) in a file."""
    energy_scale: float = 1.0
    """GeV per unit of the file's energies."""
    lumi_block_branch: str | None = None
    """Branch of the luminosity block, needed to apply a good-run list."""
    run_branch: str | None = None
    """Branch of the run number."""

    def matches(self, available: set[str]) -> bool:
        """True when every identifying branch is present."""
        return all(branch in available for branch in self.identifying)

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Branches to read (all must exist)."""
        raise NotImplementedError

    def optional_branches(self) -> tuple[str, ...]:
        """Branches read only when present (identification flags, weights, ids)."""
        return ()

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects in GeV from one chunk of branches."""
        raise NotImplementedError


class NanoAODSchema(Schema):
    """CMS NanoAOD: Jet_/Muon_/Electron_/Photon_ pt, eta, phi, mass; MET_pt, MET_phi.

    Identification, when present: jets tight (``Jet_jetId & 2``), muons ``Muon_tightId`` with
    ``Muon_pfRelIso04_all < 0.15``, electrons ``Electron_cutBased >= 3`` (medium), photons
    ``Photon_cutBased >= 2`` (medium). Taggers in order of preference, medium working
    points: DeepJet 0.2783, DeepCSV 0.4184, CSVv2 0.8484 (CMS BTV recommendations).
    """

    name = "nanoaod"
    identifying = ("nJet", "Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "MET_pt", "MET_phi")
    taggers = (("Jet_btagDeepFlavB", 0.2783), ("Jet_btagDeepB", 0.4184), ("Jet_btagCSVV2", 0.8484))
    flags = ("Jet_jetId", "Muon_tightId", "Electron_cutBased", "Photon_cutBased")
    lumi_block_branch = "luminosityBlock"
    run_branch = "run"
    prefixes = COLLECTION_PREFIXES

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Four-vector branches of every collection plus MET."""
        return ["MET_pt", "MET_phi", *_prefixed(("pt", "eta", "phi", "mass"))]

    def optional_branches(self) -> tuple[str, ...]:
        """ID flags, isolation, event ids and the generator weight."""
        return (
            "run",
            "event",
            "genWeight",
            "Jet_jetId",
            "Muon_tightId",
            "Muon_pfRelIso04_all",
            "Electron_cutBased",
            "Photon_cutBased",
        )

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw NanoAOD objects (already in GeV)."""
        fields = set(arrays.fields)
        identification: dict[str, ak.Array | None] = {
            "jets": (arrays.Jet_jetId & 2) > 0 if "Jet_jetId" in fields else None,
            "muons": None,
            "electrons": arrays.Electron_cutBased >= 3 if "Electron_cutBased" in fields else None,
            "photons": arrays.Photon_cutBased >= 2 if "Photon_cutBased" in fields else None,
        }
        if "Muon_tightId" in fields:
            identification["muons"] = ak.values_astype(arrays.Muon_tightId, bool)
        if "Muon_pfRelIso04_all" in fields:
            isolated = arrays.Muon_pfRelIso04_all < 0.15
            tight = identification["muons"]
            identification["muons"] = isolated if tight is None else tight & isolated
        collections = {}
        for name, prefix in self.prefixes.items():
            pt, eta, phi, mass = (
                _jagged(arrays, f"{prefix}_{v}") for v in ("pt", "eta", "phi", "mass")
            )
            btag = None
            if name == "jets":
                btag = _jagged(arrays, btag_branch) if btag_branch else ak.zeros_like(pt) - 1.0
            collections[name] = _records(
                (pt, eta, phi, mass), passes_id=identification[name], btag=btag
            )
        run, event = _ids(
            arrays,
            entry_start,
            "run" if "run" in fields else None,
            "event" if "event" in fields else None,
        )
        weight = _numpy(arrays.genWeight) if "genWeight" in fields else np.ones(len(arrays))
        return RawEvents(
            collections, _numpy(arrays.MET_pt), _numpy(arrays.MET_phi), run, event, weight
        )


class AtlasOpenDataSchema(Schema):
    """ATLAS 13 TeV open-data ntuples: lep_*, jet_*, photon_*, met_et/met_phi, in MeV.

    Leptons are split by ``lep_type`` (11 electron, 13 muon); identification uses
    ``lep_isTightID`` and ``photon_isTightID`` when present. b-tag: ``jet_MV2c10`` at the 70 %
    working point 0.8244273 (ATLAS open-data documentation, 2020 release).
    """

    name = "atlas_opendata"
    identifying = ("lep_pt", "lep_type", "jet_pt", "met_et", "met_phi")
    taggers = (("jet_MV2c10", 0.8244273),)
    energy_scale = 1e-3
    run_branch = "runNumber"
    flags = ("lep_isTightID", "photon_isTightID")
    mev: Final = 1e-3

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Four-vectors of leptons, jets and photons (pt, eta, phi, E) plus MET."""
        names = ["lep_type", "met_et", "met_phi"]
        for prefix in ("lep", "jet", "photon"):
            names += [f"{prefix}_{v}" for v in ("pt", "eta", "phi", "E")]
        return names

    def optional_branches(self) -> tuple[str, ...]:
        """Tight-ID flags, event ids and the MC weight."""
        return ("lep_isTightID", "photon_isTightID", "runNumber", "eventNumber", "mcWeight")

    def _four(self, arrays: ak.Array, prefix: str) -> Four:
        pt = _jagged(arrays, f"{prefix}_pt") * self.mev
        eta = _jagged(arrays, f"{prefix}_eta")
        phi = _jagged(arrays, f"{prefix}_phi")
        energy = _jagged(arrays, f"{prefix}_E") * self.mev
        return pt, eta, phi, _signed_mass_from_energy(pt, eta, energy)

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects in GeV from the MeV ntuple."""
        fields = set(arrays.fields)
        lepton = self._four(arrays, "lep")
        lepton_id = arrays.lep_isTightID if "lep_isTightID" in fields else None
        collections = {
            "jets": _records(
                self._four(arrays, "jet"),
                btag=_jagged(arrays, btag_branch) if btag_branch else None,
            ),
            "photons": _records(
                self._four(arrays, "photon"),
                passes_id=arrays.photon_isTightID if "photon_isTightID" in fields else None,
            ),
        }
        if not btag_branch:
            collections["jets"] = ak.with_field(
                collections["jets"], ak.zeros_like(collections["jets"].pt) - 1.0, "btag"
            )
        for name, pdg in (("muons", 13), ("electrons", 11)):
            keep = abs(arrays.lep_type) == pdg
            passes = None if lepton_id is None else ak.values_astype(lepton_id, bool)[keep]
            collections[name] = _records(
                (lepton[0][keep], lepton[1][keep], lepton[2][keep], lepton[3][keep]),
                passes_id=passes,
            )
        run, event = _ids(
            arrays,
            entry_start,
            "runNumber" if "runNumber" in fields else None,
            "eventNumber" if "eventNumber" in fields else None,
        )
        weight = _numpy(arrays.mcWeight) if "mcWeight" in fields else np.ones(len(arrays))
        return RawEvents(
            collections,
            _numpy(arrays.met_et) * self.mev,
            _numpy(arrays.met_phi),
            run,
            event,
            weight,
        )


class PhysliteSchema(Schema):
    """ATLAS DAOD_PHYSLITE (TTree or RNTuple): the Analysis* containers, in MeV.

    b-tagging follows ``AnalysisJetsAuxDyn:btaggingLink`` into the BTagging container and
    forms the GN2v01 discriminant D_b = ln(p_b / (f_c p_c + f_tau p_tau + (1 - f_c - f_tau)
    p_u)) with f_c = 0.2, f_tau = 0.01; the default cut 2.669 is the 77 % b-efficiency
    working point as we read the ATLAS flavour-tagging recommendations for GN2v01 on
    AntiKt4EMPFlow jets: check it against the CDI file of your release and override it with
    `Selection.btag_working_point`. Identification: electrons ``DFCommonElectronsLHMedium``,
    photons ``DFCommonPhotonsIsEMTight``; muons carry no simple flag and are not filtered.

    MET: PHYSLITE keeps only the MET core (soft) terms, so MET is rebuilt as minus the vector
    sum of the selected objects plus the ``PVSoftTrkCore`` soft term. This is an
    approximation of the ATLAS MET (no calibrated, JVT-selected jet term below 30 GeV) and
    every run records it; `Selection.met_branches` supplies a MET of your own instead.
    """

    name = "physlite"
    identifying = (
        "AnalysisJetsAuxDyn:pt",
        "AnalysisElectronsAuxDyn:pt",
        "AnalysisMuonsAuxDyn:pt",
        "AnalysisPhotonsAuxDyn:pt",
    )
    taggers = (("BTagging_AntiKt4EMPFlowAuxDyn:GN2v01_pb", 2.669),)
    flags = (
        "AnalysisElectronsAuxDyn:DFCommonElectronsLHMedium",
        "AnalysisPhotonsAuxDyn:DFCommonPhotonsIsEMTight",
    )
    containers: Final = {
        "jets": "AnalysisJetsAuxDyn",
        "muons": "AnalysisMuonsAuxDyn",
        "electrons": "AnalysisElectronsAuxDyn",
        "photons": "AnalysisPhotonsAuxDyn",
    }
    btagging: Final = "BTagging_AntiKt4EMPFlowAuxDyn"
    soft_term: Final = "PVSoftTrkCore"
    energy_scale = 1e-3
    lumi_block_branch = "EventInfoAuxDyn:lumiBlock"
    run_branch = "EventInfoAuxDyn:runNumber"
    charm_fraction: Final = 0.2
    tau_fraction: Final = 0.01
    muon_mass: Final = 105.658
    mev: Final = 1e-3

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Kinematics of the four containers and the MET core terms."""
        names = []
        for name, container in self.containers.items():
            names += [f"{container}:{v}" for v in ("pt", "eta", "phi")]
            if name != "muons":
                names.append(f"{container}:m")
        return [*names, *(f"MET_Core_AnalysisMETAuxDyn:{v}" for v in ("mpx", "mpy", "name"))]

    def optional_branches(self) -> tuple[str, ...]:
        """Event ids, MC weights, ID flags and the b-tagging link and probabilities."""
        return (
            "EventInfoAuxDyn:runNumber",
            "EventInfoAuxDyn:eventNumber",
            "EventInfoAuxDyn:mcEventWeights",
            *self.flags,
            "AnalysisJetsAuxDyn:btaggingLink",
            *(f"{self.btagging}:GN2v01_{p}" for p in ("pc", "pu", "ptau")),
        )

    def _discriminant(self, arrays: ak.Array) -> ak.Array:
        fields = set(arrays.fields)
        jets_pt = arrays["AnalysisJetsAuxDyn:pt"]
        needed = [f"{self.btagging}:GN2v01_{p}" for p in ("pb", "pc", "pu", "ptau")]
        if "AnalysisJetsAuxDyn:btaggingLink" not in fields or any(n not in fields for n in needed):
            return ak.zeros_like(jets_pt, dtype=np.float64) - np.inf
        pb, pc, pu, ptau = (ak.values_astype(arrays[n], np.float64) for n in needed)
        light = 1.0 - self.charm_fraction - self.tau_fraction
        denominator = self.charm_fraction * pc + self.tau_fraction * ptau + light * pu
        tiny = 1e-12
        score = np.log(np.maximum(pb, tiny) / np.maximum(denominator, tiny))
        link = arrays["AnalysisJetsAuxDyn:btaggingLink"].m_persIndex
        valid = link < ak.num(score)
        padded = ak.fill_none(ak.pad_none(score, 1, axis=1), -np.inf)
        return ak.where(valid, padded[ak.where(valid, link, 0)], -np.inf)

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects in GeV, jets with their GN2v01 discriminant, and the MET soft term."""
        fields = set(arrays.fields)
        collections = {}
        for name, container in self.containers.items():
            pt = _jagged(arrays, f"{container}:pt") * self.mev
            mass = (
                ak.zeros_like(pt) + self.muon_mass * self.mev
                if name == "muons"
                else _jagged(arrays, f"{container}:m") * self.mev
            )
            flag = next((f for f in self.flags if f.startswith(container)), None)
            passes = arrays[flag] != 0 if flag in fields else None
            btag = self._discriminant(arrays) if name == "jets" else None
            four = (
                pt,
                _jagged(arrays, f"{container}:eta"),
                _jagged(arrays, f"{container}:phi"),
                mass,
            )
            collections[name] = _records(four, passes_id=passes, btag=btag)
        run, event = _ids(
            arrays,
            entry_start,
            "EventInfoAuxDyn:runNumber" if "EventInfoAuxDyn:runNumber" in fields else None,
            "EventInfoAuxDyn:eventNumber" if "EventInfoAuxDyn:eventNumber" in fields else None,
        )
        weight = (
            _numpy(ak.firsts(arrays["EventInfoAuxDyn:mcEventWeights"]))
            if "EventInfoAuxDyn:mcEventWeights" in fields
            else np.ones(len(arrays))
        )
        zeros = np.zeros(len(arrays))
        if "MET_Core_AnalysisMETAuxDyn:mpx" not in fields:
            return RawEvents(collections, zeros, zeros, run, event, weight)
        is_soft = arrays["MET_Core_AnalysisMETAuxDyn:name"] == self.soft_term
        soft_px, soft_py = (
            _numpy(ak.sum(arrays[f"MET_Core_AnalysisMETAuxDyn:{c}"][is_soft], axis=1)) * self.mev
            for c in ("mpx", "mpy")
        )
        return RawEvents(collections, zeros, zeros, run, event, weight, (soft_px, soft_py))


class CartesianSchema(Schema):
    """Px/Py/Pz/E collections (Jet_, Muon_, Electron_, Photon_) and MET_px/MET_py, in GeV.

    As in uproot-HZZ.root: ``Jet_btag`` is -1 for untagged jets and a positive discriminant
    for tagged ones, so the working point is 0. ``EventWeight`` is the weight when present.
    """

    name = "cartesian"
    identifying = ("Jet_Px", "Jet_Py", "Jet_Pz", "Jet_E", "MET_px", "MET_py")
    taggers = (("Jet_btag", 0.0),)
    flags = ("Jet_ID",)
    prefixes = COLLECTION_PREFIXES

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Cartesian four-vectors of every collection plus MET components."""
        return ["MET_px", "MET_py", *_prefixed(("Px", "Py", "Pz", "E"))]

    def optional_branches(self) -> tuple[str, ...]:
        """Jet ID flag and event weight."""
        return ("Jet_ID", "EventWeight")

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects from cartesian components."""
        fields = set(arrays.fields)
        collections = {}
        for name, prefix in self.prefixes.items():
            four = _signed_mass_from_cartesian(
                *(_jagged(arrays, f"{prefix}_{v}") for v in ("Px", "Py", "Pz", "E"))
            )
            passes = arrays.Jet_ID if name == "jets" and "Jet_ID" in fields else None
            btag = None
            if name == "jets":
                btag = _jagged(arrays, btag_branch) if btag_branch else ak.zeros_like(four[0]) - 1
            collections[name] = _records(four, passes_id=passes, btag=btag)
        met_px, met_py = _numpy(arrays.MET_px), _numpy(arrays.MET_py)
        run, event = _ids(arrays, entry_start, None, None)
        weight = _numpy(arrays.EventWeight) if "EventWeight" in fields else np.ones(len(arrays))
        return RawEvents(
            collections, np.hypot(met_px, met_py), np.arctan2(met_py, met_px), run, event, weight
        )


@dataclass(frozen=True)
class CollectionMapping:
    """Branches of one collection: per-slot scalar branches (flat) or one jagged branch each.

    Either ``pt``/``eta``/``phi`` with ``mass`` (a branch or a constant in GeV), or
    ``px``/``py``/``pz``/``energy``. Each value is a branch name (jagged) or a list of branch
    names (one per object slot of a flat ntuple).
    """

    components: Mapping[str, str | float | list[str]]
    btag: str | None = None
    btag_working_point: float = 0.5

    def branch_names(self) -> list[str]:
        """Every branch this collection reads."""
        names: list[str] = []
        for value in self.components.values():
            if isinstance(value, str):
                names.append(value)
            elif isinstance(value, list):
                names += value
        if self.btag:
            names.append(self.btag)
        return names


@dataclass(frozen=True)
class ColumnMapping:
    """A user mapping from any ntuple onto the object collections (loaded from TOML).

    Example for uproot-Zmumu.root (``core/mappings/cms_dimuon_flat.toml``)::

        name = "cms_dimuon_flat"
        tree = "events"
        energy_unit = "GeV"      # or "MeV"
        [ids]
        run = "Run"
        event = "Event"
        [muons]
        px = ["px1", "px2"]
        py = ["py1", "py2"]
        pz = ["pz1", "pz2"]
        energy = ["E1", "E2"]
        [met]                  # optional: pt/phi or px/py branches
    """

    mapping_name: str = "mapping"
    tree: str | None = None
    energy_scale: float = 1.0
    collections_map: Mapping[str, CollectionMapping] = field(default_factory=dict)
    met: Mapping[str, str] = field(default_factory=dict)
    ids: Mapping[str, str] = field(default_factory=dict)
    source: str = ""


class MappingSchema(Schema):
    """The schema a `ColumnMapping` defines: named ``mapping:<name>``."""

    def __init__(self, mapping: ColumnMapping) -> None:
        self.mapping = mapping
        self.tree = mapping.tree
        self.name = f"mapping:{mapping.mapping_name}"
        self.energy_scale = mapping.energy_scale
        self.lumi_block_branch = mapping.ids.get("lumi_block")
        self.run_branch = mapping.ids.get("run")
        self.identifying = tuple(self._all_branches())
        jets = mapping.collections_map.get("jets")
        self.taggers = (
            () if jets is None or jets.btag is None else ((jets.btag, jets.btag_working_point),)
        )

    def _all_branches(self) -> list[str]:
        names: list[str] = []
        for collection in self.mapping.collections_map.values():
            names += [b for b in collection.branch_names() if b != collection.btag]
        names += list(self.mapping.met.values()) + list(self.mapping.ids.values())
        return names

    def branches(self, available: set[str], selection: Selection) -> list[str]:
        """Every mapped branch."""
        return self._all_branches()

    def _component(self, arrays: ak.Array, value: str | float | list[str]) -> ak.Array:
        if isinstance(value, str):
            return _jagged(arrays, value)
        if isinstance(value, list):
            slots = np.stack([_numpy(arrays[b]) for b in value], axis=1)
            return ak.Array(slots.tolist()) if len(slots) == 0 else ak.from_regular(ak.Array(slots))
        raise TypeError(f"constant {value!r} has no shape; combine it with another component")

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects from the mapped branches, scaled to GeV."""
        n = len(arrays)
        mapping = self.mapping
        scale = mapping.energy_scale
        collections = {}
        for name in ("jets", *LEPTON_TYPES):
            spec = mapping.collections_map.get(name)
            if spec is None:
                records = _empty_collection(n)
            else:
                comps = spec.components
                if "px" in comps:
                    pt, eta, phi, mass = _signed_mass_from_cartesian(
                        *(
                            self._component(arrays, comps[k]) * scale
                            for k in ("px", "py", "pz", "energy")
                        )
                    )
                else:
                    pt = self._component(arrays, comps["pt"]) * scale
                    eta = self._component(arrays, comps["eta"])
                    phi = self._component(arrays, comps["phi"])
                    raw_mass = comps.get("mass", 0.0)
                    if isinstance(raw_mass, int | float):
                        mass = ak.zeros_like(pt) + float(raw_mass)
                    else:
                        mass = self._component(arrays, raw_mass) * scale
                btag = None
                if name == "jets" and spec.btag:
                    btag = self._component(arrays, spec.btag)
                records = _records((pt, eta, phi, mass), btag=btag)
            if name == "jets" and "btag" not in records.fields:
                records = ak.with_field(records, ak.zeros_like(records.pt) - 1.0, "btag")
            collections[name] = records
        met = mapping.met
        if "pt" in met:
            met_pt = _numpy(arrays[met["pt"]]) * scale
            met_phi = _numpy(arrays[met["phi"]])
        elif "px" in met:
            px, py = _numpy(arrays[met["px"]]) * scale, _numpy(arrays[met["py"]]) * scale
            met_pt, met_phi = np.hypot(px, py), np.arctan2(py, px)
        else:
            met_pt, met_phi = np.zeros(n), np.zeros(n)
        ids = mapping.ids
        run, event = _ids(arrays, entry_start, ids.get("run"), ids.get("event"))
        weight = _numpy(arrays[ids["weight"]]) if "weight" in ids else np.ones(n)
        return RawEvents(collections, met_pt, met_phi, run, event, weight)


def load_mapping(path: str | Path) -> ColumnMapping:
    """Read a column mapping from a TOML file (see `ColumnMapping` for the format)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"column mapping {path} does not exist")
    try:
        data = tomllib.loads(read_user_text(path, "column mapping"))
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"column mapping {path} is not valid TOML: {error}") from error
    _check_mapping_types(data, path)
    units = {"GeV": 1.0, "MeV": 1e-3, "TeV": 1e3}
    unit = data.get("energy_unit", "GeV")
    if unit not in units:
        raise InvalidInputError(f"column mapping {path}: energy_unit {unit!r} not in {list(units)}")
    collections: dict[str, CollectionMapping] = {}
    for name in ("jets", *LEPTON_TYPES):
        if name not in data:
            continue
        spec = dict(data[name])
        btag = spec.pop("btag", None)
        working_point = float(spec.pop("btag_working_point", 0.5))
        keys = set(spec)
        if not ({"px", "py", "pz", "energy"} <= keys or {"pt", "eta", "phi"} <= keys):
            raise InvalidInputError(
                f"column mapping {path}: [{name}] needs px, py, pz, energy or pt, eta, phi "
                f"(and mass); found {sorted(keys)}"
            )
        collections[name] = CollectionMapping(spec, btag, working_point)
    if not collections:
        raise InvalidInputError(
            f"column mapping {path} maps no collection; add a [jets], [muons], [electrons] "
            "or [photons] table"
        )
    return ColumnMapping(
        mapping_name=str(data.get("name", path.stem)),
        tree=data.get("tree"),
        energy_scale=units[unit],
        collections_map=collections,
        met=dict(data.get("met", {})),
        ids=dict(data.get("ids", {})),
        source=str(path),
    )


BUILTIN_SCHEMAS: Final[tuple[Schema, ...]] = (
    NanoAODSchema(),
    AtlasOpenDataSchema(),
    PhysliteSchema(),
    CartesianSchema(),
)


def _check_mapping_types(data: Mapping[str, Any], path: Path) -> None:
    """InvalidInputError naming the first entry of a mapping whose type is wrong."""

    def fail(where: str, expected: str, value: Any) -> None:
        raise InvalidInputError(
            f"column mapping {path}: {where} must be {expected}, found {value!r}; see "
            "core/mappings/*.toml for examples"
        )

    for key in ("name", "tree", "energy_unit"):
        if key in data and not isinstance(data[key], str):
            fail(key, "a string", data[key])
    for table in ("met", "ids"):
        if table in data:
            entries = data[table]
            if not isinstance(entries, dict):
                fail(f"[{table}]", "a table of branch names", entries)
            for key, value in entries.items():
                if not isinstance(value, str):
                    fail(f"[{table}] {key}", "a branch name (string)", value)
    for name in ("jets", *LEPTON_TYPES):
        if name not in data:
            continue
        spec = data[name]
        if not isinstance(spec, dict):
            fail(f"[{name}]", "a table", spec)
        for key, value in spec.items():
            where = f"[{name}] {key}"
            if key == "btag":
                if not isinstance(value, str):
                    fail(where, "a branch name (string)", value)
            elif key == "btag_working_point" or isinstance(value, int | float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    fail(where, "a number", value)
                if not math.isfinite(value):
                    fail(where, "a finite number", value)
            elif isinstance(value, list):
                if not value or not all(isinstance(item, str) for item in value):
                    fail(where, "a non-empty list of branch names", value)
            elif not isinstance(value, str):
                fail(where, "a branch name, a list of branch names or a number", value)


def builtin_mappings() -> list[MappingSchema]:
    """The column mappings shipped with anomscan (tried last by ``auto``)."""
    return [MappingSchema(load_mapping(p)) for p in sorted(MAPPINGS_DIR.glob("*.toml"))]


# --------------------------------------------------------------------------- reading


def _check_local_input(path: str) -> None:
    """InputFileError unless `path` is a regular file (a FIFO would block, a device stream)."""
    try:
        check_regular_file(path, "input file")
    except InvalidInputError as error:
        raise InputFileError(str(error)) from error


def _open_tree(path: str, tree_name: str | None) -> Any:
    """Open `path` and return its event tree, with one clear error per failure."""
    is_remote = "://" in path
    if not is_remote:
        _check_local_input(path)
    try:
        file = uproot.open(path)
    except Exception as error:
        raise InputFileError(
            f"cannot open {path} as a ROOT file ({type(error).__name__}: {error}); "
            "check that it is a complete ROOT file"
        ) from error
    try:
        if tree_name is not None:
            if tree_name not in file:
                raise SchemaError(
                    f"{path} has no tree {tree_name!r}; it holds {sorted(file.keys(cycle=False))}"
                )
            return file[tree_name]
        trees = [
            k
            for k, cls in file.classnames(cycle=False).items()
            if cls in ("TTree", "ROOT::RNTuple", "ROOT::Experimental::RNTuple")
        ]
    except (SchemaError, InputFileError):
        raise
    except Exception as error:
        raise InputFileError(
            f"{path} is damaged: its directory cannot be read ({type(error).__name__}: {error})"
        ) from error
    if not trees:
        raise SchemaError(f"{path} holds no TTree or RNTuple; it holds {file.keys(cycle=False)}")
    preferred = [t for t in EVENT_TREE_NAMES if t in trees]
    chosen = preferred[0] if preferred else trees[0]
    try:
        return file[chosen]
    except Exception as error:
        raise InputFileError(
            f"{path} is damaged: tree {chosen!r} cannot be read ({type(error).__name__})"
        ) from error


def _available_branches(tree: Any) -> set[str]:
    keys = tree.keys(recursive=False)
    return set(keys)


def resolve_schema(
    name: str, available: set[str], path: str, mapping: str | Path | None = None
) -> Schema:
    """The schema called `name` (or detected from `available` for ``auto``)."""
    if name not in SCHEMA_NAMES:
        raise SchemaError(f"unknown schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}")
    if name == "mapping" or mapping is not None:
        if mapping is None:
            raise SchemaError("schema 'mapping' needs a column mapping TOML (mapping=...)")
        return MappingSchema(load_mapping(mapping))
    if name != "auto":
        return next(s for s in BUILTIN_SCHEMAS if s.name == name)
    for schema in (*BUILTIN_SCHEMAS, *builtin_mappings()):
        if schema.matches(available):
            return schema
    sample = ", ".join(sorted(available)[:12])
    raise SchemaError(
        f"cannot detect the schema of {path}: its branches ({sample}, ...) match none of "
        f"{[s.name for s in BUILTIN_SCHEMAS]} nor a built-in mapping; "
        "write a column mapping TOML and pass schema='mapping'"
    )


FILL_CHECK_ENTRIES: Final = 10_000
"""Entries read to decide whether a tagger or flag is filled in a file."""


def _first_values(tree: Any, branch: str, path: str) -> npt.NDArray[Any]:
    """Every value of `branch` in the first `FILL_CHECK_ENTRIES` entries, flattened."""
    try:
        values = tree[branch].array(
            entry_stop=min(tree.num_entries, FILL_CHECK_ENTRIES), library="ak"
        )
    except Exception as error:
        raise InputFileError(f"cannot read branch {branch} of {path}: {error}") from error
    return np.asarray(ak.to_numpy(ak.flatten(values, axis=None)))


def _tagger_is_filled(tree: Any, branch: str, path: str) -> bool:
    """A tagger is filled when some jet of the first entries has a score in [0, 1]."""
    scores = _first_values(tree, branch, path)
    return bool(np.any((scores >= 0.0) & (scores <= 1.0))) if scores.size else True


def _flag_is_filled(tree: Any, branch: str, path: str) -> bool:
    """A flag is filled when some object of the first entries has it set (non-zero)."""
    flags = _first_values(tree, branch, path)
    return bool(np.any(flags != 0)) if flags.size else True


def _choose_tagger(
    tree: Any, schema: Schema, available: set[str], selection: Selection, path: str
) -> tuple[str | None, float, list[str]]:
    notes: list[str] = []
    if not schema.taggers and selection.btag_branch == "auto":
        return None, float("inf"), notes
    if selection.btag_branch != "auto":
        branch = selection.btag_branch
        if branch not in available:
            raise SchemaError(f"b-tag branch {branch!r} is not in {path} (schema {schema.name})")
        wp = selection.btag_working_point
        if wp is None:
            known = dict(schema.taggers)
            if branch not in known:
                raise InvalidInputError(
                    f"b-tag branch {branch!r} has no default working point; set btag_working_point"
                )
            wp = known[branch]
        if schema.name == "nanoaod" and not _tagger_is_filled(tree, branch, path):
            raise SchemaError(
                f"b-tag branch {branch} of {path} is not filled (no jet has a score in [0, 1]); "
                "choose another tagger"
            )
        return branch, float(wp), notes
    for branch, wp in schema.taggers:
        if branch not in available:
            continue
        if schema.name == "nanoaod" and not _tagger_is_filled(tree, branch, path):
            notes.append(f"tagger {branch} is not filled in {path}; skipped")
            continue
        chosen_wp = selection.btag_working_point if selection.btag_working_point is not None else wp
        return branch, float(chosen_wp), notes
    notes.append(f"no filled b-tagger found in {path}: every jet is a light jet")
    return None, float("inf"), notes


_DAMAGED_FILE_ERRORS: Final = (
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    uproot.DeserializationError,
)
"""What uproot raises on a truncated or corrupt file (an OSError for a missing chunk, ...)."""


def _plan(
    path: str,
    schema: str,
    selection: Selection,
    tree: str | None,
    mapping: str | Path | None,
    good_runs: GoodRunList | None = None,
) -> tuple[ReadPlan, Schema, Any]:
    try:
        return _plan_unchecked(path, schema, selection, tree, mapping, good_runs)
    except AnomscanError:
        raise
    except _DAMAGED_FILE_ERRORS as error:
        raise InputFileError(
            f"{path} is damaged or truncated: its metadata can not be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "copy or download the file again"
        ) from error


def _plan_unchecked(
    path: str,
    schema: str,
    selection: Selection,
    tree: str | None,
    mapping: str | Path | None,
    good_runs: GoodRunList | None = None,
) -> tuple[ReadPlan, Schema, Any]:
    mapped = MappingSchema(load_mapping(mapping)) if mapping is not None else None
    tree_name = tree or (mapped.tree if mapped is not None else None)
    event_tree = _open_tree(path, tree_name)
    available = _available_branches(event_tree)
    chosen = mapped if mapped is not None else resolve_schema(schema, available, path)
    if tree_name is None and isinstance(chosen, MappingSchema) and chosen.tree:
        event_tree = _open_tree(path, chosen.tree)
        available = _available_branches(event_tree)
    needed = chosen.branches(available, selection) + list(selection.met_branches or ())
    missing = [b for b in needed if b not in available]
    if missing:
        raise SchemaError(
            f"{path} (tree {event_tree.name}) lacks branches {missing} needed by schema "
            f"{chosen.name!r} (asked for {schema!r})"
        )
    if event_tree.num_entries == 0:
        raise InvalidInputError(f"tree {event_tree.name} of {path} has no entries")
    btag_branch, working_point, notes = _choose_tagger(
        event_tree, chosen, available, selection, path
    )
    if isinstance(chosen, PhysliteSchema) and selection.met_branches is None:
        notes.append(
            "MET is rebuilt from the selected objects plus the PVSoftTrkCore soft term: "
            "an approximation of the ATLAS MET (set met_branches to use your own)"
        )
    optional = [b for b in chosen.optional_branches() if b in available]
    if not selection.use_identification:
        optional = [b for b in optional if b in _BOOKKEEPING_BRANCHES]
    for flag in [b for b in optional if b in chosen.flags]:
        if not _flag_is_filled(event_tree, flag, path):
            optional.remove(flag)
            notes.append(f"identification flag {flag} is never set in {path}; not applied")
    branches = [*needed, *optional]
    if btag_branch:
        branches.append(btag_branch)
    lumi_branch = chosen.lumi_block_branch
    if lumi_branch is not None and lumi_branch in available:
        branches.append(lumi_branch)
    if good_runs is not None:
        absent = [
            what
            for what, branch in (("run", chosen.run_branch), ("luminosity-block", lumi_branch))
            if branch is None or branch not in available
        ]
        if absent:
            raise SchemaError(
                f"a good-run list needs the run and luminosity block of every event, but {path} "
                f"(schema {chosen.name!r}) has no {' or '.join(absent)} branch"
            )
    plan = ReadPlan(
        path=path,
        tree=event_tree.name,
        schema=chosen.name,
        branches=tuple(dict.fromkeys(branches)),
        btag_branch=btag_branch,
        btag_working_point=working_point,
        num_entries=int(event_tree.num_entries),
        notes=tuple(notes),
        file_uuid=None if (identity := tree_file_uuid(event_tree)) is None else str(identity),
    )
    return plan, chosen, event_tree


_BOOKKEEPING_BRANCHES: Final = frozenset(
    {"run", "event", "genWeight", "runNumber", "eventNumber", "mcWeight", "EventWeight"}
)


def plan_read(
    path: str | Path,
    schema: str = "auto",
    selection: Selection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
) -> ReadPlan:
    """Open one file, detect its schema and b-tagger, and check every needed branch exists."""
    return _plan(str(path), schema, selection or Selection(), tree, mapping)[0]


def _delta_phi(a: ak.Array, b: ak.Array) -> ak.Array:
    return (a - b + np.pi) % (2 * np.pi) - np.pi


def select_objects(
    raw: RawEvents,
    selection: Selection,
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
    delta_r2 = (pairs.jet.eta - pairs.other.eta) ** 2 + _delta_phi(
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
            px = px - _numpy(ak.sum(collection.pt * np.cos(collection.phi), axis=1))
            py = py - _numpy(ak.sum(collection.pt * np.sin(collection.phi), axis=1))
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


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(paths, str | Path):
        return [str(paths)]
    listed = [str(p) for p in paths]
    if not listed:
        raise InvalidInputError("no input files given")
    refuse_duplicate_inputs(listed)
    return listed


def _normalised(path: str) -> str:
    if "://" in path:
        return path
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return path


def refuse_duplicate_inputs(paths: Iterable[str | Path]) -> None:
    """InvalidInputError when a file is listed twice (it would count its events twice)."""
    seen: dict[str, str] = {}
    for path in map(str, paths):
        key = _normalised(path)
        if key in seen:
            raise InvalidInputError(
                f"input file {path} is listed twice (also as {seen[key]}); its events would "
                "count twice: list every file once"
            )
        seen[key] = path


class DistinctFiles:
    """Refuses a second file with the UUID of one already read (a copy of the same events)."""

    def __init__(self) -> None:
        self._seen: dict[uuid.UUID, str] = {}

    def check(self, path: str, identity: uuid.UUID | None) -> None:
        """Record `path`; InvalidInputError if a file with the same UUID came before."""
        if identity is None:
            return
        if identity in self._seen:
            raise InvalidInputError(
                f"input files {self._seen[identity]} and {path} are the same ROOT file (UUID "
                f"{identity}); their events would count twice: list every file once"
            )
        self._seen[identity] = path


def _read_range(
    plan: ReadPlan,
    schema: Schema,
    event_tree: Any,
    start: int,
    stop: int,
    selection: Selection,
    good_runs: GoodRunList | None,
) -> EventChunk:
    path = plan.path
    try:
        arrays = event_tree.arrays(
            list(plan.branches), entry_start=start, entry_stop=stop, library="ak"
        )
    except Exception as error:
        raise InputFileError(
            f"reading entries {start}..{stop} of {path} failed "
            f"({type(error).__name__}: {error}); the file may be truncated or corrupt"
        ) from error
    non_finite = count_non_finite(arrays, plan.branches)
    raw = schema.convert(arrays, start, plan.btag_branch)
    if selection.met_branches is not None:
        px, py = (_per_event(arrays, b, path) * schema.energy_scale for b in selection.met_branches)
        raw = replace(raw, met_pt=np.hypot(px, py), met_phi=np.arctan2(py, px), soft_met=None)
    if schema.lumi_block_branch is not None and schema.lumi_block_branch in arrays.fields:
        raw = replace(
            raw, lumi_block=_per_event(arrays, schema.lumi_block_branch, path).astype(np.int64)
        )
    raw, dropped = _drop_non_finite(raw)
    n_outside = 0
    if good_runs is not None:
        assert raw.lumi_block is not None
        certified = good_runs.contains(raw.run, raw.lumi_block)
        n_outside = int(np.count_nonzero(~certified))
        raw = _mask_raw(raw, certified)
    chunk = select_objects(raw, selection, plan.btag_working_point, source=path, entry_start=start)
    source_id = file_id(tree_file_uuid(event_tree), path)
    return replace(
        chunk,
        n_outside_good_runs=n_outside,
        lumi_block=raw.lumi_block,
        source_id=source_id,
        key=event_keys(raw.run, raw.lumi_block, raw.event, source_id),
        non_finite=non_finite,
        dropped_non_finite=dropped,
    )


def count_non_finite(arrays: ak.Array, branches: Iterable[str]) -> dict[str, int]:
    """Non-finite values (NaN, +-inf) per floating-point branch of one chunk (zeros left out)."""
    counts: dict[str, int] = {}
    for branch in branches:
        if branch not in arrays.fields:
            continue
        try:
            values = np.asarray(ak.to_numpy(ak.flatten(arrays[branch], axis=None)))
        except (TypeError, ValueError):  # a type without numbers (strings, objects)
            continue
        if values.dtype.kind != "f":
            continue
        n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if n_bad:
            counts[branch] = n_bad
    return counts


def _drop_non_finite(raw: RawEvents) -> tuple[RawEvents, dict[str, int]]:
    """`raw` without the objects and events that hold a non-finite value (NON_FINITE_RULE)."""
    dropped: dict[str, int] = {}
    collections = dict(raw.collections)
    for name, read in raw.collections.items():
        objects = read
        finite = np.isfinite(objects.pt) & np.isfinite(objects.eta)
        finite = finite & np.isfinite(objects.phi) & np.isfinite(objects.mass)
        n_bad = int(ak.count_nonzero(~finite, axis=None))
        if n_bad:
            dropped[name] = n_bad
            objects = objects[finite]
        if "btag" in objects.fields:
            untagged = np.isnan(objects.btag) | (objects.btag == np.inf)
            if ak.any(untagged):
                btag = ak.where(untagged, -np.inf, objects.btag)
                objects = ak.with_field(objects, btag, "btag")
        collections[name] = objects
    keep = np.isfinite(raw.met_pt) & np.isfinite(raw.met_phi) & np.isfinite(raw.weight)
    if raw.soft_met is not None:
        keep &= np.isfinite(raw.soft_met[0]) & np.isfinite(raw.soft_met[1])
    raw = replace(raw, collections=collections)
    n_events = int(keep.size - np.count_nonzero(keep))
    if n_events:
        dropped["events"] = n_events
        raw = _mask_raw(raw, keep)
    return raw, dropped


def non_finite_note(non_finite: Mapping[str, int], dropped: Mapping[str, int]) -> str | None:
    """One sentence on the non-finite values read and what was dropped, or None if none."""
    if not non_finite and not dropped:
        return None
    values = ", ".join(f"{n} in {branch}" for branch, n in sorted(non_finite.items()))
    removed = ", ".join(f"{n} {what}" for what, n in dropped.items())
    return (
        f"non-finite values (NaN or infinity) read: {values or 'none'}; dropped: "
        f"{removed or 'nothing'} (rule: {NON_FINITE_RULE})"
    )


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add `counts` into `total`, key by key."""
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def tree_file_uuid(event_tree: Any) -> uuid.UUID | None:
    """The UUID of the ROOT file a TTree or RNTuple was read from (None if it has none)."""
    identity = getattr(getattr(event_tree, "file", None), "uuid", None)
    return identity if isinstance(identity, uuid.UUID) else None


def _mask_raw(raw: RawEvents, keep: npt.NDArray[np.bool_]) -> RawEvents:
    soft = None if raw.soft_met is None else (raw.soft_met[0][keep], raw.soft_met[1][keep])
    return RawEvents(
        {name: objects[keep] for name, objects in raw.collections.items()},
        raw.met_pt[keep],
        raw.met_phi[keep],
        raw.run[keep],
        raw.event[keep],
        raw.weight[keep],
        soft,
        None if raw.lumi_block is None else raw.lumi_block[keep],
    )


def read_entry_range(
    path: str | Path,
    entry_start: int,
    entry_stop: int,
    schema: str = "auto",
    selection: Selection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
) -> EventChunk:
    """Selected objects of entries [entry_start, entry_stop) of one file (a unit of work)."""
    selection = selection or Selection()
    plan, chosen, event_tree = _plan(str(path), schema, selection, tree, mapping, good_runs)
    stop = min(entry_stop, plan.num_entries)
    if not 0 <= entry_start < stop:
        raise InvalidInputError(
            f"entry range {entry_start}..{entry_stop} is outside {path} (0..{plan.num_entries})"
        )
    return _read_range(plan, chosen, event_tree, entry_start, stop, selection, good_runs)


def iterate_events(
    paths: str | Path | Iterable[str | Path],
    schema: str = "auto",
    step_size: int = 100_000,
    max_events: int | None = None,
    selection: Selection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
) -> Iterator[EventChunk]:
    """Yield chunks of selected objects, at most `step_size` entries each, file after file.

    Every file is checked (schema, branches, entries) before its first chunk is read.
    A read failure raises InputFileError naming the file and the entry range. With a
    good-run list, events outside it are dropped and counted in `n_outside_good_runs`;
    `max_events` counts entries read, before that filter.
    """
    if step_size <= 0:
        raise InvalidInputError(f"step_size must be positive, got {step_size}")
    if max_events is not None and max_events <= 0:
        raise InvalidInputError(f"max_events must be positive or None, got {max_events}")
    selection = selection or Selection()
    remaining = max_events
    distinct = DistinctFiles()
    for path in _as_paths(paths):
        if remaining is not None and remaining <= 0:
            return
        plan, chosen, event_tree = _plan(path, schema, selection, tree, mapping, good_runs)
        distinct.check(path, tree_file_uuid(event_tree))
        stop = plan.num_entries if remaining is None else min(plan.num_entries, remaining)
        for start in range(0, stop, step_size):
            end = min(start + step_size, stop)
            yield _read_range(plan, chosen, event_tree, start, end, selection, good_runs)
        if remaining is not None:
            remaining -= stop


def count_certified(
    path: str | Path,
    good_runs: GoodRunList,
    schema: str = "auto",
    selection: Selection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
) -> tuple[int, int]:
    """(events in the good-run list, entries) of one file, reading only run and lumi block."""
    plan, chosen, event_tree = _plan(
        str(path), schema, selection or Selection(), tree, mapping, good_runs
    )
    assert chosen.run_branch is not None
    assert chosen.lumi_block_branch is not None
    certified = 0
    for start in range(0, plan.num_entries, 1_000_000):
        stop = min(start + 1_000_000, plan.num_entries)
        try:
            ids = event_tree.arrays(
                [chosen.run_branch, chosen.lumi_block_branch],
                entry_start=start,
                entry_stop=stop,
                library="ak",
            )
        except Exception as error:
            raise InputFileError(
                f"reading run numbers of entries {start}..{stop} of {path} failed: {error}"
            ) from error
        certified += int(
            np.count_nonzero(
                good_runs.contains(
                    _numpy(ids[chosen.run_branch], np.int64),
                    _numpy(ids[chosen.lumi_block_branch], np.int64),
                )
            )
        )
    return certified, plan.num_entries


def _summed(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in parts:
        add_counts(total, counts)
    return total


def concatenate_chunks(chunks: list[EventChunk]) -> EventChunk:
    """Join chunks into one (for small inputs)."""
    if not chunks:
        raise InvalidInputError("no events were read")
    if len(chunks) == 1:
        return chunks[0]
    collections = {n: ak.concatenate([getattr(c, n) for c in chunks]) for n in OBJECT_TYPES}

    def joined(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(c, name) for c in chunks])

    lumi_blocks = [c.lumi_block for c in chunks]
    return replace(
        chunks[0],
        **collections,
        key=np.concatenate([c.keys() for c in chunks]),
        lumi_block=None if any(b is None for b in lumi_blocks) else joined("lumi_block"),
        n_outside_good_runs=sum(c.n_outside_good_runs for c in chunks),
        non_finite=_summed(c.non_finite for c in chunks),
        dropped_non_finite=_summed(c.dropped_non_finite for c in chunks),
        met_pt=joined("met_pt"),
        met_phi=joined("met_phi"),
        run=joined("run"),
        event=joined("event"),
        weight=joined("weight"),
    )


def load_events(
    paths: str | Path | Iterable[str | Path],
    schema: str = "auto",
    max_events: int | None = None,
    selection: Selection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
) -> EventChunk:
    """All selected events of small inputs as one chunk."""
    chunks = iterate_events(
        paths,
        schema,
        step_size=1_000_000,
        max_events=max_events,
        selection=selection,
        tree=tree,
        mapping=mapping,
        good_runs=good_runs,
    )
    return concatenate_chunks(list(chunks))
