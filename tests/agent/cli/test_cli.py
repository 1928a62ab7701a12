"""The command line: generate, tool list / run / schema, exit statuses."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.common import canonical_spectrum
from agent.cli.main import build_parser, main
from agent.cli.parser import COMMANDS


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


# --------------------------------------------------------------- help, options, error lines


def _one_line_exit_2(status: int, err: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback, no class name)."""
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not re.match(r"anomscan( \w+)?: \w+Error:", lines[0]), lines[0]
    return lines[0]


def _help_commands() -> list[list[str]]:
    parser = build_parser()
    names = next(
        action.choices
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    commands = [[name, "--help"] for name in names]
    return [
        ["--help"],
        *commands,
        ["audit", "verify", "--help"],
        ["audit", "export", "--help"],
        ["tool", "fit_background", "--help"],
    ]


def test_top_level_help_runs_in_a_real_process():
    """Issue 26: `anomscan --help` printed a ValueError traceback ('%' in a help text)."""
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "95 % CL" in result.stdout
    assert "limits" in result.stdout


def test_top_level_help_loads_no_command_group():
    """`anomscan --help` names every command without importing the scan stack (~2 s)."""
    probe = (
        "import contextlib, io, sys\n"
        "from agent.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('langgraph', 'scipy', 'torch')\n"
        "         or m.startswith(('agent.scan', 'agent.review', 'agent.cli.scan'))]\n"
        "print(len(out.getvalue()), heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    length, heavy = result.stdout.split(" ", 1)
    assert int(length) > 500
    assert heavy.strip() == "[]"


def test_a_named_command_has_the_full_parser_of_its_group():
    """The lazily assembled parser of one command is the one the full parser holds."""

    def sub_help(parser: argparse.ArgumentParser, name: str) -> str:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return str(action.choices[name].format_help())
        raise AssertionError(name)

    full = build_parser()
    for name in COMMANDS:
        assert sub_help(build_parser(name), name) == sub_help(full, name), name
    assert build_parser("scan").format_help() == full.format_help()


@pytest.mark.parametrize("words", _help_commands(), ids=" ".join)
def test_every_help_exits_0_without_a_traceback(words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(words)
    captured = capsys.readouterr()
    assert stop.value.code == 0, captured.err
    assert "Traceback" not in captured.err
    assert captured.out.startswith("usage: anomscan")


def test_unknown_option_names_the_closest_one_of_its_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["scan", "--point-per-decade", "4"])
    line = _one_line_exit_2(int(stop.value.code), capsys.readouterr().err)
    assert "unknown option --point-per-decade" in line
    assert "did you mean --points-per-decade?" in line
    assert "anomscan scan --help" in line


def test_unknown_option_of_another_subcommand_is_matched_there(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["audit", "run", "--spectra", "T2/jm"])
    line = _one_line_exit_2(int(stop.value.code), capsys.readouterr().err)
    assert "did you mean --spectrum?" in line


@pytest.mark.parametrize(
    ("words", "suggestion"),
    [(["scna"], "'scan'"), (["scan", "--executor", "rey"], "'ray'")],
)
def test_a_mistyped_choice_names_the_closest_one(words, suggestion, capsys):
    with pytest.raises(SystemExit) as stop:
        main(words)
    line = _one_line_exit_2(int(stop.value.code), capsys.readouterr().err)
    assert "invalid choice" in line and f"did you mean {suggestion}?" in line


def test_unknown_option_without_a_close_one_is_still_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["report", "run", "--zzzzzz"])
    line = _one_line_exit_2(int(stop.value.code), capsys.readouterr().err)
    assert "unknown option --zzzzzz" in line
    assert "did you mean" not in line


def test_errors_read_as_sentences_not_class_names(tmp_path, capsys):
    payload = json.dumps({"inputs": [str(tmp_path / "missing.root")]})
    line = _one_line_exit_2(
        main(["tool", "read_events", "--json", payload]), capsys.readouterr().err
    )
    assert line.startswith(f"anomscan: input file {tmp_path / 'missing.root'} does not exist")
    assert "InputFileError" not in line


# --------------------------------------------------------------- anticipated bad inputs


def test_negative_seed_of_fit_background_is_invalid_input(capsys):
    payload = {
        "histogram": {"edges": [1, 2, 3, 4, 5, 6, 7, 8], "counts": [50, 40, 30, 20, 10, 5, 3]},
        "function": "p2",
        "seed": -1,
    }
    line = _one_line_exit_2(
        main(["tool", "fit_background", "--json", json.dumps(payload)]), capsys.readouterr().err
    )
    assert "seed" in line and "greater than or equal to 0" in line and "(got -1)" in line


def test_a_default_is_never_blamed_on_the_user(shared_data, capsys):
    """A file without a b-tagger reads with exit 0; no '(got inf)' for an option never given."""
    payload = json.dumps({"inputs": [str(shared_data / "uproot-Zmumu.root")]})
    assert main(["tool", "read_events", "--json", payload]) == 0
    captured = capsys.readouterr()
    assert "inf" not in captured.err
    summary = json.loads(captured.out)["files"][0]
    assert summary["btag_branch"] is None
    assert summary["btag_working_point"] is None


def _audit_log(run: Path, rows: int = 400) -> Path:
    from agent.runtime.audit import AuditLog

    run.mkdir(parents=True, exist_ok=True)
    log = AuditLog(run / "audit.sqlite")
    with log.transaction():
        for i in range(rows):
            log.add(
                "decisions",
                f"0001-step:background:{i}",
                step_id="0001-step",
                kind="background",
                spectrum="T1/jj",
                point_pb=1,
                chosen="p4",
                options=[{"function": "p4"}],
                rationale="x" * 200,
            )
    log.close()
    return run / "audit.sqlite"


@pytest.fixture
def truncated_run(tmp_path: Path) -> Path:
    """A run folder whose audit log lost its last two thirds."""
    path = _audit_log(tmp_path / "truncated")
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 3)
    return path.parent


