"""One test per class of silent wrong result (issue 12): each once reported success on main.

1. event identity   2. stale event-pass parts   3. concurrent writers
4. duplicated or invalid inputs   5. training events in the search spectra
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli.main import main
from agent.runtime.eventpass import event_pass
from core.errors import InvalidInputError, ToolError
from core.events import load_events
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import read_event_table
from tools.registry import get_tool

SIGNAL = (SignalSpec("jm", 1500.0, 30.0, n_events=60),)


def _sample(folder: Path, n_events: int = 1500, seed: int = 1) -> list[str]:
    info = generate_sample(folder, SampleConfig(n_events=n_events, seed=seed, signals=SIGNAL))
    return [str(p) for p in info.files]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[str]]:
    """A sample, its event table scored by a model trained on 20 % of it."""
    folder = tmp_path_factory.mktemp("silent")
    files = _sample(folder / "a")
    table = folder / "events.parquet"
    get_tool("event_table").call({"inputs": files, "output": str(table)})
    model = folder / "ae.onnx"
    get_tool("train_autoencoder").call(
        {"inputs": files, "output": str(model), "fraction": 0.2, "max_epochs": 1, "seed": 3}
    )
    get_tool("score_events").call({"inputs": files, "model": str(model), "table": str(table)})
    return {"folder": folder, "files": files, "table": table, "model": model}


# 1. event identity ----------------------------------------------------------------------


def test_features_of_another_file_are_refused_not_scored(scored, tmp_path):
    """Same event numbers 1..N in both samples: main matched them and 'scored' every event."""
    other = _sample(tmp_path / "b", seed=2)
    features = tmp_path / "other.npz"
    get_tool("compute_rmm").call({"inputs": other, "output": str(features)})
    table = tmp_path / "events.parquet"
    table.write_bytes(Path(scored["table"]).read_bytes())
    assert set(read_event_table(table).event) == set(load_events(other).event)
    with pytest.raises(ToolError, match="no features"):
        get_tool("score_events").call(
            {"features": [str(features)], "model": str(scored["model"]), "table": str(table)}
        )


def test_event_numbers_repeated_across_runs_are_distinct_events():
    from core.objects import event_keys

    event = np.arange(1, 10_001)
    run_1 = event_keys(np.full(10_000, 1), np.ones(10_000), event)
    run_2 = event_keys(np.full(10_000, 2), np.ones(10_000), event)
    block_2 = event_keys(np.full(10_000, 1), np.full(10_000, 2), event)
    other_file = event_keys(np.full(10_000, 1), np.ones(10_000), event, source=7)
    everything = np.concatenate([run_1, run_2, block_2, other_file])
    assert len(np.unique(everything)) == 40_000
    # the training selection of one run says nothing about the other's (1 % each, ~100)
    from core.autoencoder import training_selection

    picked_1 = training_selection(run_1, 0.01, 0)
    picked_2 = training_selection(run_2, 0.01, 0)
    assert 50 < picked_1.sum() < 150
    assert (picked_1 & picked_2).sum() < 10  # independent: expected 1


# 2. stale parts ---------------------------------------------------------------------------


def test_a_pass_over_changed_inputs_recomputes_every_part(tmp_path):
    """main reused parts by path and entry_start: a regenerated sample kept the old events."""
    data = tmp_path / "data"
    _sample(data, n_events=3000, seed=1)
    first = event_pass(sorted(map(str, data.glob("*.root"))), tmp_path / "t", step_size=1000)
    _sample(data, n_events=2000, seed=2)  # same file name, other content
    files = sorted(map(str, data.glob("*.root")))
    again = event_pass(files, tmp_path / "t", step_size=1000)
    fresh = event_pass(files, tmp_path / "fresh", step_size=1000)
    assert first.n_events == 3060
    assert again.n_reused == 0
    assert again.n_events == fresh.n_events == 2060
    reread, expected = read_event_table(tmp_path / "t"), read_event_table(tmp_path / "fresh")
    np.testing.assert_array_equal(reread.key, expected.key)
    np.testing.assert_array_equal(reread.masses, expected.masses)


def test_a_rerun_with_fewer_tasks_reads_only_its_own_parts(tmp_path):
    """main read every part-*.parquet in the folder, also those of an earlier finer pass."""
    from core.table import table_parts

    files = _sample(tmp_path / "data", n_events=3000)
    event_pass(files, tmp_path / "t", step_size=500)
    coarse = event_pass(files, tmp_path / "t", step_size=1500)
    assert coarse.n_parts == len(table_parts(tmp_path / "t")) == 3
    assert len(read_event_table(tmp_path / "t")) == 3060
    assert len(list((tmp_path / "t").glob("part-*.parquet"))) == 3  # the others are removed


def test_an_unfinished_pass_is_not_read_as_a_table(tmp_path):
    files = _sample(tmp_path / "data", n_events=1000)
    event_pass(files, tmp_path / "t", step_size=500)
    (tmp_path / "t" / "table.json").unlink()
    with pytest.raises(Exception, match="did not finish"):
        read_event_table(tmp_path / "t")


# 3. concurrent writers ----------------------------------------------------------------------


def test_two_writers_of_one_output_never_mix(scored, tmp_path):
    """main used one fixed temporary name: one writer crashed, the other kept a torn file."""
    output = tmp_path / "rmm.npz"
    payloads = [
        {"inputs": scored["files"], "output": str(output), "max_events": n} for n in (700, 900)
    ]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "tool", "compute_rmm", "--json", json.dumps(p)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for p in payloads
    ]
    results = [process.communicate(timeout=120) for process in processes]
    codes = [p.returncode for p in processes]
    # one at a time: the second is refused while the first writes (or runs after it)
    assert sorted(codes) in ([0, 0], [0, 2]), [r[1] for r in results]
    written = [
        json.loads(out)["n_events"] for (out, _), c in zip(results, codes, strict=True) if c == 0
    ]
    for (_, error), code in zip(results, codes, strict=True):
        if code == 2:
            assert b"is being written" in error and len(error.strip().splitlines()) == 1
    with np.load(output) as data:
        n = len(data["key"])
        assert n in written  # the file is a whole output of a writer that succeeded
        assert data["rmm"].shape == (n, 36, 36)
        assert data["features"].shape[0] == n
    assert {p.name for p in tmp_path.iterdir()} <= {"rmm.npz", "rmm.npz.lock"}


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    from agent.runtime.runlock import run_folder_lock
    from core.errors import FolderInUseError

    files = _sample(tmp_path / "data", n_events=500)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom agent.runtime.runlock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1], 'scan'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n",
            str(tmp_path / "t"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        holder.stdout.close()
        with pytest.raises(FolderInUseError, match=f"in use by PID {holder.pid}"):
            event_pass(files, tmp_path / "t")
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(tmp_path / "t"):  # released with its holder
        pass


# 4. duplicated or invalid inputs ---------------------------------------------------------------


def test_a_file_listed_twice_is_refused(scored, tmp_path, capsys):
    file = scored["files"][0]
    copy = tmp_path / "copy.root"
    copy.write_bytes(Path(file).read_bytes())
    for inputs in ([file, file], [file, str(copy)]):
        assert main(["tool", "read_events", "--json", json.dumps({"inputs": inputs})]) == 2
        assert "count twice" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="count twice"):
        event_pass([file, str(copy)], tmp_path / "t")


@pytest.mark.parametrize(
    "arguments",
    [
        ["--lumi", "nan"],
        ["--lumi", "inf"],
        ["--lumi", "-1"],
        ["--signal", "jm:1500:inf:10"],
        ["--signal", "jm:nan:10:10"],
        ["--signal", "jm:1500:10:1e300pb"],
        ["--seed", "-1"],
        ["-n", "10000000000"],
    ],
)
def test_invalid_generator_numbers_exit_2_and_write_nothing(tmp_path, capsys, arguments):
    output = tmp_path / "out"
    status = main(["generate", "-o", str(output), "-n", "100", *arguments])
    assert status == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not output.exists()


@pytest.mark.parametrize(
    ("tool", "payload"),
    [
        ("generate_sample", {"output_dir": "x", "lumi_pb": True}),
        ("generate_sample", {"output_dir": "x", "sqrt_s": "Infinity"}),
        ("read_events", {"inputs": ["a.root"], "selection": {"jet_pt_min": "NaN"}}),
        ("anomaly_region", {"table": "t.parquet", "xsec_pb": 1.0, "lumi_pb": "nan"}),
        ("spectra", {"table": "t.parquet", "output": "s.npz", "score_min": "-Infinity"}),
    ],
)
def test_non_finite_or_boolean_numbers_are_refused(tmp_path, capsys, monkeypatch, tool, payload):
    monkeypatch.chdir(tmp_path)
    assert main(["tool", tool, "--json", json.dumps(payload)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "finite number" in error or "expected a number, got a boolean" in error
    assert not (tmp_path / "x").exists()


def test_generate_into_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["generate", "-o", str(target), "-n", "10"]) == 2
    assert target.read_text() == "keep me"


# 5. training events in the search ----------------------------------------------------------------


def test_spectra_at_the_region_cut_select_the_region(scored, tmp_path):
    """main's spectra kept the autoencoder's training events that anomaly_region leaves out."""
    table, lumi = str(scored["table"]), 1000.0
    region = get_tool("anomaly_region").call(
        {"table": table, "xsec_pb": 0.05, "lumi_pb": lumi, "model": str(scored["model"])}
    )
    assert region["n_training_excluded"] > 0
    spectra = get_tool("spectra").call(
        {"table": table, "output": str(tmp_path / "s.npz"), "score_min": region["cut"]}
    )
    assert spectra["n_selected"] == region["n_pass"] - region["n_pass_at_cut"]
    everything = get_tool("spectra").call(
        {
            "table": table,
            "output": str(tmp_path / "all.npz"),
            "score_min": region["cut"],
            "include_training": True,
        }
    )
    assert everything["n_selected"] > spectra["n_selected"]
