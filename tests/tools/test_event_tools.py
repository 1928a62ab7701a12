"""Tools `read_events` and `generate_sample` through the registry, and the registry itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import InvalidInputError, ToolError
from tests.nanofiles import nanoaod_with_nan_muons
from tools.registry import all_tools, get_tool


def test_read_events_summarises_nanoaod(shared_data):
    out = get_tool("read_events").call(
        {"inputs": [str(shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root")]}
    )
    assert out["n_events"] == 200
    assert out["files"][0]["schema"] == "nanoaod"
    assert out["files"][0]["btag_branch"] == "Jet_btagCSVV2"
    assert out["objects"]["bjets"] > 0
    assert out["selection"]["jet_pt_min"] == 30.0
    assert out["events_with"]["electrons"] <= out["objects"]["electrons"]
    assert set(out["streams"]) == {"T1", "T2", "T3", "T4", "T5", "T6", "T7"}
    assert out["streams"]["T2"] > 0  # ttbar: single-lepton events above 60 GeV


def test_read_events_selection_override_changes_counts(shared_data):
    path = str(shared_data / "uproot-HZZ.root")
    loose = get_tool("read_events").call({"inputs": [path]})
    tight = get_tool("read_events").call({"inputs": [path], "selection": {"muon_pt_min": 60.0}})
    assert tight["objects"]["muons"] < loose["objects"]["muons"]
    assert tight["selection"]["muon_pt_min"] == 60.0


def test_generate_sample_tool(tmp_path):
    out = get_tool("generate_sample").call(
        {
            "output_dir": str(tmp_path),
            "n_events": 2000,
            "seed": 3,
            "signals": [{"pair": "bb", "mass": 900.0, "width": 20.0, "xsec_pb": 0.1}],
            "lumi_pb": 1000.0,
        }
    )
    assert out["n_signal"] == [100]
    assert len(out["files"]) == 1
    summary = get_tool("read_events").call({"inputs": out["files"]})
    assert summary["n_events"] == 2100


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("read_events", {"inputs": []}),
        ("read_events", {"inputs": ["a.root"], "unknown": 1}),
        ("read_events", {"inputs": ["a.root"], "schema": "cms"}),
        (
            "generate_sample",
            {"output_dir": "x", "signals": [{"pair": "zz", "mass": 1, "width": 1}]},
        ),
        ("generate_sample", {"output_dir": "x", "n_events": -3}),
    ],
)
def test_invalid_inputs_are_rejected(name, payload):
    with pytest.raises(ValidationError):
        get_tool(name).call(payload)


def test_registry_lists_and_rejects_unknown_names():
    names = [tool.name for tool in all_tools()]
    assert {"read_events", "generate_sample"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(ToolError, match="no tool called 'nope'"):
        get_tool("nope")


def _read_events_cli(path: Path) -> subprocess.CompletedProcess[str]:
    """`anomscan tool read_events` on one file, in a fresh process (60 s at most)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "tool",
            "read_events",
            "--json",
            json.dumps({"inputs": [str(path)]}),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_non_finite_muon_pt_is_reported_by_both_tools_and_the_cli(shared_data, tmp_path):
    """A third of Muon_pt set to NaN: counted per branch, never dropped silently."""
    path, n_nan = nanoaod_with_nan_muons(
        shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root", tmp_path / "nan.root"
    )
    summary = get_tool("read_events").call({"inputs": [str(path)]})
    assert summary["non_finite"] == {"Muon_pt": n_nan}
    assert summary["dropped_non_finite"] == {"muons": n_nan}
    assert len(summary["notes"]) == 1
    assert f"{n_nan} in Muon_pt" in summary["notes"][0]
    assert "an object with a non-finite pt" in summary["notes"][0]
    rmm = get_tool("compute_rmm").call({"inputs": [str(path)], "output": str(tmp_path / "r.npz")})
    assert rmm["non_finite"] == {"Muon_pt": n_nan}
    assert rmm["dropped_non_finite"] == {"muons": n_nan}
    assert rmm["n_events"] == 200
    table = get_tool("event_table").call(
        {"inputs": [str(path)], "output": str(tmp_path / "t.parquet"), "step_size": 70}
    )
    assert table["non_finite"] == {"Muon_pt": n_nan}
    assert table["dropped_non_finite"] == {"muons": n_nan}
    assert table["n_events"] == 200
    result = _read_events_cli(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"anomscan: note: non-finite values read ({n_nan} in Muon_pt); dropped {n_nan} muons "
        "(see 'notes' in the output)"
    )
    assert json.loads(result.stdout)["non_finite"] == {"Muon_pt": n_nan}


@pytest.mark.timeout(120)
def test_a_fifo_given_as_input_is_refused_at_once_not_read(tmp_path):
    """`read_events` on a FIFO hung forever; every tool input path is checked before opening."""
    fifo = tmp_path / "events.root"
    os.mkfifo(fifo)
    result = _read_events_cli(fifo)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"anomscan: input file {fifo} is a FIFO (named pipe), not a regular file; give a file "
        "on disk"
    )
    npz = tmp_path / "h.npz"
    os.mkfifo(npz)
    with pytest.raises(InvalidInputError, match=r"histogram file .*h\.npz is a FIFO"):
        get_tool("fit_background").call({"histogram": {"path": str(npz)}})
    with pytest.raises(ToolError, match=r"feature file .*h\.npz is a FIFO"):
        get_tool("train_autoencoder").call(
            {"features": [str(npz)], "output": str(tmp_path / "m.onnx")}
        )
    with pytest.raises(InvalidInputError, match="is a folder, not a file"):
        get_tool("fit_background").call({"histogram": {"path": str(tmp_path)}})


def test_an_output_the_tool_built_wrong_is_a_bug_not_the_users_fault():
    """A tool whose output model refuses what it built raises ToolOutputError (exit 1, log)."""
    from tools import registry
    from tools.common import StrictModel

    class Empty(StrictModel):
        pass

    class Finite(StrictModel):
        value: float

    def broken(arguments: Empty) -> Finite:
        return Finite(value=float("inf"))

    tool = registry.Tool("test_broken_output", "builds an infinite output", Empty, Finite, broken)
    with pytest.raises(registry.ToolOutputError, match=r"'test_broken_output' built an out"):
        tool.call({})
    assert not issubclass(registry.ToolOutputError, ValidationError)