@pytest.fixture
def garbage_run(tmp_path: Path) -> Path:
    """A run folder whose audit.sqlite is not a database at all."""
    run = tmp_path / "garbage"
    run.mkdir()
    (run / "audit.sqlite").write_bytes(bytes(range(256)) * 16)
    return run


@pytest.mark.tampers_audit
@pytest.mark.parametrize("run_fixture", ["truncated_run", "garbage_run"])
@pytest.mark.parametrize("action", [[], ["export"]], ids=["table", "export"])
def test_unreadable_audit_log_exits_2_naming_it(run_fixture, action, request, capsys):
    run = request.getfixturevalue(run_fixture)
    line = _one_line_exit_2(main(["audit", *action, str(run)]), capsys.readouterr().err)
    assert str(run / "audit.sqlite") in line
    assert "corrupt, truncated" in line
    assert not (run / "audit.jsonl").exists()


def test_why_point_that_is_not_a_number_exits_2(tmp_path, capsys):
    _audit_log(tmp_path / "run", rows=1)
    line = _one_line_exit_2(
        main(["audit", str(tmp_path / "run"), "--why", "T2/jm", "abc"]), capsys.readouterr().err
    )
    assert "'abc'" in line and "cross-section in pb" in line and "#INDEX" in line


def test_spectrum_names_are_case_insensitive(tmp_path, capsys):
    assert canonical_spectrum("t2/JM") == "T2/jm"
    assert canonical_spectrum(" T3/Jm ") == "T3/jm"
    assert canonical_spectrum("T9/xx") == "T9/xx"
    run = tmp_path / "run"
    _audit_log(run, rows=1)
    line = _one_line_exit_2(
        main(["audit", str(run), "--why", "t3/JM", "0.3"]), capsys.readouterr().err
    )
    assert "expected STREAM/PAIR" not in line  # the name was understood; no results.json
    assert "results.json" in line
    assert main(["audit", str(run), "--spectrum", "t1/JJ"]) == 0
    assert "T1/jj" in capsys.readouterr().out


@pytest.mark.parametrize(
    "target",
    [
        "/proc/anomscan-export.jsonl",
        "/sys/anomscan-export.jsonl",
        "DIRECTORY",
        "MISSING/audit.jsonl",
        "LONG/audit.jsonl",
        "a" * 300 + ".jsonl",
    ],
    ids=["proc", "sys", "a folder", "missing folder", "300-char folder", "300-char name"],
)
def test_audit_export_to_a_place_that_can_not_be_written_exits_2(tmp_path, target, capsys):
    run = tmp_path / "run"
    _audit_log(run, rows=3)
    target = (
        target.replace("DIRECTORY", str(tmp_path))
        .replace("MISSING", str(tmp_path / "no" / "such"))
        .replace("LONG", str(tmp_path / ("b" * 300)))
    )
    if not target.startswith("/"):
        target = str(tmp_path / target)
    line = _one_line_exit_2(
        main(["audit", "export", str(run), "-o", target]), capsys.readouterr().err
    )
    assert "cannot" in line
    assert target[:40] in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_audit_export_into_a_read_only_folder_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    _audit_log(run, rows=3)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _one_line_exit_2(
            main(["audit", "export", str(run), "-o", str(locked / "a.jsonl")]),
            capsys.readouterr().err,
        )
    finally:
        locked.chmod(0o700)
    assert str(locked) in line and "not writable" in line


def test_audit_export_still_writes_where_it_can(tmp_path, capsys):
    run = tmp_path / "run"
    _audit_log(run, rows=3)
    assert main(["audit", "export", str(run), "-o", str(tmp_path / "out.jsonl")]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert "3 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    "words",
    [
        ["audit", "LONG"],
        ["audit", "export", "LONG"],
        ["report", "LONG"],
        ["limits", "LONG"],
        ["tool", "read_events", "--input", "LONG/in.json"],
        ["generate", "-o", "LONG/sample", "-n", "10"],
    ],
    ids=" ".join,
)
def test_a_300_character_path_component_exits_2(tmp_path, words, capsys):
    long = str(tmp_path / ("c" * 300))
    status = main([word.replace("LONG", long) for word in words])
    line = _one_line_exit_2(status, capsys.readouterr().err)
    assert "longer than the file system allows" in line
