"""`anomscan scan` end to end: the injected resonance is the top excess, a background-only
scan stays below 3 sigma scan-wide, and bad input gives one line, exit 2, a consistent audit."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.synth import SampleConfig, SignalSpec, generate_sample
from tests.agent.conftest import (
    CHEAP,
    GAIN_SIGNAL,
    LUMI_PB,
    Sample,
    assert_no_excess_on_a_failed_background,
    run_cli,
    scan_arguments,
)

RANGE = ("--xsec-range", "0.1", "10", "--points-per-decade", "1", "--max-points", "4")


def _whole_stream_local_z(run_dir: Path, results: dict[str, Any], spectrum: str) -> float:
    """The scan's own local Z of `spectrum` at the AR points that hold its whole stream."""
    stream = spectrum.split("/", maxsplit=1)[0]
    with sqlite3.connect(run_dir / "audit.sqlite") as db:
        rows = db.execute("select point_pb, chosen from decisions where kind = 'anomaly_region'")
        whole = [p for p, chosen in rows if json.loads(chosen)["whole_stream"][stream]]
    values = [
        e["local_z"]
        for e in results["excesses"]
        if e["spectrum"] == spectrum and any(math.isclose(e["xsec_pb"], p) for p in whole)
    ]
    assert values, f"no whole-stream point of {stream} was fitted: {whole}"
    return max(values)


