"""The default scan (21 AR points, every check) on 1M generated events: time per stage,
serial against Ray in the same run.

    nice -n 10 .venv/bin/python bench/bench_scan.py        (BENCH_EVENTS to change the size)

Run 1 (Ray) generates the sample, trains the autoencoder and scans; run 2 (serial) scans
the same files with the model of run 1. Both run `anomscan scan` in a subprocess (the
entry point users run), and `anomscan audit verify` checks each run folder. Stage times
come from the audit log of each run: event pass and training (prepare), fits (background
choice and bump hunt over every AR point), look-elsewhere. Goal: under 10 minutes in all
on 2 cores, the fits under 5.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.synth import SampleConfig, generate_sample
from tests.agent.conftest import SIGNAL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results") / "scan.json"
N_EVENTS = int(os.environ.get("BENCH_EVENTS", "1000000"))


def _stages(run_dir: Path) -> dict[str, float]:
    with sqlite3.connect(run_dir / "audit.sqlite") as db:
        steps = dict(db.execute("select node, sum(seconds) from steps group by node").fetchall())
        training = db.execute(
            "select coalesce(sum(seconds), 0) from tool_calls where tool = 'train_autoencoder'"
        ).fetchone()[0]
    return {
        "training_s": round(float(training), 1),
        "event_pass_s": round(float(steps.get("prepare", 0.0)) - float(training), 1),
        "spectra_s": round(float(steps.get("build_spectra", 0.0)), 1),
        "fits_s": round(
            float(steps.get("choose_backgrounds", 0.0)) + float(steps.get("hunt_bumps", 0.0)), 1
        ),
        "look_elsewhere_s": round(float(steps.get("look_elsewhere", 0.0)), 1),
    }


def audit_verify(run_dir: Path) -> dict[str, object]:
    """`anomscan audit verify RUN_DIR`: its exit status and the end of its report."""
    verified = subprocess.run(
        [sys.executable, "-m", "agent.cli", "audit", "verify", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return {"exit": verified.returncode, "last_line": verified.stdout.strip()[-200:]}


def _scan(folder: Path, files: list[str], executor: str, model: str | None) -> dict[str, object]:
    command = [sys.executable, "-m", "agent.cli", "scan", *files, "--lumi-pb", "1000"]
    command += ["--out", str(folder), "--executor", executor, "--seed", "1", "--quiet"]
    command += [] if model is None else ["--model", model]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - start
    results = json.loads((folder / "results.json").read_text())
    with sqlite3.connect(folder / "audit.sqlite") as db:
        workers = {row[0] for row in db.execute("select distinct worker from tool_calls")}
    top = results["excesses"][0] if results["excesses"] else None
    return {
        "executor": executor,
        "worker_processes": len(workers),
        "total_s": round(total, 1),
        **_stages(folder),
        "points": len(results["points_pb"]),
        "excesses": len(results["excesses"]),
        "top": None if top is None else {k: top[k] for k in ("spectrum", "xsec_pb", "local_z")},
        "scan_global_z": results["scan_global_z"],
        "audit_verify": audit_verify(folder),
    }


def main() -> int:
    """Run both scans and write bench/results/scan.json."""
    work = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    clock = time.perf_counter()
    sample = generate_sample(
        work / "data", SampleConfig(n_events=N_EVENTS, seed=11, signals=(SIGNAL,))
    )
    generate_s = time.perf_counter() - clock
    files = [str(p) for p in sample.files]
    ray_run = _scan(work / "ray", files, "ray", None)
    model = str(work / "ray" / "model" / "autoencoder.onnx")
    serial_run = _scan(work / "serial", files, "serial", model)
    fits_ratio = (
        float(serial_run["fits_s"]) / float(ray_run["fits_s"])  # type: ignore[arg-type]
        if ray_run["fits_s"]
        else None
    )
    result = {
        "command": "nice -n 10 .venv/bin/python bench/bench_scan.py",
        "n_events": N_EVENTS,
        "cpus": os.cpu_count(),
        "generate_s": round(generate_s, 1),
        "ray": ray_run,
        "serial": serial_run,
        "fits_serial_over_ray": None if fits_ratio is None else round(fits_ratio, 2),
        "goal": "under 10 minutes in all on 2 cores, the fits under 5",
        "note": "the serial run reuses the Ray run's model, so its prepare has no training",
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    json.dump(result, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
