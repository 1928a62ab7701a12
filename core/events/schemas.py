"""Event schemas: which branches identify a file format and how they become raw objects.

Built in: ``nanoaod`` (CMS NanoAOD), ``atlas_opendata`` (ATLAS 13 TeV open-data ntuples,
MeV), ``physlite`` (ATLAS DAOD_PHYSLITE, TTree or RNTuple) and ``cartesian`` (Px/Py/Pz/E
branches as in uproot-HZZ.root); ``mapping`` is a user TOML (`core.events.mappings`).
``auto`` picks the first schema whose identifying branches are all present.
"""

from __future__ import annotations

from typing import Final, Literal

import awkward as ak
import numpy as np

from core.events.raw import (
    Four,
    RawEvents,
    float_jagged,
    four_from_cartesian,
    numpy_values,
    object_records,
    run_and_event_numbers,
)
from core.events.selection import ObjectSelection

SchemaName = Literal["auto", "nanoaod", "atlas_opendata", "physlite", "cartesian", "mapping"]
SCHEMA_NAMES: Final = ("auto", "nanoaod", "atlas_opendata", "physlite", "cartesian", "mapping")


# --------------------------------------------------------------------------- schemas

COLLECTION_PREFIXES: Final = {
    "jets": "Jet",
    "muons": "Muon",
    "electrons": "Electron",
    "photons": "Photon",
}
"""Branch prefixes of the CMS-style schemas (NanoAOD, cartesian)."""


