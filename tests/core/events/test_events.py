"""Event reading: schemas, selection against an independent count, and every bad input."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from core.errors import InputFileError, InvalidInputError, SchemaError
from core.events import (
    ObjectSelection,
    iterate_events,
    load_events,
    load_mapping,
    plan_read,
    select_objects,
)
from core.objects import OBJECT_TYPES
from tests.nanofiles import nanoaod_with_nan_muons, write_events_tree

NANO = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def _counts(chunk):
    return {name: int(ak.sum(ak.num(chunk.collection(name)))) for name in OBJECT_TYPES}


@pytest.mark.parametrize(
    ("name", "schema", "entries"),
    [
        (NANO, "nanoaod", 200),
        ("uproot-HZZ.root", "cartesian", 2421),
        ("uproot-Zmumu.root", "mapping:cms_dimuon_flat", 2304),
    ],
)
def test_auto_detects_every_shared_file(shared_data, name, schema, entries):
    plan = plan_read(shared_data / name)
    assert plan.schema == schema
    chunk = load_events(shared_data / name)
    assert len(chunk) == entries
    for collection in OBJECT_TYPES:
        pts = chunk.collection(collection).pt
        assert ak.all(pts > 30.0)
        assert ak.all(pts[:, :-1] >= pts[:, 1:])


def _delta_r(eta1, phi1, eta2, phi2):
    dphi = (phi1 - phi2 + math.pi) % (2 * math.pi) - math.pi
    return math.hypot(eta1 - eta2, dphi)


def test_nanoaod_selection_matches_an_independent_count(shared_data):
    """Counts after selection, recomputed here event by event from the raw branches."""
    tree = uproot.open(shared_data / NANO)["Events"]
    raw = tree.arrays(
        library="ak", filter_name=["Jet_*", "Muon_*", "Electron_*", "Photon_*", "MET_*"]
    )
    expected = dict.fromkeys(OBJECT_TYPES, 0)
    met_nonzero = 0
    for event in raw.to_list():
        kept_others = []
        for prefix, name, extra in (
            ("Muon", "muons", lambda e, i: e["Muon_pfRelIso04_all"][i] < 0.15),
            ("Electron", "electrons", lambda e, i: e["Electron_cutBased"][i] >= 3),
            ("Photon", "photons", lambda e, i: e["Photon_cutBased"][i] >= 2),
        ):
            for i, pt in enumerate(event[f"{prefix}_pt"]):
                if pt > 30 and abs(event[f"{prefix}_eta"][i]) < 2.4 and extra(event, i):
                    expected[name] += 1
                    kept_others.append((event[f"{prefix}_eta"][i], event[f"{prefix}_phi"][i]))
        for i, pt in enumerate(event["Jet_pt"]):
            eta, phi = event["Jet_eta"][i], event["Jet_phi"][i]
            if pt <= 30 or abs(eta) >= 2.4 or not event["Jet_jetId"][i] & 2:
                continue
            if any(_delta_r(eta, phi, e, p) < 0.4 for e, p in kept_others):
                continue
            is_b = event["Jet_btagCSVV2"][i] > 0.8484
            expected["bjets" if is_b else "jets"] += 1
        met_nonzero += event["MET_pt"] >= 30
    chunk = load_events(shared_data / NANO)
    assert _counts(chunk) == expected
    assert int(np.count_nonzero(chunk.met_pt)) == met_nonzero
    assert expected["bjets"] > 0 and expected["muons"] > 0


def test_unfilled_tagger_and_flags_are_noticed_not_silently_used(shared_data):
    plan = plan_read(shared_data / NANO)
    assert plan.btag_branch == "Jet_btagCSVV2"
    assert plan.btag_working_point == pytest.approx(0.8484)
    assert any("Jet_btagDeepFlavB is not filled" in note for note in plan.notes)
    assert any("Muon_tightId" in note for note in plan.notes)
    with pytest.raises(SchemaError, match="not filled"):
        plan_read(shared_data / NANO, selection=ObjectSelection(btag_branch="Jet_btagDeepFlavB"))


def test_chunks_cover_the_file_and_max_events_stops(shared_data):
    chunks = list(iterate_events(shared_data / "uproot-HZZ.root", step_size=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 421]
    assert [c.entry_start for c in chunks] == [0, 1000, 2000]
    whole = load_events(shared_data / "uproot-HZZ.root")
    assert _counts(whole) == {n: sum(_counts(c)[n] for c in chunks) for n in OBJECT_TYPES}
    assert len(load_events(shared_data / "uproot-HZZ.root", max_events=300)) == 300
    with pytest.raises(InvalidInputError, match="listed twice"):
        load_events([shared_data / "uproot-HZZ.root"] * 2, max_events=3000)


def test_cartesian_masses_and_met(shared_data):
    chunk = load_events(shared_data / "uproot-HZZ.root")
    tree = uproot.open(shared_data / "uproot-HZZ.root")["events"]
    met = tree.arrays(["MET_px", "MET_py"], library="np")
    raw_met = np.hypot(met["MET_px"], met["MET_py"])
    np.testing.assert_allclose(chunk.met_pt, np.where(raw_met < 30, 0, raw_met), rtol=1e-6)
    muons = chunk.muons
    masses = ak.to_numpy(ak.flatten(muons.mass))
    assert abs(np.median(masses) - 0.10566) < 1e-3  # muon mass from float32 (E, p)
    assert np.all(np.abs(masses) < 1.0)


def test_zmumu_dimuon_mass_peaks_at_the_z(shared_data):
    chunk = load_events(shared_data / "uproot-Zmumu.root")
    two = chunk.muons[ak.num(chunk.muons) == 2]
    px = two.pt * np.cos(two.phi)
    py = two.pt * np.sin(two.phi)
    pz = two.pt * np.sinh(two.eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + two.mass**2)
    mass = np.sqrt(
        ak.sum(energy, axis=1) ** 2
        - ak.sum(px, axis=1) ** 2
        - ak.sum(py, axis=1) ** 2
        - ak.sum(pz, axis=1) ** 2
    )
    assert abs(np.median(ak.to_numpy(mass)) - 91.2) < 3.0


def test_user_mapping_reads_a_flat_ntuple(shared_data, tmp_path):
    mapping = tmp_path / "zmumu.toml"
    mapping.write_text(
        'name = "mine"\ntree = "events"\n[ids]\nevent = "Event"\n'
        '[muons]\npt = ["pt1", "pt2"]\neta = ["eta1", "eta2"]\nphi = ["phi1", "phi2"]\n'
        "mass = 0.10566\n"
    )
    chunk = load_events(shared_data / "uproot-Zmumu.root", schema="mapping", mapping=mapping)
    raw = uproot.open(shared_data / "uproot-Zmumu.root")["events"].arrays(library="np")
    passing = [(raw[f"pt{i}"] > 30) & (np.abs(raw[f"eta{i}"]) < 2.4) for i in (1, 2)]
    assert _counts(chunk)["muons"] == int(passing[0].sum() + passing[1].sum())
    assert chunk.event.tolist() == raw["Event"].tolist()
    leading = np.maximum(np.where(passing[0], raw["pt1"], 0), np.where(passing[1], raw["pt2"], 0))
    has_muon = leading > 0
    np.testing.assert_allclose(
        ak.to_numpy(chunk.muons.pt[has_muon][:, 0]), leading[has_muon], rtol=1e-6
    )


def test_overlap_removal_drops_jets_near_leptons():
    from core.events import RawEvents

    def records(rows, btag=False):
        counts = [len(ev) for ev in rows]
        names = ("pt", "eta", "phi", "mass", "btag") if btag else ("pt", "eta", "phi", "mass")
        fields = {
            k: ak.unflatten(np.array([r[i] for ev in rows for r in ev], dtype=float), counts)
            for i, k in enumerate(names)
        }
        fields["passes_id"] = ak.values_astype(ak.ones_like(fields["pt"]), bool)
        return ak.zip(fields)

    jets = records(
        [[(100, 0.0, 0.0, 10, 0.9), (80, 0.0, 0.35, 10, 0.1), (60, 1.0, 2.0, 5, 0.1)]], True
    )
    muons = records([[(50, 0.0, 0.3, 0.1)]])
    empty = records([[]])
    raw = RawEvents(
        {"jets": jets, "muons": muons, "electrons": empty, "photons": empty},
        np.array([25.0]),
        np.array([0.0]),
        np.array([1]),
        np.array([7]),
        np.array([1.0]),
    )
    chunk = select_objects(raw, ObjectSelection(), btag_working_point=0.5)
    # jets at dR = 0.3 and 0.05 from the muon are removed; the third survives as a light jet
    assert chunk.jets.pt.to_list() == [[60.0]]
    assert chunk.bjets.pt.to_list() == [[]]
    assert chunk.met_pt.tolist() == [0.0]


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_events(tmp_path / "nope.root")


def test_not_a_root_file(tmp_path):
    path = tmp_path / "text.root"
    path.write_text("this is not a ROOT file\n" * 100)
    with pytest.raises(InputFileError, match="cannot open"):
        load_events(path)


def test_truncated_file(shared_data, tmp_path):
    source = (shared_data / NANO).read_bytes()
    path = tmp_path / "truncated.root"
    path.write_bytes(source[: len(source) // 2])
    with pytest.raises(InputFileError, match="truncated"):
        load_events(path)


def test_missing_branches_are_listed_with_the_schema(tmp_path):
    jets = ak.zip({"pt": ak.Array([[50.0]]), "eta": ak.Array([[0.1]]), "phi": ak.Array([[0.0]])})
    path = write_events_tree(tmp_path / "partial.root", {"Jet": jets, "MET_pt": np.array([10.0])})
    with pytest.raises(SchemaError, match=r"Jet_mass.*nanoaod"):
        load_events(path, schema="nanoaod")
    with pytest.raises(SchemaError, match="cannot detect the schema"):
        load_events(path)


def test_empty_tree(tmp_path):
    objects = ak.zip({k: ak.Array([[1.0]])[:0] for k in ("pt", "eta", "phi", "mass")})
    empty = np.zeros(0)
    branches = dict.fromkeys(("Jet", "Muon", "Electron", "Photon"), objects)
    path = write_events_tree(
        tmp_path / "empty.root", {**branches, "MET_pt": empty, "MET_phi": empty}
    )
    with pytest.raises(InvalidInputError, match="no entries"):
        load_events(path)


def test_unknown_schema_name(shared_data):
    with pytest.raises(SchemaError, match="unknown schema 'cms'"):
        load_events(shared_data / NANO, schema="cms")


def test_bad_mapping_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_mapping(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        load_mapping(broken)
    incomplete = tmp_path / "incomplete.toml"
    incomplete.write_text("[muons]\npt = 'pt1'\n")
    with pytest.raises(InvalidInputError, match="needs px, py, pz, energy or pt, eta, phi"):
        load_mapping(incomplete)


def test_an_unreadable_mapping_is_named_not_the_data_file(shared_data, tmp_path, monkeypatch):
    """The reader called the ROOT file damaged when the mapping beside it could not be read
    (a worker node without the permission); these tests run as root, so the denial is
    raised for the mapping's path alone."""
    mapping = tmp_path / "private.toml"
    mapping.write_text('name = "mine"\n')
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == mapping:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(
        InvalidInputError, match=r"private\.toml can not be read \(Permission denied"
    ) as e:
        load_events(shared_data / "uproot-Zmumu.root", schema="mapping", mapping=mapping)
    assert "damaged" not in str(e.value)


