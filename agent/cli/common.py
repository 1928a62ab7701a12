"""What the command groups share: a run-folder command, spectrum names, progress, JSON.

- `progress_bar` shows progress on stderr only when it is a terminal, so piped and logged
  output stays the command's own;
- `print_json` prints a tool's output; output that is not valid JSON is a bug (exit 1).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from agent.cli.parser import CommandParser, Subcommands, add_command
from agent.errors import InternalError
from core.errors import OutputError
from core.files import json_text
from core.masses import SPECTRUM_NAMES

__all__ = [
    "add_run_command",
    "canonical_spectrum",
    "print_json",
    "progress_bar",
]


def add_run_command(
    commands: Subcommands, name: str, *, run_help: str = "run folder"
) -> CommandParser:
    """A subcommand that reads a run folder: its parser, with RUN as its first argument."""
    command = add_command(commands, name)
    command.add_argument("run", help=run_help)
    return command


def canonical_spectrum(text: str) -> str:
    """The spectrum name as written in the results (``t2/JM`` -> ``T2/jm``); else unchanged."""
    by_lower = {name.lower(): name for name in SPECTRUM_NAMES}
    return by_lower.get(text.strip().lower(), text)


def print_json(data: Any) -> None:
    """Print `data` as JSON on stdout; data that JSON can not hold is an internal error."""
    try:
        text = json_text(data)
    except OutputError as error:
        raise InternalError(f"the output is not valid JSON: {error}") from error
    print(text)


@contextlib.contextmanager
def progress_bar(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr (done / total, elapsed, ETA) when it is a terminal; else None.

    Without calls to the function it yields, the bar pulses beside the elapsed time.
    """
    if not sys.stderr.isatty():
        yield None
        return
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(
        f"[bold cyan]{what}[/]", *columns, console=Console(stderr=True), transient=True
    ) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
