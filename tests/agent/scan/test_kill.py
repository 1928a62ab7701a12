"""SIGKILL at random moments: the previous state or the new complete one, never a torn one.

For `generate`, the event pass and a tool writing an output (`compute_rmm`): a writer runs
in a subprocess and is killed after a random fraction of an uninterrupted run's duration
(three times each, seeded). After each kill the output on disk must be, as read by its
readers, exactly the previous state or exactly the new one; a rerun must then give what an
uninterrupted run gives. Comparisons are of content (array bytes, truth.json), since ROOT
headers carry write times.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from agent.runtime.eventpass import event_pass
from core.files import MANIFEST_NAME, file_sha256, read_manifest
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import read_event_table
from tools.registry import get_tool

pytestmark = pytest.mark.slow  # about 1 min per writer on a shared 2-core machine

KILLS = 3
SIGNAL = (SignalSpec("jm", 1500.0, 30.0, n_events=100),)


def _run(code: str, *arguments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )


def _duration(code: str, *arguments: str) -> float:
    start = time.perf_counter()
    process = _run(code, *arguments)
    _, error = process.communicate(timeout=300)
    assert process.returncode == 0, error.decode()[-2000:]
    return time.perf_counter() - start


def _kill_at(seconds: float, code: str, *arguments: str) -> None:
    process = _run(code, *arguments)
    time.sleep(seconds)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _kill_loop(
    seed: int,
    total: float,
    code: str,
    arguments: tuple[str, ...],
    state: Callable[[], str | None],
    allowed: set[str | None],
    reset: Callable[[], None],
    rerun: Callable[[], None],
    final: str,
) -> list[str | None]:
    rng = random.Random(seed)
    seen = []
    for _ in range(KILLS):
        reset()
        _kill_at(rng.uniform(0.3, 1.0) * total, code, *arguments)
        now = state()
        assert now in allowed, "a killed writer left a state that is neither old nor new"
        seen.append(now)
        rerun()
        assert state() == final, "a rerun after the kill differs from an uninterrupted run"
    return seen


# generate ------------------------------------------------------------------------------------

_GENERATE = (
    "import sys\nfrom agent.cli.main import main\n"
    "sys.exit(main(['generate', '-o', sys.argv[1], '-n', '60000', '--seed', '5', "
    "'--events-per-file', '20000', '--signal', 'jm:1500:30:100']))\n"
)


_HELD_GENERATE = (
    "import sys, time\nfrom pathlib import Path\nimport tools.events\n"
    "real = tools.events.generate_sample\n"
    "def held(*args, **options):\n"
    "    def after_each_file(done, total):\n"
    "        Path(sys.argv[2]).write_text(f'{done}/{total}')\n"
    "        time.sleep(600)  # the first file is staged: wait here for the test's SIGINT\n"
    "    return real(*args, **(options | {'progress': after_each_file}))\n"
    "tools.events.generate_sample = held\n"
    "from agent.cli.main import main\n"
)
"""A `generate` that stops after its first staged file and signals it, so the test's Ctrl-C
lands mid-write however loaded the machine is (argv[2]: the file it writes then)."""


def _sample_state(folder: Path) -> str | None:
    """Content of a committed sample (None if absent); fails on any inconsistency."""
    if not folder.exists():
        return None
    manifest = read_manifest(folder)
    assert manifest is not None, f"{folder} exists without a manifest"
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    assert on_disk == sorted(manifest["files"]), "files beside the manifest's"
    digest = hashlib.sha256()
    for name, entry in sorted(manifest["files"].items()):
        assert file_sha256(folder / name) == entry["sha256"], f"{name} is not what was committed"
        if name.endswith(".root"):
            events = uproot.open(folder / name)["Events"].arrays(library="ak")
            form, length, buffers = ak.to_buffers(events)
            digest.update(json.dumps([form.to_dict(), length]).encode())
            for key in sorted(buffers):
                digest.update(np.asarray(buffers[key]).tobytes())
        else:
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def test_killed_generate_leaves_old_or_new_sample(tmp_path):
    target = tmp_path / "data"
    new = SampleConfig(n_events=60_000, seed=5, events_per_file=20_000, signals=SIGNAL)
    old = SampleConfig(n_events=30_000, seed=4, events_per_file=10_000, signals=SIGNAL)
    generate_sample(tmp_path / "reference", new)
    final = _sample_state(tmp_path / "reference")
    generate_sample(tmp_path / "previous", old)
    previous = _sample_state(tmp_path / "previous")
    total = _duration(_GENERATE, str(target))
    assert _sample_state(target) == final  # the command line writes what the core writes

    seen = _kill_loop(
        11,
        total,
        _GENERATE,
        (str(target),),
        lambda: _sample_state(target),
        {previous, final},
        lambda: generate_sample(target, old),
        lambda: generate_sample(target, new),
        final,
    )
    assert previous in seen or final in seen
    # a killed writer may leave its (released) lock file; the next writer takes it over
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "data.lock")
    assert names == ["data", "previous", "reference"]


# event pass ------------------------------------------------------------------------------------

_PASS = (
    "import sys\nfrom agent.runtime.eventpass import event_pass\n"
    "event_pass(sys.argv[2:], sys.argv[1], step_size=2000)\n"
)


def _table_state(folder: Path) -> str | None:
    """Content of the committed event table (None when no pass has finished)."""
    if not (folder / "table.json").is_file():
        return None
    table = read_event_table(folder)  # every part it lists must be there and whole
    return _digest({"key": table.keys(), "masses": table.masses, "bits": table.stream_bits})


@pytest.fixture(scope="module")
def pass_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    config = SampleConfig(n_events=12_000, seed=8, events_per_file=6_000, signals=SIGNAL)
    return [str(p) for p in generate_sample(tmp_path_factory.mktemp("pass"), config).files]


def test_killed_event_pass_leaves_old_or_new_table(tmp_path, pass_inputs):
    target = tmp_path / "table"
    event_pass(pass_inputs, tmp_path / "reference", step_size=2000)
    final = _table_state(tmp_path / "reference")
    event_pass(pass_inputs[:1], tmp_path / "previous", step_size=3000)
    previous = _table_state(tmp_path / "previous")
    assert previous != final
    total = _duration(_PASS, str(target), *pass_inputs)
    assert _table_state(target) == final

    def reset() -> None:
        for part in target.iterdir():
            part.unlink()
        event_pass(pass_inputs[:1], target, step_size=3000)

    _kill_loop(
        12,
        total,
        _PASS,
        (str(target), *pass_inputs),
        lambda: _table_state(target),
        {previous, final},
        reset,
        lambda: event_pass(pass_inputs, target, step_size=2000),
        final,
    )
    stale = [p.name for p in target.iterdir() if p.name.startswith(".anomscan-tmp-")]
    assert stale == [], "temporaries of killed writers were left after the rerun"


# a tool writing an output ---------------------------------------------------------------------

_TOOL = (
    "import sys, json\nfrom agent.cli.main import main\n"
    "payload = {'inputs': sys.argv[2:], 'output': sys.argv[1], 'max_events': 3000}\n"
    "sys.exit(main(['tool', 'compute_rmm', '--json', json.dumps(payload)]))\n"
)


def _npz_state(path: Path) -> str | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        return _digest({name: data[name] for name in data.files})


def test_killed_tool_leaves_old_or_new_output(tmp_path, pass_inputs):
    target = tmp_path / "rmm.npz"
    tool = get_tool("compute_rmm")

    def write(path: Path, n: int) -> None:
        tool.call({"inputs": pass_inputs, "output": str(path), "max_events": n})

    write(tmp_path / "reference.npz", 3_000)
    final = _npz_state(tmp_path / "reference.npz")
    write(tmp_path / "previous.npz", 500)
    previous = _npz_state(tmp_path / "previous.npz")
    total = _duration(_TOOL, str(target), *pass_inputs)
    assert _npz_state(target) == final

    _kill_loop(
        13,
        total,
        _TOOL,
        (str(target), *pass_inputs),
        lambda: _npz_state(target),
        {previous, final},
        lambda: write(target, 500),
        lambda: write(target, 3_000),
        final,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "previous.npz",
        "reference.npz",
        "rmm.npz",
    ]


def test_ctrl_c_during_generate_exits_130_and_keeps_the_previous_sample(tmp_path):
    target = tmp_path / "data"
    old = SampleConfig(n_events=30_000, seed=4, events_per_file=10_000, signals=SIGNAL)
    generate_sample(target, old)
    previous = _sample_state(target)
    staged = tmp_path.parent / f"{tmp_path.name}-staged"
    process = _run(_HELD_GENERATE + _GENERATE.split("\n", 2)[2], str(target), str(staged))
    deadline = time.monotonic() + 300
    while not staged.exists():  # the writer says: first file staged, the rest to come
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error.decode()[-2000:]
    assert error.decode().strip() == "anomscan: interrupted; no partial output was kept"
    assert _sample_state(target) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
