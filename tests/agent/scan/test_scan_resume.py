"""The real CLI: executors agree, a SIGKILLed scan resumes to the same results with every
decision logged once, a read-only audit stops a resume with one line, tampered audits are
caught row by row, and replay finds no difference."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.review import number_text
from agent.runtime.audit import TABLE_COLUMNS
from tests.agent.conftest import (
    CHEAP,
    LUMI_PB,
    ROOT,
    Sample,
    assert_same_rows,
    event_rows,
    results_of,
    run_cli,
    scan_arguments,
)
from tests.rangeserver import RangeServer
from tests.raycluster import NOBODY, RAY_ENV, unprivileged_worker_cluster, worker_pids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(signal_sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted serial scan with the cheap settings, given the sample's folder as
    `anomscan generate` wrote it (its luminosity from the folder's manifest)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    arguments = scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial")
    folder = str(Path(signal_sample.files[0]).parent)
    for file in signal_sample.files:
        arguments.remove(file)
    lumi = arguments.index("--lumi-pb")
    del arguments[lumi : lumi + 2]
    done = run_cli(arguments[0], folder, *arguments[1:])
    assert done.returncode == 0, done.stderr
    return out


def test_a_generated_folder_gives_its_files_and_luminosity(reference: Path) -> None:
    results = json.loads((reference / "results.json").read_text())
    assert results["luminosity_pb"] == LUMI_PB
    with sqlite3.connect(reference / "audit.sqlite") as db:
        chosen, rationale = db.execute(
            "select chosen, rationale from decisions where kind = 'event_pass'"
        ).fetchone()
    assert results["n_events"] == json.loads(chosen)["n_events"] > 0  # the real event count
    assert json.loads(chosen)["precision"] == "fp32" and "scored in fp32: an int8" in rationale
    assert results["input_notes"] == []  # the generator writes no NaN
    config = json.loads((reference / "config.json").read_text())
    assert config["lumi_pb"] is None and config["events"] is None  # nothing untrue recorded
    with sqlite3.connect(reference / "audit.sqlite") as db:
        inputs = db.execute("select inputs from runs where event = 'finish'").fetchone()[0]
    assert sorted(json.loads(inputs)) == sorted(
        str(p) for p in Path(config["data"][0]).glob("*.root")
    )


def _decision_keys(run_dir: Path) -> list[str]:
    with sqlite3.connect(run_dir / "audit.sqlite") as db:
        rows = db.execute("select key from decisions where kind != 'executor' order by seq")
        return [row[0] for row in rows]


@pytest.mark.parametrize(
    ("executor", "extra", "plans"),
    [
        # a time budget the scan never reaches: the same results under another plan
        (
            "process",
            ("--budget-minutes", "999"),
            "different plans:\n  budget_minutes: null -> 999\n",
        ),
    ],
)
def test_every_executor_gives_the_serial_results(
    executor: str,
    extra: tuple[str, ...],
    plans: str,
    reference: Path,
    signal_sample: Sample,
    tmp_path: Path,
) -> None:
    """The same results; and `audit plan` says the data are the same (the reference read
    them as a folder, this scan as files) and whether the plan is (the executor is not
    part of it)."""
    out = tmp_path / "run"
    done = run_cli(*scan_arguments(signal_sample, out, *CHEAP, "--executor", executor, *extra))
    assert done.returncode == 0, done.stderr
    assert results_of(out) == results_of(reference)
    compared = run_cli("audit", "plan", str(reference), str(out))
    assert compared.returncode == 0, compared.stderr
    assert f"{reference} and {out}: the same data, {plans}" in compared.stdout
    with sqlite3.connect(out / "audit.sqlite") as db:
        workers = {row[0] for row in db.execute("select worker from tool_calls")}
    assert len(workers) > 1, f"{executor} ran every tool call in one process: {workers}"


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a worker node as another user needs root")
def test_a_cluster_worker_that_cannot_see_the_run_folder_gives_the_serial_results(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """A 2-node Ray cluster whose only CPU is on a worker node running as `nobody`, who can
    neither read nor write the run folder, the model or the sample's folder: given local
    paths the scan stops with one line naming the file and the node; given the same files as
    URLs it completes with the serial results, and its batched tool calls ran as `nobody`."""
    local = scan_arguments(signal_sample, tmp_path / "local", *CHEAP, "--executor", "ray")
    folder = Path(signal_sample.files[0]).parent
    with unprivileged_worker_cluster() as cluster, RangeServer(folder) as server:
        ray_env = {**RAY_ENV, "RAY_ADDRESS": cluster.address}
        refused = run_cli(*local, env=ray_env)
        urls = [server.url(Path(file).name) for file in signal_sample.files]
        arguments = [
            *urls,
            *scan_arguments(signal_sample, tmp_path / "run", *CHEAP, "--executor", "ray")[1:],
        ]
        for file in signal_sample.files:
            arguments.remove(file)
        done = run_cli("scan", *arguments, env=ray_env)
        with sqlite3.connect(tmp_path / "run" / "audit.sqlite") as db:
            workers = {row[0] for row in db.execute("select worker from tool_calls")}
        owners = worker_pids(cluster)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "cannot be read on host" in line and "(Ray node" in line
    assert any(file in line for file in signal_sample.files), line
    assert done.returncode == 0, done.stderr
    clustered, serial = results_of(tmp_path / "run"), results_of(reference)
    # the parts record where their events were read (URLs here, paths there): same rows
    assert clustered.pop("table_sha256") != serial.pop("table_sha256")
    assert clustered == serial
    assert_same_rows(event_rows(tmp_path / "run" / "events"), event_rows(reference / "events"))
    # the batched calls ran in Ray workers, all as `nobody`; a lone call runs in the driver
    pids = {int(worker.rsplit(":", 1)[1]) for worker in workers}
    assert set(owners.values()) == {NOBODY}, owners
    assert pids & set(owners) and len(pids - set(owners)) <= 1, (workers, owners)


def _steps(run_dir: Path, node: str) -> int:
    path = run_dir / "audit.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            query = "select count(*) from steps where node = ?"
            return int(db.execute(query, (node,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _set_immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


def test_sigkill_during_the_fits_then_resume_matches_an_uninterrupted_scan(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    arguments = scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *arguments],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while _steps(out, "build_spectra") < 2:  # then the second point's fits start at once
        assert process.poll() is None, "the scan ended before its second AR point"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _steps(out, "choose_backgrounds") == 1, "the kill did not land during the fits"
    assert not (out / "results.json").exists()
    assert run_cli("audit", "verify", str(out)).returncode == 0

    # a resume that can not write the audit stops with one line and leaves it consistent
    _set_immutable(out / "audit.sqlite", True)
    try:
        refused = run_cli("scan", "--resume", str(out), "--quiet")
    finally:
        _set_immutable(out / "audit.sqlite", False)
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "audit log" in refused.stderr and "--resume" in refused.stderr

    # the killed run is moved before it is resumed: the resume acts on the folder given
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    _resume_completes_like(reference, moved)
    assert not out.exists(), "the resume wrote into the folder's old place"
    with sqlite3.connect(moved / "audit.sqlite") as db:
        events = [row[0] for row in db.execute("select event from runs order by seq")]
    assert events == ["plan", "start", "plan", "resume", "finish"], (
        "the refused resume left a runs row"
    )
    # the resume kept the plan and the data (the folder was moved: paths are not hashed)
    shown = run_cli("audit", "plan", str(moved))
    assert shown.returncode == 0 and "resume (audit seq" in shown.stdout, shown.stderr
    assert shown.stdout.rstrip().endswith("same plan and data"), shown.stdout


@pytest.mark.parametrize(
    ("stop", "executor", "status", "how"),
    [(signal.SIGINT, "serial", 130, "interrupted"), (signal.SIGTERM, "ray", 143, "terminated")],
)
def test_ctrl_c_or_sigterm_says_what_was_kept_and_the_resume_completes(
    stop: signal.Signals,
    executor: str,
    status: int,
    how: str,
    reference: Path,
    signal_sample: Sample,
    tmp_path: Path,
) -> None:
    """Ctrl-C (serial) or SIGTERM (with Ray's workers running) ends the scan with one line
    saying what was kept and how to go on; no Ray stack frames; the resume completes."""
    out = tmp_path / "run"
    process = _start_scan(scan_arguments(signal_sample, out, *CHEAP, "--executor", executor))
    deadline = time.monotonic() + 600
    while _steps(out, "build_spectra") < 1:  # inside the first AR point
        assert process.poll() is None, "the scan ended before its first AR point"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(stop)
    _, error = process.communicate(timeout=300)
    # a shell reports 128 + 2 = 130 both for exit(130) and for a death by SIGINT, which
    # CPython chooses when an interrupt reaches it again while it shuts down
    assert process.returncode in (status, -int(stop)), error
    assert error.strip().splitlines() == [
        f"anomscan scan: {how}; {out} keeps every completed step: continue with "
        f"`anomscan scan --resume {out}`"
    ]
    _resume_completes_like(reference, out)


def test_resume_during_the_running_scan_is_refused_and_the_chain_holds(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """One writer per run folder for its whole life: `scan --resume RUN` while the first scan
    of RUN runs exits 2 before it writes; the first scan finishes with an intact chain."""
    out = tmp_path / "run"
    process = _start_scan(scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial"))
    try:
        deadline = time.monotonic() + 600
        while not (out / "audit.sqlite").exists():  # the scan has written its first row
            assert process.poll() is None, "the scan ended before it wrote its audit log"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for command in (
            ("scan", "--resume", str(out), "--quiet"),
            ("audit", "annotate", str(out), "1", "--verdict", "agree", "--by", "me"),
        ):
            refused = run_cli(*command)
            assert refused.returncode == 2, refused.stderr
            assert "in use" in refused.stderr and str(process.pid) in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert process.poll() is None, "the first scan ended before the refusal was tested"
        _, error = process.communicate(timeout=900)
        assert process.returncode == 0, error
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert results_of(out) == results_of(reference)
    report = run_cli("audit", "verify", str(out))
    assert report.returncode == 0, report.stdout


def _tampered_copy(reference: Path, tmp_path: Path, statement: str) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir(parents=True)
    shutil.copy(reference / "audit.sqlite", copy / "audit.sqlite")
    shutil.copy(reference / "audit.head.json", copy / "audit.head.json")
    with sqlite3.connect(copy / "audit.sqlite") as db:
        db.execute(statement)
    return copy


def _middle_decision(reference: Path) -> tuple[int, str]:
    with sqlite3.connect(reference / "audit.sqlite") as db:
        rows = db.execute("select seq, key from decisions order by seq").fetchall()
    seq, key = rows[len(rows) // 2]
    return int(seq), str(key)


@pytest.mark.tampers_audit
def test_the_plan_is_the_first_row_of_the_chain_and_holds_the_procedure_and_data(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    with sqlite3.connect(reference / "audit.sqlite") as db:
        first = min(
            db.execute(f"select min(seq) from [{table}]").fetchone()[0] or math.inf
            for table in TABLE_COLUMNS
        )
        seq, plan, data = db.execute(
            "select seq, config, inputs from runs where event = 'plan'"
        ).fetchone()
        later = db.execute("select min(seq) from runs where event = 'start'").fetchone()[0]
    assert seq == first < later
    plan, data = json.loads(plan), json.loads(data)
    config = json.loads((reference / "config.json").read_text())
    procedure = ("run_dir", "data", "manifest", "executor")
    # the luminosity in effect, read from the generated folder's manifest (config: null)
    assert plan["settings"] == {k: v for k, v in config.items() if k not in procedure} | {
        "lumi_pb": LUMI_PB
    }
    hashes = sorted(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in signal_sample.files)
    assert sorted(f["sha256"] for f in data["files"]) == hashes
    shown = run_cli("audit", "plan", str(reference))
    assert shown.returncode == 0, shown.stderr
    assert plan["plan_sha256"] in shown.stdout and data["data_sha256"] in shown.stdout
    assert "resume" not in shown.stdout
    # the plan row is in the hash chain: edited, the log no longer verifies
    edited = _tampered_copy(
        reference,
        tmp_path / "plan",
        "update runs set config = replace(config, '\"seed\":5', '\"seed\":6') where event = 'plan'",
    )
    assert (
        json.loads(
            sqlite3.connect(edited / "audit.sqlite")
            .execute("select config from runs where event = 'plan'")
            .fetchone()[0]
        )["settings"]["seed"]
        == 6
    )
    report = run_cli("audit", "verify", str(edited))
    assert report.returncode == 1
    assert f"runs row seq {seq} (key 'run:plan:0'): its content does not match" in report.stdout
    old = run_cli("audit", "plan", str(tmp_path))
    assert old.returncode == 2 and "no audit log" in old.stderr


def _reference_arguments(signal_sample: Sample, out: Path, *extra: str) -> list[str]:
    """The reference scan's command line (the generated folder, its luminosity) + extra."""
    arguments = scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial", *extra)
    for file in signal_sample.files:
        arguments.remove(file)
    lumi = arguments.index("--lumi-pb")
    del arguments[lumi : lumi + 2]
    return [arguments[0], str(Path(signal_sample.files[0]).parent), *arguments[1:]]


def _shown_text(run_dir: Path) -> str:
    """Everything a blinded scan shows: results.json/csv and every file of its report."""
    files = [run_dir / "results.json", run_dir / "results.csv"]
    files += sorted(p for p in (run_dir / "report").rglob("*") if p.is_file())
    return "\n".join(p.read_text(errors="replace") for p in files)


def test_a_blinded_scan_shows_no_window_and_unblinds_to_the_same_results(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """Nothing a blinded scan shows holds a number of a search window known from the
    unblinded reference; `unblind` releases exactly the reference's results, on record."""
    out = tmp_path / "run"
    done = run_cli(*_reference_arguments(signal_sample, out, "--blind"))
    assert done.returncode == 0, done.stderr
    assert "blinded scan:" in done.stdout and "unblind" in done.stdout
    assert run_cli("report", str(out)).returncode == 0
    shown = done.stdout + _shown_text(out)
    known = json.loads((reference / "results.json").read_text())
    assert known["excesses"], "the reference scan must have excesses to hide"
    for excess in known["excesses"][:5]:
        for key in ("local_z", "local_p", "background", "global_z"):
            value = excess[key]
            for text in (repr(value), json.dumps(value), number_text(value), f"{value:.2f}"):
                # the number alone, not inside a longer one
                assert not re.search(rf"(?<![\d.]){re.escape(text)}(?![\d])", shown), (key, text)
    blinded = json.loads((out / "results.json").read_text())
    assert blinded["excesses"] == [] and blinded["scan_global_z"] is None
    assert len(blinded["backgrounds"]) == len(known["excesses"])
    assert "window_gev" not in json.dumps(blinded) and "local_z" not in json.dumps(blinded)
    assert (out / "results.csv").read_text().count("\n") == 1  # the header only
    for refused in (
        ("export", str(out), "--hepdata", str(tmp_path / "hepdata")),
        ("audit", str(out)),
    ):
        denied = run_cli(*refused)
        assert denied.returncode == 2 and "blinded scan" in denied.stderr, refused
    assert not (tmp_path / "hepdata").exists()
    compared = run_cli("audit", "plan", str(reference), str(out))
    assert "the same data, different plans:\n  blind: false -> true\n" in compared.stdout
    # the limits of a blinded run: the expected bands shown, the observed sealed
    spectrum = known["excesses"][0]["spectrum"]
    assert run_cli("limits", str(out), "--spectrum", spectrum).returncode == 0
    shown_limits = json.loads((out / "limits.json").read_text())
    limits_text = (out / "limits.json").read_text() + (out / "limits.csv").read_text()
    assert all(c["observed_pb"] is None for c in shown_limits["curves"])
    assert run_cli("report", str(out)).returncode == 0
    assert "sealed until unblinding" in (out / "report" / "index.html").read_text()

    released = run_cli("unblind", str(out), "--by", "reviewer B", "--note", "approved")
    assert released.returncode == 0, released.stderr
    assert results_of(out) == results_of(reference)
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()
    released = json.loads((out / "limits.json").read_text())
    observed = [x for c in released["curves"] for x in c["observed_pb"]]
    assert observed and all(x > 0 for x in observed)
    assert [c["expected_pb"] for c in released["curves"]] == [
        c["expected_pb"] for c in shown_limits["curves"]
    ]
    # an observed count at a band's quantile gives the band's limit: those may show
    bands = {x for c in released["curves"] for band in c["expected_pb"].values() for x in band}
    assert not [x for x in observed if x not in bands and repr(x) in limits_text]
    assert run_cli("report", str(out)).returncode == 0
    index = (out / "report" / "index.html").read_text()
    assert "unblinded by reviewer B" in index and "no change after unblinding" in index
    again = run_cli("unblind", str(out), "--by", "someone")
    assert again.returncode == 2 and "unblinded by reviewer B" in again.stderr
    verified = run_cli("audit", "verify", str(out))
    assert verified.returncode == 0, verified.stdout
    # a change after unblinding is listed with its rows
    assert (
        run_cli("limits", str(out), "--spectrum", known["excesses"][0]["spectrum"]).returncode == 0
    )
    assert run_cli("report", str(out)).returncode == 0
    index = (out / "report" / "index.html").read_text()
    assert "rows were added after unblinding" in index and "limits" in index


@pytest.mark.tampers_audit
def test_audit_verify_passes_on_the_scan_and_names_edited_deleted_inserted_rows(
    reference: Path, tmp_path: Path
) -> None:
    intact = run_cli("audit", "verify", str(reference))
    assert intact.returncode == 0, intact.stdout
    assert "hash chain intact" in intact.stdout
    seq, key = _middle_decision(reference)

    edited = _tampered_copy(
        reference, tmp_path / "edit", f"update decisions set chosen = '\"p6\"' where seq = {seq}"
    )
    report = run_cli("audit", "verify", str(edited))
    assert report.returncode == 1
    assert f"decisions row seq {seq} (key {key!r}): its content does not match its hash" in (
        report.stdout
    )

    deleted = _tampered_copy(
        reference, tmp_path / "delete", f"delete from decisions where seq = {seq}"
    )
    report = run_cli("audit", "verify", str(deleted))
    assert report.returncode == 1
    assert f"rows seq {seq}..{seq} are missing" in report.stdout

    with sqlite3.connect(reference / "audit.sqlite") as db:
        step_seq = db.execute("select seq from steps order by seq").fetchall()[2][0]
    inserted = _tampered_copy(
        reference,
        tmp_path / "insert",
        "insert into decisions (seq, key, kind, rationale, prev_hash, hash) "
        f"select {step_seq}, 'forged', 'background', 'forged', prev_hash, hash from steps "
        f"where seq = {step_seq}",
    )
    report = run_cli("audit", "verify", str(inserted))
    assert report.returncode == 1
    assert (
        f"decisions row seq {step_seq} (key 'forged'): seq {step_seq} appears twice and this "
        "row does not link: inserted"
    ) in report.stdout
    assert f"steps row seq {step_seq}" not in report.stdout


def test_audit_table_filters_and_export(reference: Path, tmp_path: Path) -> None:
    results = json.loads((reference / "results.json").read_text())
    top = results["excesses"][0]
    table = run_cli(
        "audit", str(reference), "--spectrum", top["spectrum"], "--point", str(top["xsec_pb"])
    )
    assert table.returncode == 0, table.stderr
    assert top["spectrum"] in table.stdout
    assert "background" in table.stdout
    other = next(s for s in ("T1/jj", "T7/bb") if s != top["spectrum"])
    assert other not in table.stdout

    # the whole log: a summary per decision kind first, the skip rows hidden unless --all
    with sqlite3.connect(reference / "audit.sqlite") as db:
        kinds = dict(db.execute("select kind, count(*) from decisions group by kind").fetchall())
    overview = run_cli("audit", str(reference))
    assert overview.returncode == 0, overview.stderr
    lines = overview.stdout.splitlines()
    assert f"{sum(kinds.values())} decisions in" in lines[0]
    for kind, count in kinds.items():
        row = [kind, str(count)]
        assert any([cell.strip() for cell in line.split("│")[1:3]] == row for line in lines[:30])
    assert f"{kinds['skip']} skip rows hidden (--all shows them)" in overview.stdout
    every = run_cli("audit", str(reference), "--all")
    assert every.stdout.count(" skip ") > overview.stdout.count(" skip ")
    output = tmp_path / "audit.jsonl"
    exported = run_cli("audit", "export", str(reference), "-o", str(output))
    assert exported.returncode == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["seq"] for row in lines] == list(range(1, len(lines) + 1))
    assert {row["table"] for row in lines} >= {"runs", "steps", "decisions", "tool_calls"}


def test_replay_reports_no_difference(reference: Path) -> None:
    replayed = run_cli("replay", str(reference))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert ": 0 difference(s)" in replayed.stdout
    n_replayed = int(replayed.stdout.split("replayed ")[1].split()[0])
    with sqlite3.connect(reference / "audit.sqlite") as db:
        n_pure = db.execute("select count(*) from tool_calls where replayable = 1").fetchone()[0]
    assert n_replayed == n_pure > 0


def test_replay_of_a_moved_run_folder(reference: Path, tmp_path: Path) -> None:
    """The run folder moved away from where the scan ran: the look-elsewhere input is found
    in the folder as it is now (logged relative; an older absolute path is mapped)."""
    moved = tmp_path / "moved"
    shutil.move(reference, moved)
    try:
        replayed = run_cli("replay", str(moved), "--tool", "scan_significance")
    finally:
        shutil.move(moved, reference)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "replayed 1 " in replayed.stdout and ": 0 difference(s)" in replayed.stdout


def test_logged_paths_are_found_in_a_moved_folder(tmp_path: Path) -> None:
    from agent.scan import locate_path

    now, then = tmp_path / "now", Path("/somewhere/else/run")
    assert locate_path("lee/points.npz", now, then) == now / "lee" / "points.npz"
    assert locate_path(str(then / "lee" / "points.npz"), now, then) == now / "lee" / "points.npz"
    assert locate_path("/data/a.root", now, then) == Path("/data/a.root")


@pytest.mark.tampers_audit
def test_replay_reports_a_changed_output(reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    with sqlite3.connect(copy / "audit.sqlite") as db:
        db.execute(
            "update tool_calls set output_sha256 = 'x' where seq = "
            "(select min(seq) from tool_calls where tool = 'search_spectrum')"
        )
    replayed = run_cli("replay", str(copy), "--tool", "search_spectrum")
    assert replayed.returncode == 1
    assert "1 difference(s)" in replayed.stdout


def test_the_checkpointed_state_holds_references_not_arrays(reference: Path) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    with sqlite3.connect(reference / "checkpoints.sqlite", check_same_thread=False) as db:
        saver = SqliteSaver(db)
        checkpoints = list(saver.list({"configurable": {"thread_id": reference.name}}))
    assert len(checkpoints) >= 10  # one per superstep
    state = checkpoints[0].checkpoint["channel_values"]
    assert state["stage"] == "done"

    def longest_list(value: object) -> int:
        if isinstance(value, dict):
            return max((longest_list(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return max([len(value), *(longest_list(v) for v in value)])
        assert not hasattr(value, "shape"), f"an array in the state: {type(value)}"
        return 0

    assert longest_list(state) <= 64  # AR points and per-spectrum outcomes, never bins
    for record in state["points"]:
        assert not Path(record["results_file"]).is_absolute(), "the state names a folder"
        assert (reference / record["results_file"]).is_file()
        assert len(record["results_sha256"]) == 64


def _start_scan(arguments: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *arguments],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(process: subprocess.Popen[str], out: Path, node: str, count: int) -> None:
    deadline = time.monotonic() + 600
    while _steps(out, node) < count:
        assert process.poll() is None, f"the scan ended before {count} {node} steps"
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _stopped_with_one_line(process: subprocess.Popen[str], *words: str) -> str:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, (process.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _resume_completes_like(reference: Path, out: Path) -> None:
    """verify passes on what was written; --resume finishes with the reference's results."""
    assert not (out / "results.json").exists()
    verified = run_cli("audit", "verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    resumed = run_cli("scan", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert results_of(out) == results_of(reference)
    keys = _decision_keys(out)
    assert len(keys) == len(set(keys)), "a decision was written twice"
    assert keys == _decision_keys(reference), "decisions lost or different after the resume"
    with sqlite3.connect(out / "audit.sqlite") as db:
        events = [row[0] for row in db.execute("select event from runs order by seq")]
    assert events[:2] == ["plan", "start"] and events[-3:] == ["plan", "resume", "finish"], events
    assert run_cli("audit", "verify", str(out)).returncode == 0


def test_disk_full_while_writing_the_audit_then_resume(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """A full disk, made with RLIMIT_FSIZE on the running scan (no root, no mount needed):
    once the first AR point is done, no file of the scan may grow past the audit's size
    plus 64 KiB. The audit is the largest file the rest of the scan writes, so its next
    growth fails (EFBIG, as ENOSPC would): one line, exit 2, and the resume finishes."""
    import resource

    out = tmp_path / "run"
    process = _start_scan(scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial"))
    _wait_for(process, out, "hunt_bumps", 1)
    limit = (out / "audit.sqlite").stat().st_size + 64 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, hard))
    line = _stopped_with_one_line(process, "--resume", str(out))
    assert "audit log" in line or "run folder" in line
    assert (out / "audit.sqlite").stat().st_size <= limit
    _resume_completes_like(reference, out)


def test_run_folder_made_read_only_mid_scan_then_resume(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """The run folder and its two databases turn immutable after the first AR point."""
    out = tmp_path / "run"
    process = _start_scan(scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial"))
    _wait_for(process, out, "hunt_bumps", 1)
    frozen = [out / "audit.sqlite", out / "checkpoints.sqlite", out]
    for path in frozen:
        _set_immutable(path, True)
    try:
        _stopped_with_one_line(process, "--resume", str(out))
    finally:
        for path in frozen:
            _set_immutable(path, False)
    _resume_completes_like(reference, out)


def _parent(pid: int) -> int:
    """The parent process id of `pid` (0 when it is gone)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _ray_tasks(scan_pid: int) -> list[int]:
    """Ray workers started by the scan `scan_pid` (its descendants) running a batch."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if not command.startswith(b"ray::_run_batch"):
            continue
        ancestor = int(entry.name)
        while ancestor > 1 and ancestor != scan_pid:
            ancestor = _parent(ancestor)
        if ancestor == scan_pid:
            pids.append(int(entry.name))
    return pids


def test_ray_workers_killed_inside_a_real_scan(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """Every Ray task of the first AR point's fits is SIGKILLed while it runs: Ray retries
    it, then the fan-out runs the batch serially and logs it; later points run on Ray. The
    results equal the serial scan's."""
    out = tmp_path / "run"
    process = _start_scan(scan_arguments(signal_sample, out, *CHEAP, "--executor", "ray"))
    killed = 0
    while process.poll() is None and _steps(out, "choose_backgrounds") < 1:
        for pid in _ray_tasks(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert killed >= 3, f"only {killed} Ray tasks were seen running"
    assert results_of(out) == results_of(reference)
    with sqlite3.connect(out / "audit.sqlite") as db:
        events = [
            row[0] for row in db.execute("select rationale from decisions where kind = 'executor'")
        ]
    assert events, "no lost Ray batch was logged"
    assert all("ran it serially" in text for text in events), events
    assert run_cli("audit", "verify", str(out)).returncode == 0


def test_the_progress_screen_in_a_terminal_shows_points_and_an_eta(
    reference: Path, signal_sample: Sample, tmp_path: Path
) -> None:
    """The scan in a real pseudo-terminal: its progress shows AR points done / planned, the
    spectra of the point, the elapsed time and an ETA once a point is done."""
    import pty
    import re
    import threading

    out = tmp_path / "run"
    arguments = scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial")
    arguments.remove("--quiet")
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *arguments],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "TERM": "xterm", "COLUMNS": "160"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    screen = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the scan has closed the terminal
            while chunk := os.read(leader, 65536):
                screen.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    assert process.wait(timeout=900) == 0
    reader.join(timeout=30)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "AR point 1 of 2 (3 pb)" in text and "AR point 2 of 2 (0.3 pb)" in text
    assert "0/2 points" in text and "1/2 points" in text
    assert re.search(r"spectra \d+/\d+", text)
    assert re.search(r"ETA \d+ s", text), "no ETA after the first point"
    assert "look-elsewhere over 2 AR points" in text
    assert results_of(out) == results_of(reference)


def test_why_names_the_p_that_decided_and_the_toys_of_the_config(reference: Path) -> None:
    """--why tells one story: each candidate's line shows the goodness-of-fit p that decided
    its check (not only the asymptotic fit p), a failed candidate names its failed checks,
    and every toy count a check reports is the config's gof_toys."""
    config = json.loads((reference / "config.json").read_text())
    with sqlite3.connect(reference / "audit.sqlite") as db:
        rows = db.execute(
            "select spectrum, point_pb, options, rationale from decisions where kind = 'background'"
        ).fetchall()
    toys = {
        check["numbers"]["n_toys"]
        for _, _, options, _ in rows
        for candidate in json.loads(options or "[]")
        if isinstance(candidate, dict)
        for check in candidate.get("checks", [])
        if check["name"] == "goodness_of_fit" and "n_toys" in check["numbers"]
    }
    assert toys == {float(config["gof_toys"])}, toys  # sparse bins: toys in every scan
    for _, _, _, rationale in rows:
        assert ": )" not in rationale and ": ;" not in rationale, rationale  # a named reason
    spectrum, point, _, _ = rows[0]
    why = run_cli("audit", str(reference), "--why", spectrum, str(point))
    assert why.returncode == 0, why.stderr
    candidate_lines = [line for line in why.stdout.splitlines() if " (nested): " in line]
    assert candidate_lines
    for line in candidate_lines:
        assert "asymptotic p" in line and "goodness-of-fit p " in line and " decides" in line