def test_bad_arguments(shared_data):
    with pytest.raises(InvalidInputError, match="step_size"):
        next(iterate_events(shared_data / NANO, step_size=0))
    with pytest.raises(InvalidInputError, match="no input files"):
        next(iterate_events([]))


def test_copy_of_file_reads_identically(shared_data, tmp_path):
    copy = tmp_path / "copy.root"
    shutil.copy(shared_data / NANO, copy)
    assert _counts(load_events(copy)) == _counts(load_events(shared_data / NANO))


# --------------------------------------------------------------- non-finite values, special files


def test_nan_muon_pt_is_counted_and_the_muons_dropped(shared_data, tmp_path):
    path, n_nan = nanoaod_with_nan_muons(shared_data / NANO, tmp_path / "nan_muons.root")
    assert n_nan > 0
    chunk = load_events(path)
    assert dict(chunk.non_finite) == {"Muon_pt": n_nan}
    assert dict(chunk.dropped_non_finite) == {"muons": n_nan}
    assert len(chunk) == 200  # no event is lost for a bad muon
    assert np.isfinite(ak.to_numpy(ak.flatten(chunk.muons.pt))).all()
    # chunk by chunk, the counts add up to the same totals
    chunks = list(iterate_events(path, step_size=37))
    assert sum(c.non_finite.get("Muon_pt", 0) for c in chunks) == n_nan
    assert sum(c.dropped_non_finite.get("muons", 0) for c in chunks) == n_nan


