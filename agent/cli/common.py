"""What every command group shares: the one-line argument errors, progress, JSON, SIGTERM.

- `CommandParser` turns argparse's usage block into one line pointing at ``--help`` (exit
  2) and names the closest choice or option to a mistyped one;
- `progress_bar` shows progress on stderr only when it is a terminal, so piped and logged
  output stays the command's own;
- `print_json` prints a tool's output; output that is not valid JSON is a bug (exit 1);
- SIGTERM stops a command as Ctrl-C does (`Terminated`), so a scan keeps what it completed;
  the flag `SIGTERM_RECEIVED` remembers it when a library turns the exception into a plain
  interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeAlias

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from agent.errors import EXIT_INVALID_INPUT, InternalError
from core.errors import OutputError
from core.files import json_text
from core.masses import SPECTRUM_NAMES

__all__ = [
    "EXIT_TERMINATED",
    "SIGTERM_RECEIVED",
    "CommandParser",
    "Subcommands",
    "Terminated",
    "add_run_command",
    "canonical_spectrum",
    "print_json",
    "progress_bar",
    "was_terminated",
]


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) pointing at ``--help``; exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print `message` as one line and exit with the status of a bad input."""
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if choice is not None:
            listed = choice.group(2)
            choices = re.findall(r"'([^']*)'", listed) or [c.strip() for c in listed.split(",")]
            close = difflib.get_close_matches(choice.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        self.exit(EXIT_INVALID_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def unknown(self, extras: Sequence[str]) -> NoReturn:
        """Refuse the words this (sub)command does not know, naming its closest option."""
        options = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        flags = [word for word in extras if word.startswith("-")]
        if not flags:
            self.error(f"unexpected argument(s) {' '.join(map(repr, extras))}")
        name = flags[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        self.error(f"unknown option {name}{hint}")


Subcommands: TypeAlias = "argparse._SubParsersAction[CommandParser]"
"""The `add_subparsers` group each command group adds its subcommands to."""


def add_run_command(
    commands: Subcommands, name: str, summary: str, *, run_help: str = "run folder"
) -> CommandParser:
    """A subcommand that reads a run folder: its parser, with RUN as its first argument."""
    command: CommandParser = commands.add_parser(name, help=summary)
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


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (what was completed is kept), exit 143."""


EXIT_TERMINATED = 143
SIGTERM_RECEIVED = threading.Event()
"""Set by SIGTERM: a library (Ray's `get`) may turn `Terminated` into a plain interrupt."""


def was_terminated(stop: KeyboardInterrupt) -> bool:
    """Whether the interrupt `stop` came from SIGTERM rather than Ctrl-C."""
    return isinstance(stop, Terminated) or SIGTERM_RECEIVED.is_set()
