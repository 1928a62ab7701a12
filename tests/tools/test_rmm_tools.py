"""The `compute_rmm` and `spectra` tools: JSON in, files and JSON out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from core.errors import InputFileError, InvalidInputError
from core.events import iterate_events, load_events
from core.masses import (
    SPECTRUM_NAMES,
    STREAMS,
    leading_pair_masses,
    mass_bin_edges,
    stream_bits,
)
from core.objects import OBJECT_TYPES
from core.rmm import (
    DEFAULT_LAYOUT,
    reference_events,
    rmm_features,
    rmm_matrices,
    rmm_matrix_reference,
)
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import add_score_column, read_event_table, write_event_table
from tools.registry import get_tool

NANOAOD = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def test_compute_rmm_writes_matrices_features_and_the_objects_that_went_in(
    shared_data: Path, tmp_path
):
    output = tmp_path / "out" / "rmm.npz"
    path = str(shared_data / NANOAOD)
    result = get_tool("compute_rmm").call(
        {"inputs": [path], "schema": "auto", "max_events": 150, "output": str(output)}
    )
    assert result == {
        "output": str(output),
        "n_events": 150,
        "schema": "nanoaod",
        "non_finite": {},
        "dropped_non_finite": {},
        "notes": [],
    }
    chunk = load_events(path, max_events=150)
    with np.load(output) as data:
        assert data["rmm"].shape == (150, 36, 36)
        assert data["features"].shape == (150, 1287)
        np.testing.assert_array_equal(data["rmm"], rmm_matrices(chunk))
        np.testing.assert_array_equal(data["features"], rmm_features(data["rmm"]))
        np.testing.assert_array_equal(data["event"], chunk.event)
        for name, size in (("jets", 10), ("bjets", 10), ("muons", 5), ("electrons", 5)):
            for field in ("pt", "eta", "phi", "mass"):
                assert data[f"{name}_{field}"].shape == (150, size)
        assert data["photons_pt"].shape == (150, 5)
        assert data["met_pt"].shape == data["met_phi"].shape == (150,)
        # the padded objects rebuild the matrices through the independent reference
        for row in range(0, 150, 15):
            event = reference_events(chunk)[row]
            objects = {
                name: [
                    tuple(data[f"{name}_{f}"][row, k] for f in ("pt", "eta", "phi", "mass"))
                    for k in range(data[f"{name}_pt"].shape[1])
                    if not np.isnan(data[f"{name}_pt"][row, k])
                ]
                for name in event.objects
            }
            sizes = dict(zip(OBJECT_TYPES, DEFAULT_LAYOUT.block_sizes, strict=True))
            assert objects == {
                name: list(objs)[: sizes[name]] for name, objs in event.objects.items()
            }
            rebuilt = rmm_matrix_reference(
                type(event)(objects, float(data["met_pt"][row]), float(data["met_phi"][row]))
            )
            np.testing.assert_allclose(data["rmm"][row], rebuilt, atol=1e-6)
        n_jets = np.sum(~np.isnan(data["jets_pt"]), axis=1)
        np.testing.assert_array_equal(n_jets, np.minimum([len(e) for e in chunk.jets], 10))


def test_compute_rmm_rejects_invalid_input(shared_data: Path, tmp_path):
    tool = get_tool("compute_rmm")
    path = str(shared_data / NANOAOD)
    with pytest.raises(ValidationError, match="npz"):
        tool.call({"inputs": [path], "output": str(tmp_path / "rmm.txt")})
    with pytest.raises(ValidationError, match="extra"):
        tool.call({"inputs": [path], "output": str(tmp_path / "r.npz"), "colour": "red"})
    with pytest.raises(ValidationError, match="max_events"):
        tool.call({"inputs": [path], "output": str(tmp_path / "r.npz"), "max_events": 0})
    with pytest.raises(InputFileError):
        tool.call({"inputs": [str(tmp_path / "missing.root")], "output": str(tmp_path / "r.npz")})
    assert not list(tmp_path.glob("*.npz"))


@pytest.fixture(scope="module")
def scored_table(tmp_path_factory):
    """A synthetic sample with a jm resonance at 1500 GeV, its event table and scores."""
    folder = tmp_path_factory.mktemp("sample")
    config = SampleConfig(
        n_events=4000, seed=3, signals=(SignalSpec("jm", 1500.0, 30.0, n_events=300),)
    )
    info = generate_sample(folder, config)
    table = folder / "events.parquet"
    write_event_table(iterate_events(info.files, step_size=1500), table)
    masses = read_event_table(table).masses
    # a score that is high for events with m_jm near the resonance: a known truth to recover
    m_jm = masses[:, 5]
    scores = np.where(np.abs(np.nan_to_num(m_jm) - 1500.0) < 150.0, 5.0, 0.0)
    add_score_column(table, scores, np.zeros(len(scores), dtype=bool))
    return table, scores


def test_spectra_tool_writes_63_histograms_and_a_summary(scored_table, tmp_path):
    table, _ = scored_table
    output = tmp_path / "spectra.npz"
    result = get_tool("spectra").call({"table": str(table), "output": str(output)})
    assert result["n_events"] == 4300
    assert result["n_selected"] == 4300
    assert result["n_bins"] == 178
    assert [s["name"] for s in result["spectra"]] == list(SPECTRUM_NAMES)
    with np.load(output) as data:
        assert data["counts"].shape == (63, 178)
        np.testing.assert_allclose(data["edges"], mass_bin_edges())
        assert list(data["names"]) == list(SPECTRUM_NAMES)
        entries = {s["name"]: s["entries"] for s in result["spectra"]}
        assert entries == dict(
            zip(SPECTRUM_NAMES, data["counts"].sum(axis=1).tolist(), strict=True)
        )
    assert entries["T2/jm"] > 100  # the resonance's muons make T2 events with m_jm


def test_spectra_tool_score_cut_keeps_the_injected_resonance(scored_table, tmp_path):
    table, scores = scored_table
    output = tmp_path / "cut.npz"
    result = get_tool("spectra").call(
        {"table": str(table), "score_min": 1.0, "output": str(output)}
    )
    assert result["n_selected"] == int((scores > 1.0).sum())
    with np.load(output) as data:
        jm = data["counts"][SPECTRUM_NAMES.index("T2/jm")]
        edges = data["edges"]
    centres = 0.5 * (edges[1:] + edges[:-1])
    assert jm.sum() > 50
    # every selected m_jm lies within 150 GeV of 1500 GeV (plus the bin width)
    occupied = centres[jm > 0]
    assert occupied.min() > 1300.0
    assert occupied.max() < 1700.0


def test_spectra_tool_errors(scored_table, tmp_path):
    tool = get_tool("spectra")
    table, _ = scored_table
    with pytest.raises(InputFileError, match="does not exist"):
        tool.call({"table": str(tmp_path / "none.parquet"), "output": str(tmp_path / "s.npz")})
    unscored = tmp_path / "unscored.parquet"
    write_event_table([], unscored)
    with pytest.raises(InvalidInputError, match="no score column"):
        tool.call({"table": str(unscored), "score_min": 0.0, "output": str(tmp_path / "s.npz")})
    with pytest.raises(ValidationError, match="npz"):
        tool.call({"table": str(table), "output": str(tmp_path / "s.json")})


def test_event_table_tool_writes_what_the_core_computes(shared_data: Path, tmp_path):
    path = str(shared_data / NANOAOD)
    output = tmp_path / "run" / "events.parquet"
    result = get_tool("event_table").call(
        {"inputs": [path], "output": str(output), "step_size": 64, "progress": True}
    )
    chunk = load_events(path)
    bits = stream_bits(chunk)
    assert result["n_events"] == 200
    assert result["n_chunks"] == 4  # 64 + 64 + 64 + 8 events
    assert result["streams"] == {s: int(bits[:, k].sum()) for k, s in enumerate(STREAMS)}
    table = read_event_table(output)
    np.testing.assert_array_equal(table.event, chunk.event)
    np.testing.assert_array_equal(table.masses, leading_pair_masses(chunk))
    with pytest.raises(ValidationError, match="parquet"):
        get_tool("event_table").call({"inputs": [path], "output": str(tmp_path / "t.csv")})


# --------------------------------------------------------------- one writer per output


ROOT = Path(__file__).resolve().parents[2]


def _tool_process(name: str, payload: dict) -> subprocess.Popen[str]:
    """`python -m agent.cli tool NAME --json PAYLOAD` as a separate process."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "tool", name, "--json", json.dumps(payload)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


