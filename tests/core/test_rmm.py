"""The RMM against hand-computed events, the per-event reference and physics invariants."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.rmm
from core.errors import InvalidInputError
from core.objects import OBJECT_TYPES, chunk_from_lists, make_collection
from core.rmm import (
    BLINDED_CELLS,
    BLINDED_PAIR_NAMES,
    DEFAULT_LAYOUT,
    MAX_ABS_RAPIDITY,
    RMMLayout,
    check_kinematics,
    numba_available,
    reference_events,
    rmm_feature_rows,
    rmm_features,
    rmm_matrices,
    rmm_matrix_reference,
)

SQRT_S = 13000.0
C = 0.15
TOLERANCE = 1e-6  # absolute, on dimensionless cells stored as float32


def single(objects, met_pt=0.0, met_phi=0.0, event=7):
    """A one-event chunk from {collection: [(pt, eta, phi, mass), ...]}."""
    return chunk_from_lists(
        {name: [objs] for name, objs in objects.items()}, [met_pt], [met_phi], event=[event]
    )


def reference_of(chunk):
    return np.array([rmm_matrix_reference(event) for event in reference_events(chunk)])


def skip_without_numba():
    if not numba_available():
        pytest.skip("numba is not installed: only the numpy backend is tested")


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    """Both ways of filling the cells; the numba one is skipped when numba is missing."""
    if request.param == "numba":
        skip_without_numba()
    return request.param


# --------------------------------------------------------------------------- constants


def test_blinded_cells_are_the_nine_leading_pair_masses_of_physics_md():
    assert BLINDED_CELLS == (
        (1, 2),
        (1, 11),
        (11, 12),
        (1, 21),
        (11, 21),
        (1, 26),
        (11, 26),
        (1, 31),
        (11, 31),
    )


def test_blinded_pair_names_say_which_mass_each_cell_holds():
    cells = dict(zip(BLINDED_PAIR_NAMES, BLINDED_CELLS, strict=True))
    assert cells["jm"] == (1, 21)
    assert cells["be"] == (11, 26)
    assert cells["bg"] == (11, 31)


def test_default_layout_is_36_by_36_with_1287_features():
    assert DEFAULT_LAYOUT.size == 36
    assert DEFAULT_LAYOUT.block_starts == {
        "jets": 1,
        "bjets": 11,
        "muons": 21,
        "electrons": 26,
        "photons": 31,
    }
    assert DEFAULT_LAYOUT.n_features == 1287
    assert DEFAULT_LAYOUT.sqrt_s == SQRT_S
    assert DEFAULT_LAYOUT.rapidity_scale == C


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_muons": 0}, "block sizes"),
        ({"n_jets": 1}, "2 light-jet slots"),
        ({"sqrt_s": -1.0}, "sqrt_s"),
        ({"sqrt_s": math.nan}, "sqrt_s"),
        ({"rapidity_scale": 0.0}, "rapidity scale"),
        ({"met_threshold_gev": -5.0}, "met_threshold_gev"),
    ],
)
def test_invalid_layout_is_rejected(changes, message):
    with pytest.raises(InvalidInputError, match=message):
        RMMLayout(**changes)


def test_features_remove_exactly_the_blinded_cells_in_row_major_order():
    rng = np.random.default_rng(3)
    matrices = rng.random((4, 36, 36)).astype(np.float32)
    features = rmm_features(matrices)
    assert features.shape == (4, 1287)
    assert features.dtype == np.float32
    blinded_flat = [row * 36 + column for row, column in BLINDED_CELLS]
    expected = np.delete(matrices.reshape(4, -1), blinded_flat, axis=1)
    np.testing.assert_array_equal(features, expected)


def test_features_of_a_smaller_layout_follow_its_blinded_cells():
    layout = RMMLayout(n_jets=3, n_bjets=2, n_muons=1, n_electrons=1, n_photons=1)
    assert layout.size == 9
    assert layout.blinded_cells[:3] == ((1, 2), (1, 4), (4, 5))
    matrices = np.arange(2 * 81, dtype=np.float32).reshape(2, 9, 9)
    features = rmm_features(matrices, layout=layout)
    assert features.shape == (2, 81 - 9)
    assert not set(features[0].tolist()) & {float(r * 9 + c) for r, c in layout.blinded_cells}


@pytest.mark.parametrize("shape", [(36, 36), (2, 36, 35), (2, 1296)])
def test_features_reject_wrong_shapes(shape):
    with pytest.raises(InvalidInputError, match=r"\(n, 36, 36\)"):
        rmm_features(np.zeros(shape))


# --------------------------------------------------------------------------- by hand

# One object of each type, all massless; MET = 50 GeV along +y. Every cell below is worked
# out by hand from the kinematics (see the comments), not with the code under test.
HAND_EVENT = {
    "jets": [(100.0, 0.0, 0.0, 0.0)],  # E = 100, p = (100, 0, 0)
    "bjets": [(400.0, 0.0, math.pi, 0.0)],  # E = 400, p = (-400, 0, 0)
    "muons": [(50.0, 0.0, math.pi / 2, 0.0)],  # E = 50, p = (0, 50, 0)
    "electrons": [(50.0, 0.0, -math.pi / 2, 0.0)],  # E = 50, p = (0, -50, 0)
    "photons": [(60.0, math.log(2.0), 0.0, 0.0)],  # pz = 45, E = 75, y = ln 2, E_T = 60
}


def hand_expected():
    expected = np.zeros((36, 36))
    j, b, m, e, g = 1, 11, 21, 26, 31
    expected[0, 0] = 50 / SQRT_S
    # m_T^2 = (E_T + 50)^2 - (px)^2 - (py + 50)^2
    expected[0, j] = math.sqrt(150**2 - 100**2 - 50**2) / SQRT_S  # 100 GeV
    expected[0, b] = math.sqrt(450**2 - 400**2 - 50**2) / SQRT_S  # 200 GeV
    expected[0, m] = 0.0  # muon along MET: argument 100^2 - 100^2 = 0
    expected[0, e] = math.sqrt(100**2) / SQRT_S  # 100 GeV
    expected[0, g] = math.sqrt(110**2 - 60**2 - 50**2) / SQRT_S  # sqrt(6000)
    for k, et in ((j, 100), (b, 400), (m, 50), (e, 50), (g, 60)):
        expected[k, k] = et / SQRT_S
    expected[g, 0] = C * (1.25 - 1.0)  # cosh(ln 2) = 5/4
    # m^2 = 2 (E1 E2 - p1.p2) for massless pairs
    masses = {
        (j, b): 2 * (100 * 400 + 100 * 400),
        (j, m): 2 * 100 * 50,
        (j, e): 2 * 100 * 50,
        (j, g): 2 * (100 * 75 - 100 * 60),
        (b, m): 2 * 400 * 50,
        (b, e): 2 * 400 * 50,
        (b, g): 2 * (400 * 75 + 400 * 60),
        (m, e): 2 * (50 * 50 + 50 * 50),
        (m, g): 2 * 50 * 75,
        (e, g): 2 * 50 * 75,
    }
    for (i, k), m_squared in masses.items():
        expected[i, k] = math.sqrt(m_squared) / SQRT_S
    # only the photon has y != 0: C (cosh(ln2 / 2) - 1), cosh(ln2 / 2) = 3 / (2 sqrt 2)
    for i in (j, b, m, e):
        expected[g, i] = C * (3 / (2 * math.sqrt(2)) - 1)
    return expected


def test_rmm_of_one_object_of_each_type_matches_the_hand_computation(backend):
    matrices = rmm_matrices(single(HAND_EVENT, met_pt=50.0, met_phi=math.pi / 2), backend=backend)
    assert matrices.shape == (1, 36, 36)
    assert matrices.dtype == np.float32
    np.testing.assert_allclose(matrices[0], hand_expected(), rtol=0, atol=TOLERANCE)
    assert matrices[0, 1, 11] == pytest.approx(400 / SQRT_S, rel=1e-6)  # m_jb = 400 GeV


def test_reference_matches_the_hand_computation():
    reference = reference_of(single(HAND_EVENT, met_pt=50.0, met_phi=math.pi / 2))
    np.testing.assert_allclose(reference[0], hand_expected(), rtol=0, atol=1e-12)


def jet_with_rapidity(pt, mass, rapidity, phi):
    """(pt, eta, phi, mass) of a jet with the given true rapidity: pz = m_T sinh(y)."""
    transverse_mass = math.hypot(pt, mass)
    eta = math.asinh(transverse_mass * math.sinh(rapidity) / pt)
    return (pt, eta, phi, mass)


def test_two_massive_jets_with_known_rapidities(backend):
    jets = [jet_with_rapidity(300.0, 40.0, 1.0, 0.0), jet_with_rapidity(200.0, 30.0, -0.5, 2.0)]
    matrices = rmm_matrices(single({"jets": jets}, met_pt=25.0, met_phi=1.0), backend=backend)[0]
    # column 0 and the lower cell use the true rapidities, not eta
    assert matrices[1, 0] == pytest.approx(C * (math.cosh(1.0) - 1), abs=TOLERANCE)
    assert matrices[2, 0] == pytest.approx(C * (math.cosh(-0.5) - 1), abs=TOLERANCE)
    assert matrices[2, 1] == pytest.approx(C * (math.cosh(0.75) - 1), abs=TOLERANCE)
    # m^2 = m1^2 + m2^2 + 2 (mT1 mT2 cosh(dy) - pt1 pt2 cos(dphi))
    mt1, mt2 = math.hypot(300, 40), math.hypot(200, 30)
    m_jj = math.sqrt(40**2 + 30**2 + 2 * (mt1 * mt2 * math.cosh(1.5) - 300 * 200 * math.cos(2)))
    assert matrices[1, 2] * SQRT_S == pytest.approx(m_jj, rel=1e-6)
    # E_T = E pt / |p| with E = mT cosh(y), |p| = sqrt(pt^2 + (mT sinh y)^2)
    et1 = mt1 * math.cosh(1.0) * 300 / math.hypot(300, mt1 * math.sinh(1.0))
    et2 = mt2 * math.cosh(0.5) * 200 / math.hypot(200, mt2 * math.sinh(0.5))
    assert matrices[1, 1] == pytest.approx(et1 / SQRT_S, rel=1e-6)
    assert matrices[2, 2] == pytest.approx((et1 - et2) / (et1 + et2), rel=1e-6)
    # MET of 25 GeV is below 30 GeV: the whole MET row is zero
    assert not matrices[0].any()
    np.testing.assert_allclose(
        matrices, reference_of(single({"jets": jets}, 25.0, 1.0))[0], atol=1e-7
    )


@pytest.mark.parametrize(
    ("met", "kept"), [(0.0, False), (29.99, False), (30.0, True), (30.01, True), (250.0, True)]
)
def test_met_below_30_gev_counts_as_zero(met, kept, backend):
    event = {"jets": [(100.0, 0.3, 0.0, 5.0)]}
    matrix = rmm_matrices(single(event, met_pt=met, met_phi=math.pi), backend=backend)[0]
    if kept:
        assert matrix[0, 0] == pytest.approx(met / SQRT_S, rel=1e-6)
        # back-to-back jet and MET: m_T^2 = (E_T + MET)^2 - (100 - MET)^2 > 0
        et = matrix[1, 1] * SQRT_S
        expected_mt = math.sqrt((et + met) ** 2 - (100 - met) ** 2)
        assert matrix[0, 1] * SQRT_S == pytest.approx(expected_mt, rel=1e-5)
    else:
        assert matrix[0, 0] == 0.0
        assert matrix[0, 1] == 0.0
    assert matrix[1, 0] == pytest.approx(C * (math.cosh(matrix_rapidity(100.0, 0.3, 5.0)) - 1))


def matrix_rapidity(pt, eta, mass):
    pz = pt * math.sinh(eta)
    energy = math.sqrt(pt**2 + pz**2 + mass**2)
    return 0.5 * math.log((energy + pz) / (energy - pz))


def test_object_with_negative_mass_squared_gives_negative_signed_pair_mass(backend):
    # two collinear photons with m^2 < 0 from rounding: the pair has m^2 < 0 too
    photons = [(80.0, 1.0, 0.5, -0.01), (40.0, 1.0, 0.5, -0.02)]
    matrix = rmm_matrices(single({"photons": photons}), backend=backend)[0]
    p1, p2 = 80 * math.cosh(1.0), 40 * math.cosh(1.0)
    e1, e2 = math.sqrt(p1**2 - 0.01**2), math.sqrt(p2**2 - 0.02**2)
    m_squared = (e1 + e2) ** 2 - (p1 + p2) ** 2
    assert m_squared < 0
    assert matrix[31, 32] < 0
    assert matrix[31, 32] == pytest.approx(-math.sqrt(-m_squared) / SQRT_S, rel=1e-4)
    # E < |p| so the true rapidity is slightly above eta, and E_T = E pt / |p| < pt
    assert matrix[31, 31] * SQRT_S == pytest.approx(e1 * 80 / p1, rel=1e-6)
    assert reference_of(single({"photons": photons}))[0, 31, 31] * SQRT_S < 80  # float64
    y1 = 0.5 * math.log((e1 + 80 * math.sinh(1.0)) / (e1 - 80 * math.sinh(1.0)))
    assert y1 > 1.0
    assert matrix[31, 0] == pytest.approx(C * (math.cosh(y1) - 1), rel=1e-6)
    assert np.isfinite(matrix).all()


def test_second_object_diagonal_is_the_relative_transverse_energy_drop(backend):
    jets = [(300.0, 0.0, 0.0, 0.0), (100.0, 0.0, 1.0, 0.0), (50.0, 0.0, 2.0, 0.0)]
    matrix = rmm_matrices(single({"jets": jets}), backend=backend)[0]
    assert matrix[1, 1] == pytest.approx(300 / SQRT_S, rel=1e-6)
    assert matrix[2, 2] == pytest.approx((300 - 100) / 400, rel=1e-6)
    assert matrix[3, 3] == pytest.approx((100 - 50) / 150, rel=1e-6)
    assert matrix[4, 4] == 0.0


def test_empty_event_is_all_zero_and_empty_chunk_has_no_rows(backend):
    assert not rmm_matrices(single({}, met_pt=10.0), backend=backend).any()
    one = single(HAND_EVENT, met_pt=50.0)
    empty = replace(
        one,
        **{name: one.collection(name)[:0] for name in OBJECT_TYPES},
        met_pt=one.met_pt[:0],
        met_phi=one.met_phi[:0],
        event=one.event[:0],
    )
    assert rmm_matrices(empty, backend=backend).shape == (0, 36, 36)
    assert rmm_features(rmm_matrices(empty, backend=backend)).shape == (0, 1287)


def test_sqrt_s_argument_rescales_every_energy_cell(backend):
    chunk = single(HAND_EVENT, met_pt=50.0, met_phi=math.pi / 2)
    at_13 = rmm_matrices(chunk, backend=backend)[0]
    at_13p6 = rmm_matrices(chunk, sqrt_s=13600.0, backend=backend)[0]
    assert at_13p6[1, 11] == pytest.approx(at_13[1, 11] * 13000 / 13600, rel=1e-6)
    assert at_13p6[31, 0] == at_13[31, 0]  # rapidity cells do not depend on sqrt(s)


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def nanoaod_chunk(shared_data: Path):
    from core.events import load_events

    chunk = load_events(shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root")
    assert len(chunk) == 200
    return chunk


def test_rmm_matches_reference_on_cms_nanoaod_file(nanoaod_chunk, backend):
    matrices = rmm_matrices(nanoaod_chunk, backend=backend)
    np.testing.assert_allclose(matrices, reference_of(nanoaod_chunk), rtol=0, atol=TOLERANCE)
    assert np.count_nonzero(matrices[:, 1, 2]) > 10  # many events with two jets
    assert np.count_nonzero(matrices[:, 0, 0]) > 100  # and MET above 30 GeV


@pytest.fixture(scope="module")
def synthetic_chunk(tmp_path_factory):
    from core.events import load_events
    from core.synth import SampleConfig, SignalSpec, generate_sample

    folder = tmp_path_factory.mktemp("synthetic")
    config = SampleConfig(
        n_events=3000,
        seed=11,
        signals=(SignalSpec("jm", 1500.0, 50.0, n_events=200, extra={"photons": 1}),),
    )
    info = generate_sample(folder, config)
    return load_events(info.files)


def test_rmm_matches_reference_on_synthetic_file(synthetic_chunk, backend):
    matrices = rmm_matrices(synthetic_chunk, backend=backend)
    np.testing.assert_allclose(matrices, reference_of(synthetic_chunk), rtol=0, atol=TOLERANCE)
    for start in (1, 11, 21, 26, 31):
        assert np.count_nonzero(matrices[:, start, start]) > 0  # every block is exercised


# --------------------------------------------------------------------------- backends


def counts_of(chunk, name):
    return np.asarray(ak.num(chunk.collection(name)))


@pytest.mark.parametrize("sample", ["nanoaod_chunk", "synthetic_chunk"])
def test_numba_and_numpy_backends_agree(sample, request):
    skip_without_numba()
    chunk = request.getfixturevalue(sample)
    compiled = rmm_matrices(chunk, backend="numba")
    vectorised = rmm_matrices(chunk, backend="numpy")
    assert compiled.dtype == vectorised.dtype == np.float32
    # the same float64 operations in the same order: identical in practice, 1e-6 promised
    np.testing.assert_allclose(compiled, vectorised, rtol=0, atol=TOLERANCE)
    assert np.count_nonzero(vectorised) > 2 * len(chunk)  # the cells are not mostly empty
    np.testing.assert_array_equal(rmm_matrices(chunk), compiled)  # "auto" takes numba


def test_backends_agree_on_a_small_layout_that_truncates_every_block(synthetic_chunk, backend):
    layout = RMMLayout(n_jets=2, n_bjets=1, n_muons=1, n_electrons=1, n_photons=1)
    # the sample has events with more objects than slots in every block
    for name, size in zip(OBJECT_TYPES, layout.block_sizes, strict=True):
        assert counts_of(synthetic_chunk, name).max() > size
    matrices = rmm_matrices(synthetic_chunk, layout=layout, backend=backend)
    assert matrices.shape == (len(synthetic_chunk), 7, 7)
    events = reference_events(synthetic_chunk)
    reference = np.array([rmm_matrix_reference(event, layout) for event in events])
    np.testing.assert_allclose(matrices, reference, rtol=0, atol=TOLERANCE)


def test_per_event_loop_matches_numpy_without_compiling(nanoaod_chunk, monkeypatch):
    # the loop that numba compiles, run as plain Python: its logic is tested without numba
    monkeypatch.setattr(core.rmm, "compiled_fill_cells", lambda: core.rmm.fill_cells_per_event)
    looped = rmm_matrices(nanoaod_chunk, backend="numba")
    vectorised = rmm_matrices(nanoaod_chunk, backend="numpy")
    np.testing.assert_allclose(looped, vectorised, rtol=0, atol=TOLERANCE)
    assert np.count_nonzero(looped[:, 1, 2]) > 5


def test_auto_uses_the_compiled_loop_when_there_is_one_and_numpy_never_does(monkeypatch):
    calls = []

    def recording_kernel(*arguments):
        calls.append(len(arguments[0]))
        core.rmm.fill_cells_per_event(*arguments)

    monkeypatch.setattr(core.rmm, "compiled_fill_cells", lambda: recording_kernel)
    chunk = single(HAND_EVENT, met_pt=50.0, met_phi=math.pi / 2)
    rmm_matrices(chunk, backend="numpy")
    assert calls == []
    np.testing.assert_allclose(rmm_matrices(chunk)[0], hand_expected(), rtol=0, atol=TOLERANCE)
    assert calls == [1]


def test_without_numba_auto_falls_back_to_numpy_and_numba_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    monkeypatch.setattr(core.rmm, "compiled_fill_cells", core.rmm.compiled_fill_cells.__wrapped__)
    assert not numba_available()
    chunk = single(HAND_EVENT, met_pt=50.0, met_phi=math.pi / 2)
    np.testing.assert_allclose(rmm_matrices(chunk)[0], hand_expected(), rtol=0, atol=TOLERANCE)
    with pytest.raises(InvalidInputError, match=r"numba can not be imported.*'numpy'"):
        rmm_matrices(chunk, backend="numba")


def test_unknown_backend_is_rejected():
    with pytest.raises(InvalidInputError, match="backend must be 'auto', 'numba' or 'numpy'"):
        rmm_matrices(single(HAND_EVENT), backend="cuda")


def test_bad_kinematics_are_rejected_before_either_backend_runs(backend):
    with pytest.raises(InvalidInputError, match=r"event 1002 .*jets\.pt = nan"):
        rmm_matrices(raw_chunk(jets=jets_with(math.nan, 0.0, 0.0, 1.0)), backend=backend)


# --------------------------------------------------------------------------- properties

objects_strategy = st.tuples(
    st.floats(30.0, 3000.0),
    st.floats(-2.5, 2.5),
    st.floats(-math.pi, math.pi),
    st.one_of(st.floats(0.0, 80.0), st.floats(-0.05, 0.0)),
)
event_strategy = st.fixed_dictionaries(
    {
        "jets": st.lists(objects_strategy, max_size=13, unique_by=lambda o: o[0]),
        "bjets": st.lists(objects_strategy, max_size=4, unique_by=lambda o: o[0]),
        "muons": st.lists(objects_strategy, max_size=3, unique_by=lambda o: o[0]),
        "electrons": st.lists(objects_strategy, max_size=3, unique_by=lambda o: o[0]),
        "photons": st.lists(objects_strategy, max_size=7, unique_by=lambda o: o[0]),
        "met": st.tuples(st.floats(0.0, 1000.0), st.floats(-math.pi, math.pi)),
    }
)
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def chunk_of(events):
    objects = {name: [event[name] for event in events] for name in OBJECT_TYPES}
    met = [event["met"] for event in events]
    return chunk_from_lists(objects, [m[0] for m in met], [m[1] for m in met])


@pytest.mark.parametrize(
    "backend_name",
    [
        "numpy",
        pytest.param(
            "numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not installed")
        ),
    ],
)
@PROPERTY_SETTINGS
@given(st.lists(event_strategy, min_size=1, max_size=6))
def test_valid_events_give_finite_matrices_that_match_the_reference(backend_name, events):
    chunk = chunk_of(events)
    matrices = rmm_matrices(chunk, backend=backend_name)
    assert np.isfinite(matrices).all()
    assert rmm_features(matrices).shape == (len(events), 1287)
    np.testing.assert_allclose(matrices, reference_of(chunk), rtol=0, atol=TOLERANCE)


def boosted(event, rapidity_shift):
    """The event after a boost along the beam: every rapidity moves by `rapidity_shift`."""
    moved = dict(event)
    for name in OBJECT_TYPES:
        moved[name] = []
        for pt, eta, phi, mass in event[name]:
            signed = math.copysign(mass * mass, mass)
            transverse_mass = math.sqrt(pt * pt + signed)
            pz = pt * math.sinh(eta)
            rapidity = math.asinh(pz / transverse_mass) + rapidity_shift
            new_eta = math.asinh(transverse_mass * math.sinh(rapidity) / pt)
            moved[name].append((pt, new_eta, phi, mass))
    return moved


@PROPERTY_SETTINGS
@given(event_strategy, st.floats(-1.5, 1.5))
def test_pair_cells_depend_only_on_rapidity_differences(event, shift):
    matrices = rmm_matrices(chunk_of([event, boosted(event, shift)]))
    rows, columns = np.triu_indices(36, k=1)
    pair_cells = (rows > 0) & (columns > 0)
    upper = (rows[pair_cells], columns[pair_cells])
    lower = (columns[pair_cells], rows[pair_cells])
    # the lower triangle is C (cosh(dy/2) - 1): unchanged by a common rapidity shift
    np.testing.assert_allclose(matrices[1][lower], matrices[0][lower], atol=1e-5)
    # and the pair masses are Lorentz invariant (1e-5 of sqrt(s) = 0.13 GeV)
    np.testing.assert_allclose(matrices[1][upper], matrices[0][upper], atol=1e-5)


@PROPERTY_SETTINGS
@given(event_strategy, st.floats(-math.pi, math.pi))
def test_rmm_is_invariant_under_a_rotation_about_the_beam(event, angle):
    rotated = {
        name: [(pt, eta, phi + angle, mass) for pt, eta, phi, mass in event[name]]
        for name in OBJECT_TYPES
    }
    rotated["met"] = (event["met"][0], event["met"][1] + angle)
    matrices = rmm_matrices(chunk_of([event, rotated]))
    np.testing.assert_allclose(matrices[1], matrices[0], atol=1e-5)


@PROPERTY_SETTINGS
@given(event_strategy, st.randoms(use_true_random=False))
def test_truncation_keeps_the_highest_pt_objects(event, random):
    shuffled = {name: random.sample(event[name], len(event[name])) for name in OBJECT_TYPES}
    shuffled["met"] = event["met"]
    truncated = {
        name: sorted(event[name], reverse=True)[:size]
        for name, size in zip(OBJECT_TYPES, DEFAULT_LAYOUT.block_sizes, strict=True)
    }
    truncated["met"] = event["met"]
    matrices = rmm_matrices(chunk_of([shuffled, truncated]))
    np.testing.assert_array_equal(matrices[0], matrices[1])
    # the leading jet of the block is the highest-pT jet of the event
    if event["jets"]:
        highest = max(event["jets"])
        assert matrices[0, 1, 1] == pytest.approx(
            rmm_matrices(chunk_of([{**truncated, "jets": [highest]}]))[0, 1, 1], rel=1e-6
        )


# --------------------------------------------------------------------------- bad input


def raw_chunk(**changes):
    """A two-event chunk built field by field, so that invalid values survive construction."""
    base = chunk_from_lists(
        {"jets": [[(50.0, 0.0, 0.0, 1.0)], [(80.0, 1.0, 1.0, 2.0), (40.0, 0.5, 2.0, 1.0)]]},
        [40.0, 50.0],
        [0.0, 1.0],
        event=[1001, 1002],
    )
    return replace(base, **changes)


def jets_with(pt, eta, phi, mass):
    return make_collection(
        [[50.0], [80.0, pt]], [[0.0], [1.0, eta]], [[0.0], [1.0, phi]], [[1.0], [2.0, mass]]
    )


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (raw_chunk(jets=jets_with(math.nan, 0.0, 0.0, 1.0)), r"event 1002 .*jets\.pt = nan"),
        (raw_chunk(jets=jets_with(40.0, math.inf, 0.0, 1.0)), r"event 1002 .*jets\.eta = inf"),
        (raw_chunk(jets=jets_with(40.0, 0.0, math.nan, 1.0)), r"event 1002 .*jets\.phi = nan"),
        (raw_chunk(jets=jets_with(40.0, 0.0, 0.0, -math.inf)), r"event 1002 .*jets\.mass"),
        (raw_chunk(jets=jets_with(0.0, 0.0, 0.0, 1.0)), r"event 1002 .*jets\.pt = 0\.0.*pt > 0"),
        (raw_chunk(jets=jets_with(40.0, 0.0, 0.0, -200.0)), r"event 1002 .*negative energy"),
        (raw_chunk(jets=jets_with(40.0, 2.0, 0.0, -60.0)), r"event 1002 .*rapidity is undefined"),
        (raw_chunk(jets=jets_with(40.0, 25.0, 0.0, 0.0)), r"event 1002 .*rapidity"),
        (raw_chunk(jets=jets_with(40.0, 800.0, 0.0, 0.0)), r"event 1002 .*overflows"),
        (raw_chunk(met_pt=np.array([40.0, math.nan])), r"event 1002 .*met_pt = nan"),
        (raw_chunk(met_phi=np.array([math.inf, 0.0])), r"event 1001 .*met_phi = inf"),
        (raw_chunk(met_pt=np.array([-40.0, 50.0])), r"event 1001 .*MET >= 0"),
        (raw_chunk(met_phi=np.array([0.0])), r"met_phi has 1 entries but the chunk has 2"),
    ],
)
def test_bad_kinematics_raise_naming_event_and_field(chunk, message):
    with pytest.raises(InvalidInputError, match=message):
        rmm_matrices(chunk)


def test_unsorted_collection_is_rejected():
    unsorted = ak.zip(
        {
            "pt": [[50.0], [40.0, 80.0]],
            "eta": [[0.0], [0.0, 0.0]],
            "phi": [[0.0], [0.0, 1.0]],
            "mass": [[0.0], [0.0, 0.0]],
        }
    )
    with pytest.raises(InvalidInputError, match=r"event 1002 .*not sorted"):
        check_kinematics(raw_chunk(muons=unsorted))


def test_mismatched_collection_length_is_rejected():
    chunk = raw_chunk(photons=make_collection([[60.0]], [[0.0]], [[0.0]], [[0.0]]))
    with pytest.raises(InvalidInputError, match="'photons' has 1 events but the chunk has 2"):
        rmm_matrices(chunk)


def test_error_names_the_source_file_and_entry():
    chunk = replace(
        raw_chunk(jets=jets_with(math.nan, 0.0, 0.0, 1.0)), source="f.root", entry_start=500
    )
    with pytest.raises(InvalidInputError, match=r"event 1002 \(entry 501 of f\.root\)"):
        rmm_matrices(chunk)


def test_rapidity_limit_is_inclusive():
    at_limit = jets_with(40.0, MAX_ABS_RAPIDITY - 1e-9, 0.0, 0.0)
    matrices = rmm_matrices(raw_chunk(jets=at_limit))
    assert np.isfinite(matrices).all()


@pytest.mark.parametrize("block", [700, core.rmm.FEATURE_BLOCK_EVENTS])
def test_feature_rows_filled_block_by_block_equal_the_features_of_the_matrices(
    synthetic_chunk, block, monkeypatch
):
    """3200 events in blocks of 700 (the last one partial) or 2048: the features equal those
    of the whole chunk's matrices to the bit and the plain-Python reference's within float32."""
    skip_without_numba()
    monkeypatch.setattr(core.rmm, "FEATURE_BLOCK_EVENTS", block)
    rows = rmm_feature_rows(synthetic_chunk)
    np.testing.assert_array_equal(rows, rmm_features(rmm_matrices(synthetic_chunk)))
    events = itertools.islice(reference_events(synthetic_chunk), 900)
    reference = rmm_features(np.array([rmm_matrix_reference(event) for event in events]))
    np.testing.assert_allclose(rows[:900], reference, rtol=0, atol=TOLERANCE)
    assert rows.shape == (3200, 1287) and np.count_nonzero(rows[2100:]) > 1000
