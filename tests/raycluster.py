"""A real two-node Ray cluster on this host whose worker node runs as another user.

The head node (started by the test's user) offers no CPU, so every task runs on the worker
node, which runs as `nobody`: it cannot read or write the test's folders (pytest's tmp
folders are private to their owner), as a worker on another machine could not. Starting
processes as another user needs root; without it the cluster cannot be built. Each node
runs `ray start --block` in a process group of its own with its own temporary folder, and
is stopped by that group: other Ray instances of the host are left alone.

When `nobody` cannot run this interpreter (pyenv's lives under /root), a copy of its
standard library and binary goes into a world-readable folder; the worker imports the
packages of this environment and this worktree through PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
HEAD_PORT = 6397
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
"""A test cluster on loopback: no usage stats, no token shared with other Ray instances."""


SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
RAY_START = ["-c", "from ray.scripts.scripts import main; main()", "start", "--block"]


def _as_nobody(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SETPRIV, *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=120,
    )


def _start_node(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`ray start --block` in a process group of its own; returns once the node runs."""
    log = cwd.parent / f"{cwd.name}.log"
    with log.open("w") as output:
        node = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            _stop_node(node)
            raise AssertionError(f"a Ray node did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return node


def _stop_node(node: subprocess.Popen[str]) -> None:
    """Stop a node and every process it started (its process group), and only those."""
    for stop in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, stop)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=20)
            return


def _interpreter_for_nobody(scratch: Path, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A Python of this version that `nobody` can run, and the environment it needs."""
    probe = [sys.executable, "-c", "import sys; print(sys.version)"]
    if _as_nobody(probe, env, scratch).stdout.strip() == sys.version:
        return sys.executable, env
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    copy = scratch / "python"
    (copy / "bin").mkdir(parents=True)
    (copy / "lib").mkdir()
    shutil.copy2(base / "bin" / version, copy / "bin" / version)
    for library in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(library, copy / "lib" / library.name)
    shutil.copytree(
        base / "lib" / version,
        copy / "lib" / version,
        ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__", "idlelib"),
    )
    packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    root = str(Path(__file__).resolve().parents[1])
    return str(copy / "bin" / version), env | {
        "LD_LIBRARY_PATH": str(copy / "lib"),
        "PYTHONPATH": os.pathsep.join([*packages, root]),
    }


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: its address (for RAY_ADDRESS) and the worker node's folder."""

    address: str
    worker_temp: Path


@contextlib.contextmanager
def unprivileged_worker_cluster() -> Iterator[Cluster]:
    """Start the cluster; stop its two nodes (not other Ray instances of the host) after."""
    scratch = Path(tempfile.mkdtemp(prefix="anomscan-cluster-"))
    nodes: list[subprocess.Popen[str]] = []
    try:
        scratch.chmod(0o755)
        home = scratch / "home"
        home.mkdir()
        env = {**os.environ, **RAY_ENV}
        env.pop("RAY_ADDRESS", None)
        head_folder = scratch / "h"  # its own temporary folder: no address file in /tmp/ray
        head_folder.mkdir()
        head = [f"--port={HEAD_PORT}", "--num-cpus=0", "--include-dashboard=false"]
        head.append(f"--temp-dir={head_folder}")
        nodes.append(_start_node([sys.executable, *RAY_START, "--head", *head], env, head_folder))
        python, worker_env = _interpreter_for_nobody(scratch, env | {"HOME": str(home)})
        subprocess.run(["chmod", "-R", "a+rX", str(scratch)], check=True)
        os.chown(home, NOBODY, NOBODY)
        worker = [f"--address=127.0.0.1:{HEAD_PORT}", "--num-cpus=1", f"--temp-dir={home}"]
        nodes.append(_start_node([*SETPRIV, python, *RAY_START, *worker], worker_env, home))
        yield Cluster(f"127.0.0.1:{HEAD_PORT}", home)
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(scratch, ignore_errors=True)
        for copies in Path(tempfile.gettempdir()).glob(f"anomscan-pass-{NOBODY}-*"):
            shutil.rmtree(copies, ignore_errors=True)  # the worker node's copies of the model


def worker_pids(cluster: Cluster) -> dict[int, int]:
    """pid -> owner (uid) of every Ray worker process the worker node started, from the
    core-worker logs it wrote into its own temporary folder."""
    logs = cluster.worker_temp.glob("session_*/logs/python-core-worker-*_*.log")
    return {int(log.stem.rsplit("_", 1)[1]): log.stat().st_uid for log in logs}