def test_clean_file_reports_no_non_finite_value(shared_data):
    chunk = load_events(shared_data / NANO)
    assert dict(chunk.non_finite) == {}
    assert dict(chunk.dropped_non_finite) == {}


def test_event_with_non_finite_met_is_dropped_and_counted(tmp_path):
    jets = ak.zip({k: ak.Array([[50.0], [60.0], [70.0]]) for k in ("pt", "eta", "phi", "mass")})
    nothing = ak.values_astype(ak.Array([[], [], []]), np.float64)
    empty = ak.zip(dict.fromkeys(("pt", "eta", "phi", "mass"), nothing))
    branches = {
        "Jet": jets,
        "Muon": empty,
        "Electron": empty,
        "Photon": empty,
        "MET_pt": np.array([40.0, np.inf, 50.0]),
        "MET_phi": np.array([0.1, 0.2, np.nan]),
    }
    path = write_events_tree(tmp_path / "bad_met.root", branches)
    chunk = load_events(path, schema="nanoaod")
    assert len(chunk) == 1
    assert dict(chunk.non_finite) == {"MET_pt": 1, "MET_phi": 1}
    assert dict(chunk.dropped_non_finite) == {"events": 2}


@pytest.mark.timeout(30)
def test_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "events.root"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match=r"FIFO \(named pipe\), not a regular file"):
        load_events(fifo)
    with pytest.raises(InputFileError, match="FIFO"):
        plan_read(fifo)


