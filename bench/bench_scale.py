"""The default scan at growing sizes: time and peak memory per stage.

    nice -n 10 .venv/bin/python bench/bench_scale.py                  (1M, 3M and 10M events)
    BENCH_SIZES=1000000,3000000 nice -n 10 .venv/bin/python bench/bench_scale.py
    BENCH_KEEP=1 ...                       (keep the samples and run folders)

Each size is a generated sample (seed 11, the X(1500) -> j mu signal of the tests) at a
luminosity that grows with it (1000 pb^-1 per million events, as real data would), scanned
by `anomscan scan --executor ray` in a subprocess with every default; `anomscan audit
verify` checks each run folder. Stage times come from the audit log (steps and the
training call); memory is sampled every 0.25 s from /proc over the scan's process tree
(the driver, and the Ray processes it started), and each sample is attributed to the stage
whose step was running. Two figures per stage: the driver's peak RSS, and the peak of the
tree's summed RSS (an upper bound: shared pages are counted once per process). Goals
(issue 24): 10M events under 20 minutes, peak RSS under 4 GB, time per stage growing no
faster than the events (fits and look-elsewhere roughly constant). Results are merged
into bench/results/scale.json by size, so sizes may be run in separate sessions.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_scan import audit_verify
from core.synth import SampleConfig, generate_sample
from tests.agent.conftest import SIGNAL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results") / "scale.json"
SIZES = [int(n) for n in os.environ.get("BENCH_SIZES", "1000000,3000000,10000000").split(",")]
KEEP = os.environ.get("BENCH_KEEP") == "1"
"""BENCH_KEEP=1 keeps each size's sample and run folder (to read its audit log after)."""
LUMI_PB_PER_EVENT = 1000.0 / 1_000_000
PAGE = os.sysconf("SC_PAGE_SIZE")
STAGES = {
    "prepare": "training and event pass",
    "build_spectra": "spectra",
    "choose_backgrounds": "fits",
    "hunt_bumps": "fits",
    "look_elsewhere": "look-elsewhere",
}


def _tree_rss(root: int) -> tuple[float, float]:
    """(RSS of `root`, summed RSS of `root` and its descendants), in MB."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[int(entry.name)] = int(fields[1])
        rss[int(entry.name)] = pages * PAGE / 2**20
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return rss.get(root, 0.0), sum(rss.get(pid, 0.0) for pid in tree)


def _sampled_run(command: list[str]) -> tuple[float, list[tuple[float, float, float]]]:
    """Run `command`; its wall time and (unix time, driver MB, tree MB) every 0.25 s."""
    samples: list[tuple[float, float, float]] = []
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), *_tree_rss(process.pid)))
            done.wait(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        returncode = process.wait()
    finally:
        done.set()
        sampler.join()
    if returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit {returncode}")
    return time.perf_counter() - start, samples


def _stage_figures(run_dir: Path, samples: list[tuple[float, float, float]]) -> dict[str, dict]:
    """Per stage: seconds (from the audit log) and the peak memory of its samples."""
    with sqlite3.connect(run_dir / "audit.sqlite") as db:
        steps = db.execute("select node, started_at, ended_at, seconds from steps").fetchall()
        training = db.execute(
            "select coalesce(sum(seconds), 0) from tool_calls where tool = 'train_autoencoder'"
        ).fetchone()[0]
    figures: dict[str, dict] = {}
    for node, started, ended, seconds in steps:
        stage = STAGES.get(node, "other")
        entry = figures.setdefault(stage, {"seconds": 0.0, "driver_mb": 0.0, "tree_mb": 0.0})
        entry["seconds"] += float(seconds)
        for when, driver, tree in samples:
            if started <= when <= ended:
                entry["driver_mb"] = max(entry["driver_mb"], driver)
                entry["tree_mb"] = max(entry["tree_mb"], tree)
    figures["training and event pass"]["training_seconds"] = float(training)
    return {
        stage: {key: round(value, 1) for key, value in entry.items()}
        for stage, entry in figures.items()
    }


def _run_size(n_events: int, work: Path) -> dict[str, object]:
    lumi = n_events * LUMI_PB_PER_EVENT
    clock = time.perf_counter()
    sample = generate_sample(
        work / "data",
        SampleConfig(n_events=n_events, seed=11, signals=(SIGNAL,), lumi_pb=lumi),
    )
    generate_s = time.perf_counter() - clock
    run_dir = work / "run"
    command = [sys.executable, "-m", "agent.cli", "scan", *map(str, sample.files)]
    command += ["--lumi-pb", f"{lumi:g}", "--out", str(run_dir), "--executor", "ray"]
    command += ["--seed", "1", "--quiet"]
    total, samples = _sampled_run(command)
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "n_events": n_events,
        "lumi_pb": lumi,
        "generate_s": round(generate_s, 1),
        "total_s": round(total, 1),
        "peak_driver_mb": round(max(s[1] for s in samples), 1),
        "peak_tree_mb": round(max(s[2] for s in samples), 1),
        "stages": _stage_figures(run_dir, samples),
        "points": len(results["points_pb"]),
        "scan_global_z": results["scan_global_z"],
        "audit_verify": audit_verify(run_dir),
    }


def main() -> int:
    """Scan every size of BENCH_SIZES and merge the figures into bench/results/scale.json."""
    recorded = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sizes": {}}
    for n_events in SIZES:
        if KEEP:
            folder = tempfile.mkdtemp(prefix="bench-scale-")
            figures = _run_size(n_events, Path(folder))
            print(f"kept {folder}", flush=True)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
                figures = _run_size(n_events, Path(folder))
        figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        recorded["sizes"][str(n_events)] = figures
        recorded.update(
            command="nice -n 10 .venv/bin/python bench/bench_scale.py",
            cpus=os.cpu_count(),
            goal="10M events under 20 minutes on 2 cores, peak RSS under 4 GB, time per stage "
            "growing no faster than the events",
        )
        RESULTS.write_text(json.dumps(recorded, indent=1) + "\n")
        print(json.dumps(figures, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