def _holds(lock: Path, pid: int) -> bool:
    """Whether process `pid` holds `lock` (it writes its pid once its flock is taken)."""
    try:
        return lock.read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def test_two_processes_writing_one_npz_never_both_succeed(tmp_path):
    """The second writer fails at once (exit 2, one line); the file is the first's.

    The first writer is paused (SIGSTOP) once it holds the lock, so the second surely
    arrives while the first is computing, however fast the machine.
    """
    info = generate_sample(tmp_path / "sample", SampleConfig(n_events=10_000, seed=11))
    output = tmp_path / "out" / "rmm.npz"
    payload = {"inputs": [str(info.files[0])], "output": str(output)}
    first = _tool_process("compute_rmm", payload)
    lock = output.with_name("rmm.npz.lock")
    deadline = time.monotonic() + 120
    while not _holds(lock, first.pid) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert _holds(lock, first.pid), "the first writer never took the lock"
        second = _tool_process("compute_rmm", {**payload, "max_events": 5_000})
        second_out, second_err = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second_err
    assert second_out == ""
    lines = second_err.strip().splitlines()
    assert len(lines) == 1, second_err
    assert "Traceback" not in second_err
    assert f"{output} is being written by another process" in lines[0]
    reported = json.loads(first_out)["n_events"]
    with np.load(output) as written:
        assert len(written["event"]) == reported == 10_000
    assert not lock.exists()


@pytest.mark.parametrize(
    ("tool", "field", "name"),
    [
        ("compute_rmm", "output", "rmm.npz"),
        ("event_table", "output", "table.parquet"),
        ("spectra", "output", "spectra.npz"),
        ("generate_sample", "output_dir", "sample"),
        ("train_autoencoder", "output", "model.onnx"),
        ("score_events", "table", "table.parquet"),
    ],
)
def test_every_tool_that_writes_refuses_an_output_being_written(
    shared_data, tmp_path, tool, field, name
):
    """While another writer holds an output, each writing tool stops before computing."""
    from core.errors import OutputInUseError
    from core.files import exclusive_output

    nano = str(shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root")
    payloads = {
        "compute_rmm": {"inputs": [nano]},
        "event_table": {"inputs": [nano]},
        "spectra": {"table": str(tmp_path / "absent.parquet")},
        "generate_sample": {"n_events": 10},
        "train_autoencoder": {"inputs": [nano]},
        "score_events": {"inputs": [nano], "model": str(tmp_path / "m.onnx")},
    }
    target = tmp_path / name
    payload = {**payloads[tool], field: str(target)}
    with exclusive_output(target), pytest.raises(OutputInUseError, match="another process"):
        get_tool(tool).call(payload)
    assert not target.exists()
