"""`anomscan limits RUN` and `anomscan scan --limits` through the real command line."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import pytest

from tests.agent.conftest import LUMI_PB, Sample, run_cli, scan_arguments

ONE_POINT = ("--xsec-range", "1", "10", "--points-per-decade", "1", "--max-points", "1")


@pytest.fixture(scope="module")
def limits_run(signal_sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-point scan of the X(1500) -> j mu sample that sets limits as its last node."""
    out = tmp_path_factory.mktemp("limits-run") / "run"
    done = run_cli(
        *scan_arguments(signal_sample, out, *ONE_POINT, "--executor", "serial", "--limits")
    )
    assert done.returncode == 0, done.stderr
    return out


def _in_process(capsys: pytest.CaptureFixture[str], *arguments: str) -> object:
    """`anomscan ARGUMENTS` in this process: its exit status and captured output."""
    from types import SimpleNamespace

    from agent.cli.main import main

    status = main(list(arguments))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=captured.out, stderr=captured.err)


def _one_line_exit_2(done: object, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)  # type: ignore[attr-defined]
    lines = done.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, done.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in done.stderr  # type: ignore[attr-defined]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_scan_with_limits_writes_audited_replayable_limits(limits_run: Path) -> None:
    """The last node writes limits.json/csv and a plot; the log verifies and replays; the
    injected X(1500) raises the observed limit above the expected +2 sigma there, and the
    limits far above the data approach the zero-background 3 events / L."""
    document = json.loads((limits_run / "limits.json").read_text())
    assert document["method"] == "auto" and document["test_statistic"] == "qtilde"
    assert document["widths"] == [0.0, 0.05, 0.10, 0.15]
    lumi = document["search_luminosity_pb"]
    assert 0.98 * LUMI_PB < lumi < LUMI_PB  # (1 - f) L with f ~ 1 % of training events
    curves = document["curves"]
    assert curves and document["n_limits"] == sum(len(c["masses_gev"]) for c in curves)
    accepted = {
        e["spectrum"] for e in json.loads((limits_run / "results.json").read_text())["excesses"]
    }
    assert {c["spectrum"] for c in curves} == accepted
    with (limits_run / "limits.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == document["n_limits"]
    first = curves[0]
    assert float(rows[0]["observed_pb"]) == first["observed_pb"][0]
    assert float(rows[0]["expected_m2_pb"]) == first["expected_pb"]["-2"][0]
    for curve in curves:
        for k, observed in enumerate(curve["observed_pb"]):
            assert math.isclose(observed * lumi, curve["observed_events"][k], rel_tol=1e-9)
            bands = [curve["expected_pb"][key][k] for key in ("-2", "-1", "0", "+1", "+2")]
            assert bands == sorted(bands)
        # below 5 background events the limit is the exact CLs of the window count
        assert curve["counting"] == [b < 5.0 for b in curve["window_background"]]
        # the highest mass of a narrow signal sees (almost) no background: the median count
        # is 0 there, and no event excludes S f = -ln 0.05 = 3.00 events (f: signal in window)
        if curve["width"] == 0.0 and curve["window_background"][-1] < 0.05:
            in_window = curve["expected_events"]["0"][-1] * curve["signal_in_window"][-1]
            assert abs(in_window + math.log(0.05)) < 1e-4, curve["window_background"][-1]
    jm = [c for c in curves if c["spectrum"].endswith("/jm") and c["width"] == 0.0]
    assert jm, "the injected X(1500) -> j mu spectra have accepted backgrounds"
    excess_seen = False
    for curve in jm:
        k = min(range(len(curve["masses_gev"])), key=lambda i: abs(curve["masses_gev"][i] - 1500))
        excess_seen |= curve["observed_pb"][k] > curve["expected_pb"]["+2"][k]
    assert excess_seen, jm
    assert list((limits_run / "plots").glob("limits-point-*.png"))
    with sqlite3.connect(limits_run / "audit.sqlite") as db:
        nodes = [row[0] for row in db.execute("select node from steps order by seq")]
        calls = db.execute("select replayable from tool_calls where tool = 'set_limits'").fetchall()
        kinds = [row[0] for row in db.execute("select kind from decisions")]
        paths = [row[0] for row in db.execute("select path from artifacts")]
    assert nodes[-2:] == ["summarise", "limits"]
    assert calls == [(1,)] and "limits" in kinds
    assert {"limits.json", "limits.csv", "limits/points-0008-limits.npz"} <= set(paths)
    verified = run_cli("audit", "verify", str(limits_run))
    assert verified.returncode == 0, verified.stdout
    replayed = run_cli("replay", str(limits_run), "--tool", "set_limits")
    assert replayed.returncode == 0, replayed.stdout
    assert "replayed 1 tool calls: 0 difference(s)" in replayed.stdout


@pytest.mark.slow
def test_limits_command_on_one_spectrum_appends_a_step_and_feeds_the_report(
    limits_run: Path,
) -> None:
    run = limits_run
    spectrum = json.loads((run / "limits.json").read_text())["curves"][0]["spectrum"]
    done = run_cli("limits", str(run), "--spectrum", spectrum, "--widths", "0,10")
    assert done.returncode == 0, done.stderr
    document = json.loads((run / "limits.json").read_text())
    assert {c["spectrum"] for c in document["curves"]} == {spectrum}
    assert {c["width"] for c in document["curves"]} == {0.0, 0.1}
    assert run_cli("audit", "verify", str(run)).returncode == 0
    replayed = run_cli("replay", str(run), "--tool", "set_limits")
    assert "replayed 2 tool calls: 0 difference(s)" in replayed.stdout, replayed.stdout
    with sqlite3.connect(run / "audit.sqlite") as db:
        steps = [row[0] for row in db.execute("select step_id from steps where node = 'limits'")]
    assert len(steps) == 2 and steps[-1].startswith("limits-")
    report = run_cli("report", str(run))
    assert report.returncode == 0, report.stderr
    page = (run / "report" / "index.html").read_text()
    assert 'id="limits"' in page and 'data-plot="limits-000"' in page
    counted = sum(sum(c["counting"]) for c in document["curves"])
    assert (f"{counted} of them, whose window expects less than 5" in page) == (counted > 0)
    if counted:
        assert "exact CL_s of the window count" in done.stdout, done.stdout
    contents = page.split('<p id="contents">', 1)[1].split("</p>", 1)[0]
    assert '<a href="#limits">limits</a>' in contents  # the contents line links the section


@pytest.mark.slow
def test_limits_refuses_bad_spectra_and_widths(
    limits_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = json.loads((limits_run / "results.json").read_text())
    without = next(s["spectrum"] for s in results["skipped"])
    accepted = {e["spectrum"] for e in results["excesses"]}
    assert without not in accepted
    cases = [
        (("--spectrum", "T9/jm"), "not a spectrum"),
        (("--spectrum", without), "no accepted background"),
        (("--widths", "0,abc"), "not a number"),
        (("--widths", "5,5"), "twice"),
        (("--widths", "60"), "outside 0..50"),
    ]
    for extra, words in cases:
        _one_line_exit_2(_in_process(capsys, "limits", str(limits_run), *extra), words)


def test_limits_refuses_a_folder_that_is_no_finished_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_exit_2(_in_process(capsys, "limits", str(tmp_path)), "not a scan's run folder")
    (tmp_path / "config.json").write_text(json.dumps({"run_dir": str(tmp_path)}))
    _one_line_exit_2(_in_process(capsys, "limits", str(tmp_path)), "no finished scan")


def test_limits_refuses_a_run_without_accepted_backgrounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished scan whose every spectrum failed its background checks has nothing to limit."""
    (tmp_path / "config.json").write_text(json.dumps({"run_dir": str(tmp_path)}))
    (tmp_path / "results.json").write_text(json.dumps({"luminosity_pb": 1000.0}))
    points = tmp_path / "points"
    points.mkdir()
    (points / "point-000.json").write_text(
        json.dumps(
            {
                "point_pb": 1.0,
                "arrays": "point-000.npz",
                "spectra": [{"spectrum": "T2/jm", "status": "no background", "reason": "x"}],
            }
        )
    )
    _one_line_exit_2(_in_process(capsys, "limits", str(tmp_path)), "no accepted background")
    assert not (tmp_path / "audit.sqlite").exists()


def test_the_scan_node_records_why_there_are_no_limits(tmp_path: Path) -> None:
    """`scan --limits` on a run without accepted backgrounds: a decision says so, no file."""
    from agent.runtime.audit import AuditLog
    from agent.runtime.executor import FanOut
    from agent.scan import ScanConfig, ScanContext
    from agent.scan.nodes import limits_node

    (tmp_path / "results.json").write_text(json.dumps({"luminosity_pb": 1000.0}))
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "point-000.json").write_text(
        json.dumps({"point_pb": 1.0, "arrays": "point-000.npz", "spectra": []})
    )
    audit = AuditLog(tmp_path / "audit.sqlite")
    with FanOut("serial") as fan_out:
        ctx = ScanContext(ScanConfig(run_dir=str(tmp_path), limits=True), audit, fan_out)
        update = limits_node(ctx, {"lumi_pb": 1000.0}, "0009-limits")  # type: ignore[typeddict-item]
    rows = [r for r in audit.rows("decisions") if r["kind"] == "limits"]
    audit.close()
    assert update["stage"].startswith("no limits")
    assert len(rows) == 1 and "no accepted background" in rows[0]["rationale"]
    assert not (tmp_path / "limits.json").exists()