def test_character_device_and_folder_are_refused(tmp_path):
    with pytest.raises(InputFileError, match="/dev/null is a character device"):
        load_events("/dev/null")
    with pytest.raises(InputFileError, match=r"is a folder, not a file; give the files inside"):
        load_events(tmp_path)


def test_non_finite_btag_and_isolation_follow_the_rule(tmp_path):
    """A NaN or +inf b-tag score makes a light jet; a NaN isolation fails the muon's ID."""
    jets = ak.zip(
        {
            "pt": ak.Array([[50.0, 60.0], [70.0]]),
            "eta": ak.Array([[0.0, 0.0], [0.0]]),
            "phi": ak.Array([[0.0, 1.0], [0.0]]),
            "mass": ak.Array([[5.0, 5.0], [5.0]]),
            "btagDeepB": ak.Array([[0.9, np.nan], [np.inf]]),
        }
    )
    muons = ak.zip(
        {
            "pt": ak.Array([[40.0], [45.0]]),
            "eta": ak.Array([[2.0], [2.0]]),
            "phi": ak.Array([[3.0], [3.0]]),
            "mass": ak.Array([[0.1], [0.1]]),
            "pfRelIso04_all": ak.Array([[np.nan], [0.05]]),
        }
    )
    nothing = ak.values_astype(ak.Array([[], []]), np.float64)
    empty = ak.zip(dict.fromkeys(("pt", "eta", "phi", "mass"), nothing))
    branches = {
        "Jet": jets,
        "Muon": muons,
        "Electron": empty,
        "Photon": empty,
        "MET_pt": np.array([40.0, 50.0]),
        "MET_phi": np.array([0.1, 0.2]),
    }
    chunk = load_events(write_events_tree(tmp_path / "tags.root", branches), schema="nanoaod")
    assert dict(chunk.non_finite) == {"Jet_btagDeepB": 2, "Muon_pfRelIso04_all": 1}
    assert dict(chunk.dropped_non_finite) == {}
    assert ak.to_list(ak.num(chunk.bjets)) == [1, 0]
    assert ak.to_list(ak.num(chunk.jets)) == [1, 1]
    assert ak.to_list(ak.num(chunk.muons)) == [0, 1]
