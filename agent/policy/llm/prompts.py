"""The prompts of the LLM policy: versioned text files, one per decision plus the system prompt.

They are files, not strings in code, so that a change of wording is a reviewed change of a
file, and their SHA-256 is recorded in the run (`runs` row) to tell which prompts a scan used.
They are read from the repository's prompts/ folder in an editable install and from
agent/prompts inside the wheel (pyproject.toml force-includes them there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import AnomscanError

PROMPT_NAMES = ("system", "initial_points", "next_points", "accept_background", "fallback")
PROMPT_FOLDERS = (
    Path(__file__).resolve().parents[2] / "prompts",  # inside an installed wheel
    Path(__file__).resolve().parents[3] / "prompts",  # the repository (editable install)
)
"""Where the prompt files are looked for, in order."""


class PromptError(AnomscanError):
    """A prompt file is missing or unreadable."""


@dataclass(frozen=True)
class Prompts:
    """The prompt texts by name and their SHA-256 (recorded in the run)."""

    folder: Path
    texts: Mapping[str, str]

    @property
    def sha256(self) -> dict[str, str]:
        """SHA-256 (hex) of each prompt file's text."""
        return {
            name: hashlib.sha256(text.encode()).hexdigest() for name, text in self.texts.items()
        }


def prompts_folder() -> Path:
    """The first folder of PROMPT_FOLDERS that holds the system prompt."""
    for folder in PROMPT_FOLDERS:
        if (folder / "system.txt").is_file():
            return folder
    looked = ", ".join(str(folder) for folder in PROMPT_FOLDERS)
    raise PromptError(f"no prompts/system.txt in {looked}; reinstall anomscan")


def load_prompts(folder: Path | None = None) -> Prompts:
    """Read every prompt file (`prompts/<name>.txt`)."""
    where = folder or prompts_folder()
    texts = {}
    for name in PROMPT_NAMES:
        path = where / f"{name}.txt"
        if not path.is_file():
            raise PromptError(
                f"prompt file {path} is missing; every one of {PROMPT_NAMES} is needed"
            )
        texts[name] = path.read_text(encoding="utf-8")
    return Prompts(where, texts)
