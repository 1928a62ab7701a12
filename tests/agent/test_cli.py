"""The command line: generate, tool list / run / schema, exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.cli import main


def test_generate_writes_files_and_truth(tmp_path, capsys):
    status = main(
        [
            "generate",
            "-o",
            str(tmp_path),
            "-n",
            "3000",
            "--seed",
            "4",
            "--signal",
            "jm:1500:30:200",
            "--signal",
            "jg:800:10:0.1pb",
        ]
    )
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_signal"] == [200, 100]
    assert (tmp_path / "truth.json").is_file()


def test_bad_signal_spec_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "-o", str(tmp_path), "--signal", "zz:100:1:5"])
    assert stop.value.code == 2
    assert "PAIR:MASS:WIDTH:N" in capsys.readouterr().err


def test_generator_error_is_one_line_and_status_2(tmp_path, capsys):
    status = main(["generate", "-o", str(tmp_path), "--signal", "jm:20000:10:5"])
    assert status == 2
    assert "sqrt(s)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.root"))


def test_tool_list_and_schema(capsys):
    assert main(["tool", "list"]) == 0
    listing = capsys.readouterr().out
    assert "read_events" in listing and "generate_sample" in listing
    assert main(["tool", "read_events", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "inputs" in schema["input"]["properties"]


def test_tool_runs_from_json_and_file(shared_data, tmp_path, capsys):
    payload = {"inputs": [str(shared_data / "uproot-HZZ.root")], "max_events": 100}
    assert main(["tool", "read_events", "--json", json.dumps(payload)]) == 0
    assert json.loads(capsys.readouterr().out)["n_events"] == 100
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload))
    assert main(["tool", "read_events", "--input", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["n_events"] == 100


@pytest.mark.parametrize(
    "text", ['{"inputs": []}', "not json", "[1, 2]", '{"inputs": ["a"], "x": 1}']
)
def test_invalid_tool_input_exits_2(text, capsys):
    assert main(["tool", "read_events", "--json", text]) == 2
    assert capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    payload = json.dumps({"inputs": [str(tmp_path / "missing.root")]})
    assert main(["tool", "read_events", "--json", payload]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tool", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "generate_sample" in result.stdout


def test_datasets_validate(shared_data, tmp_path, capsys):
    manifest = tmp_path / "m.toml"
    nano = shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
    manifest.write_text(f'[datasets.cms]\nfiles = ["{nano}"]\nlumi_pb = 2.5\nschema = "nanoaod"\n')
    assert main(["datasets", "validate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "nanoaod" in out
    assert "200" in out
    manifest.write_text(f'[datasets.cms]\nfiles = ["{nano}"]\nlumi_pb = 0\n')
    assert main(["datasets", "validate", str(manifest)]) == 2
    assert "lumi_pb must be > 0" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_is_quiet():
    """`anomscan tool list | head -1`: the closed pipe ends the command without a traceback."""
    command = f"{sys.executable} -m agent.cli tool NAME --schema | head -c 10"
    result = subprocess.run(
        ["bash", "-c", command.replace("NAME", "choose_background")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert len(result.stdout) == 10
    assert "Traceback" not in result.stderr
    assert "BrokenPipe" not in result.stderr