def _signed_mass_from_energy(pt: ak.Array, eta: ak.Array, energy: ak.Array) -> ak.Array:
    """Signed mass from (pt, eta, E); mass < 0 encodes m^2 < 0."""
    p = pt * np.cosh(eta)
    mass2 = (energy - p) * (energy + p)
    return np.sign(mass2) * np.sqrt(np.abs(mass2))


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

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
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

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
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
                float_jagged(arrays, f"{prefix}_{v}") for v in ("pt", "eta", "phi", "mass")
            )
            btag = None
            if name == "jets":
                btag = float_jagged(arrays, btag_branch) if btag_branch else ak.zeros_like(pt) - 1.0
            collections[name] = object_records(
                (pt, eta, phi, mass), passes_id=identification[name], btag=btag
            )
        run, event = run_and_event_numbers(
            arrays,
            entry_start,
            "run" if "run" in fields else None,
            "event" if "event" in fields else None,
        )
        weight = numpy_values(arrays.genWeight) if "genWeight" in fields else np.ones(len(arrays))
        return RawEvents(
            collections,
            numpy_values(arrays.MET_pt),
            numpy_values(arrays.MET_phi),
            run,
            event,
            weight,
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

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
        """Four-vectors of leptons, jets and photons (pt, eta, phi, E) plus MET."""
        names = ["lep_type", "met_et", "met_phi"]
        for prefix in ("lep", "jet", "photon"):
            names += [f"{prefix}_{v}" for v in ("pt", "eta", "phi", "E")]
        return names

    def optional_branches(self) -> tuple[str, ...]:
        """Tight-ID flags, event ids and the MC weight."""
        return ("lep_isTightID", "photon_isTightID", "runNumber", "eventNumber", "mcWeight")

    def _four(self, arrays: ak.Array, prefix: str) -> Four:
        pt = float_jagged(arrays, f"{prefix}_pt") * self.mev
        eta = float_jagged(arrays, f"{prefix}_eta")
        phi = float_jagged(arrays, f"{prefix}_phi")
        energy = float_jagged(arrays, f"{prefix}_E") * self.mev
        return pt, eta, phi, _signed_mass_from_energy(pt, eta, energy)

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects in GeV from the MeV ntuple."""
        fields = set(arrays.fields)
        lepton = self._four(arrays, "lep")
        lepton_id = arrays.lep_isTightID if "lep_isTightID" in fields else None
        collections = {
            "jets": object_records(
                self._four(arrays, "jet"),
                btag=float_jagged(arrays, btag_branch) if btag_branch else None,
            ),
            "photons": object_records(
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
            collections[name] = object_records(
                (lepton[0][keep], lepton[1][keep], lepton[2][keep], lepton[3][keep]),
                passes_id=passes,
            )
        run, event = run_and_event_numbers(
            arrays,
            entry_start,
            "runNumber" if "runNumber" in fields else None,
            "eventNumber" if "eventNumber" in fields else None,
        )
        weight = numpy_values(arrays.mcWeight) if "mcWeight" in fields else np.ones(len(arrays))
        return RawEvents(
            collections,
            numpy_values(arrays.met_et) * self.mev,
            numpy_values(arrays.met_phi),
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
    `ObjectSelection.btag_working_point`. Identification: electrons ``DFCommonElectronsLHMedium``,
    photons ``DFCommonPhotonsIsEMTight``; muons carry no simple flag and are not filtered.

    MET: PHYSLITE keeps only the MET core (soft) terms, so MET is rebuilt as minus the vector
    sum of the selected objects plus the ``PVSoftTrkCore`` soft term. This is an
    approximation of the ATLAS MET (no calibrated, JVT-selected jet term below 30 GeV) and
    every run records it; `ObjectSelection.met_branches` supplies a MET of your own instead.
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

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
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
            pt = float_jagged(arrays, f"{container}:pt") * self.mev
            mass = (
                ak.zeros_like(pt) + self.muon_mass * self.mev
                if name == "muons"
                else float_jagged(arrays, f"{container}:m") * self.mev
            )
            flag = next((f for f in self.flags if f.startswith(container)), None)
            passes = arrays[flag] != 0 if flag in fields else None
            btag = self._discriminant(arrays) if name == "jets" else None
            four = (
                pt,
                float_jagged(arrays, f"{container}:eta"),
                float_jagged(arrays, f"{container}:phi"),
                mass,
            )
            collections[name] = object_records(four, passes_id=passes, btag=btag)
        run, event = run_and_event_numbers(
            arrays,
            entry_start,
            "EventInfoAuxDyn:runNumber" if "EventInfoAuxDyn:runNumber" in fields else None,
            "EventInfoAuxDyn:eventNumber" if "EventInfoAuxDyn:eventNumber" in fields else None,
        )
        weight = (
            numpy_values(ak.firsts(arrays["EventInfoAuxDyn:mcEventWeights"]))
            if "EventInfoAuxDyn:mcEventWeights" in fields
            else np.ones(len(arrays))
        )
        zeros = np.zeros(len(arrays))
        if "MET_Core_AnalysisMETAuxDyn:mpx" not in fields:
            return RawEvents(collections, zeros, zeros, run, event, weight)
        is_soft = arrays["MET_Core_AnalysisMETAuxDyn:name"] == self.soft_term
        soft_px, soft_py = (
            numpy_values(ak.sum(arrays[f"MET_Core_AnalysisMETAuxDyn:{c}"][is_soft], axis=1))
            * self.mev
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

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
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
            four = four_from_cartesian(
                *(float_jagged(arrays, f"{prefix}_{v}") for v in ("Px", "Py", "Pz", "E"))
            )
            passes = arrays.Jet_ID if name == "jets" and "Jet_ID" in fields else None
            btag = None
            if name == "jets":
                btag = (
                    float_jagged(arrays, btag_branch) if btag_branch else ak.zeros_like(four[0]) - 1
                )
            collections[name] = object_records(four, passes_id=passes, btag=btag)
        met_px, met_py = numpy_values(arrays.MET_px), numpy_values(arrays.MET_py)
        run, event = run_and_event_numbers(arrays, entry_start, None, None)
        weight = (
            numpy_values(arrays.EventWeight) if "EventWeight" in fields else np.ones(len(arrays))
        )
        return RawEvents(
            collections, np.hypot(met_px, met_py), np.arctan2(met_py, met_px), run, event, weight
        )


BUILTIN_SCHEMAS: Final[tuple[Schema, ...]] = (
    NanoAODSchema(),
    AtlasOpenDataSchema(),
    PhysliteSchema(),
    CartesianSchema(),
)
