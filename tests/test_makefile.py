"""`make test` on a fresh machine: Chromium (for the report test) is installed where it is
missing, or the user is told exactly what to install; `.ci/run` is `make test` alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENSURE = ROOT / "scripts" / "ensure-chromium"


def _ensure(tmp_path: Path, apt_get: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CHROMIUM": str(tmp_path / "bin" / "chromium"), "APT_GET": apt_get}
    return subprocess.run(
        [str(ENSURE)], capture_output=True, text=True, env=env, check=False, timeout=60
    )


def test_a_missing_browser_is_installed_with_apt_get(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "apt-get"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f'if [ "$1" = install ]; then mkdir -p {tmp_path}/bin; '
        f"printf '#!/bin/sh\\n' > {tmp_path}/bin/chromium; chmod +x {tmp_path}/bin/chromium; fi\n"
    )
    fake.chmod(0o755)
    done = _ensure(tmp_path, str(fake))
    if os.geteuid() != 0:  # not root: told what to do instead
        assert done.returncode == 1 and "apt-get install -y chromium" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    again = _ensure(tmp_path, str(fake))  # present now: nothing is installed twice
    assert again.returncode == 0 and len(calls.read_text().splitlines()) == 2


def test_without_apt_get_the_user_is_told_what_to_install(tmp_path: Path) -> None:
    done = _ensure(tmp_path, str(tmp_path / "no-such-apt-get"))
    assert done.returncode == 1
    assert "needs Chromium at" in done.stderr and "apt-get install -y chromium" in done.stderr


def test_make_test_ensures_the_browser_before_pytest_and_ci_calls_only_make_test() -> None:
    planned = subprocess.run(
        ["make", "-n", "test"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "scripts/ensure-chromium" in planned
    assert planned.index("scripts/ensure-chromium") < planned.index("pytest")
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert commands == ["make test"]
