"""prompts/ is read from the repository (editable install) and shipped inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.policy.llm import PROMPT_NAMES, load_prompts

REPO = Path(__file__).resolve().parents[3]


def test_editable_checkout_reads_the_top_level_prompts_folder() -> None:
    prompts = load_prompts()
    assert prompts.folder == REPO / "prompts"
    for name in PROMPT_NAMES:
        assert prompts.texts[name] == (REPO / "prompts" / f"{name}.txt").read_text()


@pytest.mark.slow
def test_the_wheel_ships_the_prompts_and_reads_them_there(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("anomscan-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert {f"agent/prompts/{name}.txt" for name in PROMPT_NAMES} <= set(
        zipfile.ZipFile(wheel).namelist()
    )
    # Run from an unrelated folder with only the unpacked wheel on the path.
    script = (
        "from agent.policy.llm import load_prompts; p = load_prompts(); "
        "print(p.folder); print(p.sha256['system'])"
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {script}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    folder, digest = completed.stdout.split()
    assert Path(folder) == site / "agent" / "prompts"
    assert digest == load_prompts().sha256["system"]