@pytest.fixture(scope="module")
def signal_run(gain_sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan of the X(500) -> jm sample, with its truth file out of the scan's reach."""
    out = tmp_path_factory.mktemp("signal-run") / "run"
    hidden = gain_sample.truth.with_suffix(".hidden")
    gain_sample.truth.rename(hidden)
    try:
        done = run_cli(*scan_arguments(gain_sample, out, *RANGE, "--executor", "serial"))
    finally:
        hidden.rename(gain_sample.truth)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout and "audit.sqlite" in done.stdout
    return out


@pytest.mark.slow
def test_scan_finds_the_injected_resonance_without_reading_the_truth(signal_run: Path) -> None:
    out = signal_run
    results = json.loads((out / "results.json").read_text())
    for key in (
        "run_id",
        "luminosity_pb",
        "points_pb",
        "scan_global_p",
        "scan_global_z",
        "scan_global_z_is_lower_limit",
        "excesses",
        "skipped",
    ):
        assert key in results
    assert results["luminosity_pb"] == 1000.0
    assert len(results["points_pb"]) >= 3
    local_z = [e["local_z"] for e in results["excesses"]]
    assert local_z == sorted(local_z, reverse=True)

    top = results["excesses"][0]
    assert top["spectrum"].endswith("/" + GAIN_SIGNAL.pair)
    low, high = top["window_gev"]
    assert abs((low + high) / 2 - GAIN_SIGNAL.mass) <= 1.5 * (high - low), top
    assert top["checks_passed"] is True
    assert top["scan_global_z"] is not None and top["scan_global_z"] > 3.0

    assert all({"spectrum", "point_pb", "reason"} <= set(s) for s in results["skipped"])
    assert any(s["reason"].startswith("too few events") for s in results["skipped"])
    with (out / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(results["excesses"])
    assert rows[0]["spectrum"] == top["spectrum"]

    with sqlite3.connect(out / "audit.sqlite") as db:
        kinds = {row[0] for row in db.execute("select kind from decisions")}
        tables = {
            row[0] for row in db.execute("select name from sqlite_master where type = 'table'")
        }
        n_llm = db.execute("select count(*) from llm_messages").fetchone()[0]
    assert {"ar_points", "background", "refine", "look_elsewhere", "skip"} <= kinds
    assert {
        "runs",
        "steps",
        "decisions",
        "tool_calls",
        "llm_messages",
        "fits",
        "bumps",
        "artifacts",
    } <= tables
    assert n_llm == 0
    assert run_cli("audit", "verify", str(out)).returncode == 0


@pytest.mark.slow
def test_no_excess_of_the_scan_stands_on_a_background_that_failed_its_checks(
    signal_run: Path,
) -> None:
    results = json.loads((signal_run / "results.json").read_text())
    assert_no_excess_on_a_failed_background(results)


@pytest.mark.slow
def test_local_z_at_the_best_ar_point_is_above_the_whole_stream(signal_run: Path) -> None:
    """The AE gain (PHYSICS.md 6): the injected excess is stronger in an anomaly region than
    in the whole stream, by at least 1 sigma of local Z.

    Measured (seed 3, 100k events): T3/jm 492-512 GeV, 23 events on 3.6 at 1 pb (local Z
    6.8) against 26 on 8.0 in the whole stream (5.0); T2/jm 5.4 against 2.7. With the
    scores negated (the AR keeps the most typical events) the top excess is the
    whole-stream T3/jm itself and this test fails.
    """
    results = json.loads((signal_run / "results.json").read_text())
    top = results["excesses"][0]
    whole = _whole_stream_local_z(signal_run, results, top["spectrum"])
    assert top["local_z"] > whole + 1.0, (top, whole)


@pytest.mark.slow
def test_the_scan_wide_test_uses_the_hunts_background_uncertainty(signal_run: Path) -> None:
    """Issue 23: the look-elsewhere input carries each point's minimum window count and its
    fit's Jacobian (one row per bin of the point) and covariance, as the hunt used them."""
    with np.load(signal_run / "lee" / "points.npz") as data:
        assert "min_window_count" in data.files
        assert np.all(data["min_window_count"] == 5)
        for index in range(data["spectrum"].size):
            jacobian = data[f"jacobian_{index}"]
            assert jacobian.shape[0] == data[f"counts_{index}"].size
            assert data[f"covariance_{index}"].shape == (jacobian.shape[1],) * 2


@pytest.mark.slow
def test_background_only_scan_stays_below_three_sigma(
    background_sample: Sample, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = run_cli(*scan_arguments(background_sample, out, *RANGE, "--executor", "serial"))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["scan_global_z"] is not None
    assert results["scan_global_z"] < 3.0, results["look_elsewhere"]
    # the pseudo-scans are refitted and the spectra joined by their bootstrap correlation
    lee = results["look_elsewhere"]
    assert "refitted to first order" in lee["method"], lee["method"]
    assert "Gaussian copula" in lee["global_p_method"], lee["global_p_method"]
    with np.load(out / "lee" / "points.npz") as points:
        for i in range(points["spectrum"].size):
            assert points[f"jacobian_{i}"].shape[0] == points[f"counts_{i}"].size
            assert points[f"replicas_{i}"].shape == (200, points[f"counts_{i}"].size)


def _one_line_exit_2(done: object) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)  # type: ignore[attr-defined]
    lines = done.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, done.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in done.stderr  # type: ignore[attr-defined]
    return lines[0]


def test_no_luminosity_is_refused_before_anything_is_written(
    signal_sample: Sample, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    line = _one_line_exit_2(run_cli("scan", *signal_sample.files, "--out", str(out)))
    assert "no luminosity" in line and "--lumi-pb" in line
    assert not out.exists()


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.root"
    line = _one_line_exit_2(
        run_cli("scan", str(missing), "--lumi-pb", "10", "--out", str(tmp_path / "run"))
    )
    assert str(missing) in line and "does not exist" in line
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = _one_line_exit_2(
        run_cli("scan", str(fifo), "--lumi-pb", "10", "--out", str(tmp_path / "f"), timeout=60)
    )
    assert str(fifo) in line and "FIFO" in line
    line = _one_line_exit_2(
        run_cli("scan", str(tmp_path / "*.root"), "--lumi-pb", "10", "--out", str(tmp_path / "r"))
    )
    assert "no file matches" in line


def test_unreadable_data_gives_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    """Refused before any work was done: nothing is left that would block the same --out."""
    garbage = tmp_path / "broken.root"
    garbage.write_bytes(b"this is not a ROOT file" * 100)
    out = tmp_path / "run"
    done = run_cli("scan", str(garbage), "--lumi-pb", "10", "--out", str(out), "--quiet")
    line = _one_line_exit_2(done)
    assert "broken.root" in line
    assert not out.exists()


@pytest.mark.slow
def test_an_autoencoder_that_fails_to_load_then_the_same_command(
    signal_sample: Sample, tmp_path: Path
) -> None:
    """A corrupt --model stops the scan in prepare with one line and leaves no folder behind
    (no work was done); once the file is put right, the same command runs the scan."""
    model = tmp_path / "model" / "autoencoder.onnx"
    model.parent.mkdir()
    for path in signal_sample.model.parent.iterdir():
        shutil.copy(path, model.parent / path.name)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    out = tmp_path / "run"
    arguments = scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial")
    arguments[arguments.index("--model") + 1] = str(model)
    line = _one_line_exit_2(run_cli(*arguments))
    assert "autoencoder" in line.lower() and str(model) in line
    assert not out.exists()

    shutil.copy(signal_sample.model, model)
    done = run_cli(*arguments)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["points_pb"]
    with sqlite3.connect(out / "audit.sqlite") as db:
        events = [row[0] for row in db.execute("select event from runs order by seq")]
    assert events == ["plan", "start", "finish"]
    assert run_cli("audit", "verify", str(out)).returncode == 0


def test_resume_of_a_folder_that_is_no_scan(tmp_path: Path) -> None:
    line = _one_line_exit_2(run_cli("scan", "--resume", str(tmp_path)))
    assert "not a scan's run folder" in line


@pytest.mark.parametrize(
    "option",
    [("--xsec-range", "nan", "10"), ("--xsec-range", "10", "1"), ("--lumi-pb", "inf")],
)
def test_a_non_finite_option_is_refused_and_leaves_no_folder(
    option: tuple[str, ...], signal_sample: Sample, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    arguments = ["scan", *signal_sample.files, "--lumi-pb", "1000", "--out", str(out), *option]
    line = _one_line_exit_2(run_cli(*arguments))
    assert option[0] in line
    assert not out.exists(), "a refused scan left a folder that blocks its --out"


def test_options_that_would_change_a_resumed_run_are_refused(tmp_path: Path) -> None:
    from agent.scan import ScanConfig, write_config

    out = tmp_path / "run"
    write_config(ScanConfig(run_dir=str(out), lumi_pb=1000.0))
    before = (out / "config.json").read_text()
    line = _one_line_exit_2(
        run_cli("scan", "--resume", str(out), "--lumi-pb", "5", "--llm-base-url", "http://x")
    )
    assert "--lumi-pb" in line and "--llm-base-url" in line and "keeps the config" in line
    assert (out / "config.json").read_text() == before


def test_existing_run_folder_is_not_overwritten(signal_sample: Sample, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    line = _one_line_exit_2(
        run_cli("scan", *signal_sample.files, "--lumi-pb", "1000", "--out", str(out))
    )
    assert "--resume" in line


def test_every_fit_failing_in_a_spectrum_is_recorded_as_skipped(tmp_path: Path) -> None:
    """A spectrum whose fits all fail: the decision says so and results list it as skipped."""
    from agent.runtime.audit import AuditLog
    from agent.runtime.executor import FanOut
    from agent.scan import ScanConfig, ScanContext
    from agent.scan.nodes import choose_backgrounds_node
    from core.masses import SPECTRUM_NAMES, mass_bin_edges

    edges = mass_bin_edges()
    counts = np.zeros((len(SPECTRUM_NAMES), len(edges) - 1))
    name = "T2/jj"
    counts[SPECTRUM_NAMES.index(name), 40] = 500.0  # every event in one bin: no smooth fit
    spectra = tmp_path / "spectra.npz"
    np.savez(spectra, edges=edges, counts=counts, names=np.array(SPECTRUM_NAMES))
    config = ScanConfig(run_dir=str(tmp_path))
    audit = AuditLog(tmp_path / "audit.sqlite")
    with FanOut("serial") as fan_out:
        ctx = ScanContext(config, audit, fan_out)
        skipped = {n: "too few events" for n in SPECTRUM_NAMES if n != name}
        state = {
            "current": {
                "index": 0,
                "point_pb": 1.0,
                "spectra_file": str(spectra),
                "skipped": skipped,
            },
            "fallbacks_used": 0,
        }
        with audit.transaction():
            update = choose_backgrounds_node(ctx, state, "0003-choose_backgrounds")  # type: ignore[arg-type]
    backgrounds = json.loads((tmp_path / update["current"]["backgrounds_file"]).read_text())
    entry = backgrounds["backgrounds"][name]
    assert entry["status"] in ("no background", "provisional")
    assert entry["reason"]
    rows = list(audit.db.query("select * from decisions where spectrum = ?", [name]))
    assert rows and rows[0]["chosen"] is None
    audit.close()


@pytest.mark.slow
def test_every_fit_failing_in_a_spectrum_through_the_cli(
    signal_sample: Sample, tmp_path: Path
) -> None:
    """T5/bm holds only 200 events of a zero-width X(2000) -> b mu (+ 2 photons; no
    background process has a muon and two photons with a b-jet): every event in one bin,
    so no smooth function describes it. The scan finishes, the spectrum is skipped at each
    point with every failed check named, it is never ranked, and the audit verifies."""
    info = generate_sample(
        tmp_path / "data",
        SampleConfig(
            n_events=30_000,
            seed=9,
            lumi_pb=LUMI_PB,
            signals=(SignalSpec("bm", 2000.0, 0.0, n_events=200, extra={"photons": 2}),),
        ),
    )
    out = tmp_path / "run"
    sample = Sample(tuple(str(p) for p in info.files), info.truth_path, signal_sample.model)
    done = run_cli(*scan_arguments(sample, out, *CHEAP, "--executor", "serial"))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    reasons = {s["point_pb"]: s["reason"] for s in results["skipped"] if s["spectrum"] == "T5/bm"}
    assert set(reasons) == set(results["points_pb"]), reasons
    for reason in reasons.values():
        assert reason.startswith(("no candidate passed", "fit failed")), reason
    assert all(e["spectrum"] != "T5/bm" for e in results["excesses"])
    with sqlite3.connect(out / "audit.sqlite") as db:
        chosen = db.execute(
            "select chosen from decisions where spectrum = 'T5/bm' and kind = 'background'"
        ).fetchall()
    assert len(chosen) == len(results["points_pb"]) and all(c[0] is None for c in chosen)
    assert run_cli("audit", "verify", str(out)).returncode == 0


def test_a_folder_or_its_manifest_gives_files_and_luminosity(tmp_path: Path) -> None:
    from agent.scan import ScanConfig, resolve_inputs

    folder = tmp_path / "data"
    generate_sample(folder, SampleConfig(n_events=2000, seed=2, lumi_pb=250.0))
    run = str(tmp_path / "run")
    by_folder = resolve_inputs(ScanConfig(run_dir=run, data=[str(folder)]))
    by_manifest = resolve_inputs(ScanConfig(run_dir=run, manifest=str(folder / "manifest.json")))
    assert by_folder is not None and by_manifest is not None
    assert by_folder.files == by_manifest.files == (str(folder / "synthetic_000.root"),)
    assert by_folder.lumi_pb == by_manifest.lumi_pb == 250.0
    given = resolve_inputs(ScanConfig(run_dir=run, data=[str(folder)], lumi_pb=10.0))
    assert given is not None and given.lumi_pb == 10.0  # the user's luminosity wins

    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_exit_2(run_cli("scan", str(empty), "--lumi-pb", "1", "--out", run))
    assert str(empty) in line and "no .root file" in line
