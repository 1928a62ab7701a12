"""A real two-node Ray cluster on this host whose worker node runs as another user.

The head node (started by the test's user) offers no CPU, so every task runs on the worker
node, which runs as `nobody`: it cannot read or write the test's folders (pytest's tmp
folders are private to their owner), as a worker on another machine could not. Starting
processes as another user needs root; without it the cluster cannot be built.

When `nobody` cannot run this interpreter (pyenv's lives under /root), a copy of its
standard library and binary goes into a world-readable folder; the worker imports the
packages of this environment and this worktree through PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
HEAD_PORT = 6397
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
"""A test cluster on loopback: no usage stats, no token shared with other Ray instances."""


def _as_nobody(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=120,
    )


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
    """Start the cluster; stop every node after."""
    scratch = Path(tempfile.mkdtemp(prefix="anomscan-cluster-"))
    try:
        scratch.chmod(0o755)
        home = scratch / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        env = {**os.environ, **RAY_ENV, "HOME": str(home)}
        env.pop("RAY_ADDRESS", None)
        head = subprocess.run(
            [
                sys.executable,
                "-c",
                "from ray.scripts.scripts import main; main()",
                "start",
                "--head",
                f"--port={HEAD_PORT}",
                "--num-cpus=0",
                "--include-dashboard=false",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **RAY_ENV},
            check=False,
        )
        assert head.returncode == 0, head.stderr
        python, worker_env = _interpreter_for_nobody(scratch, env)
        subprocess.run(["chmod", "-R", "a+rX", str(scratch)], check=True)
        os.chown(home, NOBODY, NOBODY)
        worker = _as_nobody(
            [
                python,
                "-c",
                "from ray.scripts.scripts import main; main()",
                "start",
                f"--address=127.0.0.1:{HEAD_PORT}",
                "--num-cpus=1",
                f"--temp-dir={home}",
            ],
            worker_env,
            home,
        )
        assert worker.returncode == 0, worker.stderr[-3000:]
        yield Cluster(f"127.0.0.1:{HEAD_PORT}", home)
    finally:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from ray.scripts.scripts import main; main()",
                "stop",
                "--force",
            ],
            capture_output=True,
            env={**os.environ, **RAY_ENV},
            check=False,
        )
        shutil.rmtree(scratch, ignore_errors=True)
        for copies in Path(tempfile.gettempdir()).glob(f"anomscan-pass-{NOBODY}-*"):
            shutil.rmtree(copies, ignore_errors=True)  # the worker node's copies of the model


def worker_pids(cluster: Cluster) -> dict[int, int]:
    """pid -> owner (uid) of every Ray worker process the worker node started, from the
    core-worker logs it wrote into its own temporary folder."""
    logs = cluster.worker_temp.glob("session_*/logs/python-core-worker-*_*.log")
    return {int(log.stem.rsplit("_", 1)[1]): log.stat().st_uid for log in logs}
