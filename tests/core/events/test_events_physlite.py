"""PHYSLITE (RNTuple) reading: units, GN2v01 b-tagging through the link, rebuilt MET."""

from __future__ import annotations

import math

import awkward as ak
import numpy as np
import pytest
import uproot

from core.errors import SchemaError
from core.events import ObjectSelection, load_events, plan_read

PHYSLITE = "atlas_physlite_rntuple_100ev.root"


@pytest.fixture(scope="module")
def raw(shared_data):
    return (
        uproot.open(shared_data / PHYSLITE)["EventData"]
        .arrays(
            filter_name=[
                "AnalysisJetsAuxDyn:pt",
                "AnalysisJetsAuxDyn:eta",
                "AnalysisJetsAuxDyn:phi",
                "AnalysisJetsAuxDyn:btaggingLink",
                "BTagging_AntiKt4EMPFlowAuxDyn:GN2v01_p*",
                "AnalysisElectronsAuxDyn:pt",
                "AnalysisElectronsAuxDyn:eta",
                "AnalysisElectronsAuxDyn:phi",
                "AnalysisElectronsAuxDyn:DFCommonElectronsLHMedium",
                "AnalysisMuonsAuxDyn:pt",
                "AnalysisMuonsAuxDyn:eta",
                "AnalysisMuonsAuxDyn:phi",
                "AnalysisPhotonsAuxDyn:pt",
                "AnalysisPhotonsAuxDyn:eta",
                "AnalysisPhotonsAuxDyn:phi",
                "AnalysisPhotonsAuxDyn:DFCommonPhotonsIsEMTight",
                "MET_Core_AnalysisMETAuxDyn:mpx",
                "MET_Core_AnalysisMETAuxDyn:mpy",
                "MET_Core_AnalysisMETAuxDyn:name",
            ]
        )
        .to_list()
    )


@pytest.fixture(scope="module")
def chunk(shared_data):
    return load_events(shared_data / PHYSLITE)


def _selected(event, container, flag=None):
    out = []
    for i, pt in enumerate(event[f"{container}:pt"]):
        eta, phi = event[f"{container}:eta"][i], event[f"{container}:phi"][i]
        if pt / 1000 > 30 and abs(eta) < 2.4 and (flag is None or event[f"{container}:{flag}"][i]):
            out.append((pt / 1000, eta, phi))
    return out


def _expected(event):
    leptons = {
        "electrons": _selected(event, "AnalysisElectronsAuxDyn", "DFCommonElectronsLHMedium"),
        "muons": _selected(event, "AnalysisMuonsAuxDyn"),
        "photons": _selected(event, "AnalysisPhotonsAuxDyn", "DFCommonPhotonsIsEMTight"),
    }
    others = [o for objects in leptons.values() for o in objects]
    jets, bjets = [], []
    prefix = "BTagging_AntiKt4EMPFlowAuxDyn:GN2v01_"
    for i, (pt, eta, phi) in enumerate(
        zip(*(event[f"AnalysisJetsAuxDyn:{v}"] for v in ("pt", "eta", "phi")), strict=True)
    ):
        if pt / 1000 <= 30 or abs(eta) >= 2.4:
            continue
        if any(
            math.hypot(eta - e, (phi - p + math.pi) % (2 * math.pi) - math.pi) < 0.4
            for _, e, p in others
        ):
            continue
        k = event["AnalysisJetsAuxDyn:btaggingLink"][i]["m_persIndex"]
        pb, pc, pu, ptau = (event[prefix + s][k] for s in ("pb", "pc", "pu", "ptau"))
        db = math.log(pb / (0.2 * pc + 0.01 * ptau + 0.79 * pu))
        (bjets if db > 2.669 else jets).append((pt / 1000, eta, phi))
    return {"jets": jets, "bjets": bjets, **leptons}


def test_physlite_rntuple_is_detected_and_counts_match(shared_data, raw, chunk):
    plan = plan_read(shared_data / PHYSLITE)
    assert plan.schema == "physlite"
    assert plan.tree == "EventData"
    assert any("approximation" in note for note in plan.notes)
    assert len(chunk) == 100
    for name in ("jets", "bjets", "muons", "electrons", "photons"):
        expected = [sorted((o[0] for o in _expected(event)[name]), reverse=True) for event in raw]
        got = ak.to_list(chunk.collection(name).pt)
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    assert ak.sum(ak.num(chunk.bjets)) > 0


def test_physlite_met_is_rebuilt_from_objects_and_soft_term(raw, chunk):
    for index, event in enumerate(raw[:30]):
        objects = [o for group in _expected(event).values() for o in group]
        soft = event["MET_Core_AnalysisMETAuxDyn:name"].index("PVSoftTrkCore")
        px = event["MET_Core_AnalysisMETAuxDyn:mpx"][soft] / 1000 - sum(
            pt * math.cos(phi) for pt, _, phi in objects
        )
        py = event["MET_Core_AnalysisMETAuxDyn:mpy"][soft] / 1000 - sum(
            pt * math.sin(phi) for pt, _, phi in objects
        )
        met = math.hypot(px, py)
        assert chunk.met_pt[index] == pytest.approx(met if met >= 30 else 0.0, rel=1e-6, abs=1e-9)


def test_met_branches_must_be_one_value_per_event(shared_data):
    selection = ObjectSelection(
        met_branches=("MET_Core_AnalysisMETAuxDyn:mpx", "MET_Core_AnalysisMETAuxDyn:mpy")
    )
    with pytest.raises(SchemaError, match="not one value per event"):
        load_events(shared_data / PHYSLITE, selection=selection)


def test_user_met_branches_replace_the_schema_met(shared_data):
    path = shared_data / "uproot-HZZ.root"
    default = load_events(path)
    same = load_events(path, selection=ObjectSelection(met_branches=("MET_px", "MET_py")))
    swapped = load_events(path, selection=ObjectSelection(met_branches=("MET_py", "MET_px")))
    np.testing.assert_allclose(same.met_phi, default.met_phi)
    np.testing.assert_allclose(swapped.met_pt, default.met_pt)
    assert not np.allclose(swapped.met_phi, default.met_phi)
    with pytest.raises(SchemaError, match="MET_missing"):
        load_events(path, selection=ObjectSelection(met_branches=("MET_missing", "MET_py")))


def test_custom_working_point_moves_jets_between_types(shared_data, chunk):
    default = chunk
    loose = load_events(shared_data / PHYSLITE, selection=ObjectSelection(btag_working_point=0.0))
    n = lambda c, name: int(ak.sum(ak.num(c.collection(name))))  # noqa: E731
    assert n(loose, "bjets") > n(default, "bjets")
    assert n(loose, "bjets") + n(loose, "jets") == n(default, "bjets") + n(default, "jets")
