"""Trigger-stream bits, leading-pair masses, the resolution binning and the 63 spectra."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInputError
from core.masses import (
    PAIRS,
    SPECTRUM_NAMES,
    STREAM_FIT_FROM_GEV,
    STREAM_LABELS,
    STREAMS,
    StreamRequirements,
    all_spectra,
    histogram,
    leading_pair_masses,
    mass_bin_edges,
    stream_bits,
)
from core.objects import chunk_from_lists, make_collection
from core.rmm import BLINDED_CELLS, rmm_matrices


def events(per_event, met=None):
    """A chunk from a list of {collection: [(pt, eta, phi, mass), ...]} per event."""
    n = len(per_event)
    names = ("jets", "bjets", "muons", "electrons", "photons")
    objects = {name: [event.get(name, []) for event in per_event] for name in names}
    met = [0.0] * n if met is None else met
    return chunk_from_lists(objects, met, [0.0] * n, event=list(range(100, 100 + n)))


def obj(pt, phi=0.0):
    return (pt, 0.0, phi, 0.0)


# --------------------------------------------------------------------------- constants


def test_stream_and_pair_constants_follow_physics_md():
    assert STREAMS == ("T1", "T2", "T3", "T4", "T5", "T6", "T7")
    assert [STREAM_LABELS[s] for s in STREAMS] == ["MET", "1L", "2L", "1G", "2G", "1J", "4J"]
    assert [STREAM_FIT_FROM_GEV[s] for s in STREAMS] == [600, 300, 300, 500, 300, 1500, 600]
    assert PAIRS == ("jj", "jb", "bb", "je", "be", "jm", "bm", "jg", "bg")
    assert len(SPECTRUM_NAMES) == 63
    assert SPECTRUM_NAMES[0] == "T1/jj"
    assert "T2/jm" in SPECTRUM_NAMES
    assert SPECTRUM_NAMES[-1] == "T7/bg"


# --------------------------------------------------------------------------- streams

STREAM_CASES = [
    # (event, MET, expected streams)
    ({}, 200.0, set()),
    ({}, 200.5, {"T1"}),
    ({"muons": [obj(60.0)]}, 0.0, set()),
    ({"electrons": [obj(61.0)]}, 0.0, {"T2"}),
    ({"muons": [obj(61.0)], "electrons": [obj(26.0)]}, 0.0, {"T2", "T3"}),
    ({"muons": [obj(40.0), obj(26.0)]}, 0.0, {"T3"}),
    ({"muons": [obj(40.0), obj(25.0)]}, 0.0, set()),
    ({"photons": [obj(150.0)]}, 0.0, set()),
    ({"photons": [obj(151.0)]}, 0.0, {"T4"}),
    ({"photons": [obj(151.0), obj(31.0)]}, 0.0, {"T4", "T5"}),
    ({"photons": [obj(40.0), obj(30.0)]}, 0.0, set()),
    ({"jets": [obj(500.0)]}, 0.0, set()),
    ({"bjets": [obj(501.0)]}, 0.0, {"T6"}),
    ({"jets": [obj(201.0), obj(101.0), obj(101.0), obj(101.0)]}, 0.0, {"T7"}),
    ({"jets": [obj(201.0), obj(101.0), obj(101.0)], "bjets": [obj(101.0)]}, 0.0, {"T7"}),
    ({"jets": [obj(199.0), obj(150.0), obj(150.0), obj(150.0)]}, 0.0, set()),
    ({"jets": [obj(300.0), obj(150.0), obj(150.0), obj(100.0)]}, 0.0, set()),
    ({"jets": [obj(600.0), obj(150.0), obj(150.0), obj(101.0)]}, 0.0, {"T6", "T7"}),
]


def test_stream_bits_follow_the_thresholds_of_table_3():
    chunk = events([case[0] for case in STREAM_CASES], met=[case[1] for case in STREAM_CASES])
    bits = stream_bits(chunk)
    assert bits.shape == (len(STREAM_CASES), 7)
    assert bits.dtype == np.bool_
    for row, (_, _, expected) in enumerate(STREAM_CASES):
        found = {stream for k, stream in enumerate(STREAMS) if bits[row, k]}
        assert found == expected, f"case {row}: {STREAM_CASES[row]}"


def test_stream_requirements_are_configurable():
    chunk = events([{"muons": [obj(45.0)]}])
    assert not stream_bits(chunk)[0, 1]
    assert stream_bits(chunk, StreamRequirements(lepton_pt_min=40.0))[0, 1]


# --------------------------------------------------------------------------- masses


def test_leading_pair_masses_by_hand():
    chunk = events(
        [
            # back-to-back massless at eta 0: m = 2 sqrt(pt1 pt2)
            {"jets": [obj(100.0), obj(100.0, math.pi)], "muons": [obj(400.0, math.pi)]},
            {"bjets": [obj(90.0), obj(40.0, math.pi)], "photons": [obj(250.0, math.pi / 2)]},
            {"electrons": [obj(50.0)]},
        ]
    )
    masses = leading_pair_masses(chunk)
    assert masses.shape == (3, 9)
    column = {pair: k for k, pair in enumerate(PAIRS)}
    assert masses[0, column["jj"]] == pytest.approx(200.0, rel=1e-12)
    assert masses[0, column["jm"]] == pytest.approx(2 * math.sqrt(100 * 400), rel=1e-12)
    assert masses[1, column["bb"]] == pytest.approx(2 * math.sqrt(90 * 40), rel=1e-12)
    # perpendicular massless: m^2 = 2 pt1 pt2
    assert masses[1, column["bg"]] == pytest.approx(math.sqrt(2 * 90 * 250), rel=1e-12)
    defined = {(0, "jj"), (0, "jm"), (1, "bb"), (1, "bg")}
    for row in range(3):
        for pair in PAIRS:
            assert np.isnan(masses[row, column[pair]]) == ((row, pair) not in defined)


def test_leading_pair_masses_use_the_leading_objects_and_signed_mass():
    chunk = events(
        [
            {
                "jets": [(50.0, 0.0, 0.0, 10.0), (300.0, 0.5, 1.0, 20.0), (80.0, -1.0, 2.0, 5.0)],
                "photons": [(80.0, 1.0, 0.5, -0.01), (40.0, 1.0, 0.5, -0.02)],
            }
        ]
    )
    masses = leading_pair_masses(chunk)[0]
    # j1 = 300 GeV jet, j2 = 80 GeV jet (whatever the input order)
    mt1, mt2 = math.hypot(300, 20), math.hypot(80, 5)
    y1 = math.asinh(300 * math.sinh(0.5) / mt1)
    y2 = math.asinh(80 * math.sinh(-1.0) / mt2)
    m_jj = math.sqrt(20**2 + 5**2 + 2 * (mt1 * mt2 * math.cosh(y1 - y2) - 300 * 80 * math.cos(1)))
    assert masses[PAIRS.index("jj")] == pytest.approx(m_jj, rel=1e-9)
    assert np.isnan(masses[PAIRS.index("bg")])


@pytest.mark.parametrize("source", ["nanoaod", "synthetic"])
def test_leading_pair_masses_equal_the_blinded_rmm_cells(source, shared_data: Path, tmp_path):
    from core.events import load_events
    from core.synth import SampleConfig, generate_sample

    if source == "nanoaod":
        chunk = load_events(shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root")
    else:
        chunk = load_events(generate_sample(tmp_path, SampleConfig(n_events=2000, seed=5)).files)
    masses = leading_pair_masses(chunk)
    matrices = rmm_matrices(chunk)
    # BLINDED_CELLS follow PHYSICS.md section 2 (jj jb bb jm bm je be jg bg), PAIRS section 3
    cell_of_pair = dict(
        zip(("jj", "jb", "bb", "jm", "bm", "je", "be", "jg", "bg"), BLINDED_CELLS, strict=True)
    )
    for k, pair in enumerate(PAIRS):
        row, column = cell_of_pair[pair]
        defined = ~np.isnan(masses[:, k])
        assert np.array_equal(defined, matrices[:, row, column] != 0)
        np.testing.assert_allclose(
            masses[defined, k], matrices[defined, row, column] * 13000.0, rtol=1e-6, atol=1e-3
        )
    assert (~np.isnan(masses)).sum() > 20


def test_masses_and_streams_reject_bad_kinematics():
    bad = replace(
        events([{"jets": [obj(50.0)]}]),
        jets=make_collection([[math.nan]], [[0.0]], [[0.0]], [[0.0]]),
    )
    with pytest.raises(InvalidInputError, match=r"event 100 .*jets\.pt = nan"):
        leading_pair_masses(bad)
    with pytest.raises(InvalidInputError, match=r"event 100 .*jets\.pt = nan"):
        stream_bits(bad)


# --------------------------------------------------------------------------- binning


def test_resolution_binning_has_178_bins_from_35_to_13093_gev():
    edges = mass_bin_edges()
    assert len(edges) - 1 == 178
    assert edges[0] == 35.0
    assert edges[-1] == pytest.approx(13093.19, abs=0.01)
    assert edges[-2] <= 13000.0 < edges[-1]
    widths = np.diff(edges)
    expected = edges[:-1] * np.sqrt(0.84**2 / edges[:-1] + 0.016**2)
    np.testing.assert_allclose(widths, expected, rtol=1e-12)
    assert widths[0] == pytest.approx(5.001, abs=1e-3)  # sqrt(0.84^2 35 + 0.016^2 35^2)


@pytest.mark.parametrize(("start", "stop"), [(0.0, 100.0), (50.0, 40.0), (35.0, math.inf)])
def test_binning_rejects_bad_ranges(start, stop):
    with pytest.raises(InvalidInputError, match="0 < start < stop"):
        mass_bin_edges(start, stop)


# --------------------------------------------------------------------------- histograms


def injected():
    """Masses at known bins: 3 events in T2 with m_jm in bin 40, 1 in T1, NaN elsewhere."""
    edges = mass_bin_edges()
    centre = 0.5 * (edges[40] + edges[41])
    masses = np.full((6, 9), np.nan)
    masses[:4, PAIRS.index("jm")] = centre
    masses[4, PAIRS.index("jm")] = 20.0  # below the first edge
    masses[5, PAIRS.index("jm")] = 20000.0  # above the last edge
    bits = np.zeros((6, 7), dtype=bool)
    bits[:3, STREAMS.index("T2")] = True
    bits[3, STREAMS.index("T1")] = True
    bits[4:, STREAMS.index("T2")] = True
    return masses, bits


def test_histogram_counts_the_injected_masses_in_their_bin():
    masses, bits = injected()
    counts, edges = histogram(masses, bits, "T2", "jm")
    assert counts.shape == (178,)
    assert len(edges) == 179
    assert counts[40] == 3
    assert counts.sum() == 3  # NaN and out-of-range masses are not counted
    mask = np.array([True, False, True, True, True, True])
    assert histogram(masses, bits, "T2", "jm", mask)[0][40] == 2
    assert histogram(masses, bits, "T1", "jm")[0].sum() == 1
    assert histogram(masses, bits, "T2", "jj")[0].sum() == 0


def test_all_spectra_equal_the_single_histograms():
    rng = np.random.default_rng(9)
    masses = rng.lognormal(6.0, 1.0, (5000, 9))
    masses[rng.random((5000, 9)) < 0.3] = np.nan
    masses[0, 0] = mass_bin_edges()[-1]  # the last edge belongs to the last bin
    bits = rng.random((5000, 7)) < 0.4
    mask = rng.random(5000) < 0.7
    spectra = all_spectra(masses, bits, mask)
    assert spectra.names == SPECTRUM_NAMES
    assert spectra.counts.shape == (63, 178)
    for name in SPECTRUM_NAMES:
        stream, pair = name.split("/")
        np.testing.assert_array_equal(
            spectra.spectrum(name), histogram(masses, bits, stream, pair, mask)[0]
        )
    assert spectra.counts.sum() > 10000


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"stream": "T8"}, "unknown stream 'T8'"),
        ({"pair": "jz"}, "unknown pair 'jz'"),
        ({"masses": np.zeros((6, 8))}, r"masses must have shape \(n, 9\)"),
        ({"bits": np.zeros((5, 7), dtype=bool)}, r"stream bits must have shape \(6, 7\)"),
        ({"mask": np.ones(6)}, "bool array of shape"),
        ({"mask": np.ones(5, dtype=bool)}, "bool array of shape"),
    ],
)
def test_histogram_rejects_bad_arguments(arguments, message):
    masses, bits = injected()
    call = {"masses": masses, "bits": bits, "stream": "T2", "pair": "jm", "mask": None}
    call.update(arguments)
    with pytest.raises(InvalidInputError, match=message):
        histogram(**call)


def test_unknown_spectrum_name_is_rejected():
    masses, bits = injected()
    with pytest.raises(InvalidInputError, match="unknown spectrum"):
        all_spectra(masses, bits).spectrum("T2-jm")
