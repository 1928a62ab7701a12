"""`anomscan`: the parser assembled from the command groups, SIGTERM, and the exit status.

Each command group (tools, scan, review, reinterp) defines its subcommands and their
functions in its own module; this one only adds them, in the order `anomscan --help` lists
them, importing only the module of the command that runs (agent/cli/parser.py says why).
Every outcome, parsing included, goes through `agent.errors.guarded`, so a command ends in
at most one stderr line and a known exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from agent.cli.parser import COMMANDS, CommandParser, Subcommands, add_command
from agent.errors import guarded
from agent.stop import clear_stop, on_sigint, on_sigterm

__all__ = ["build_parser", "main", "parse_arguments"]


def build_parser(command: str | None = None) -> CommandParser:
    """The argument parser of every `anomscan` command, or of `command` alone.

    With `command` named, only its module is imported; every other subcommand is its name
    and help line (all that `anomscan --help` and a mistyped command show).
    """
    parser = CommandParser(
        prog="anomscan",
        description="Model-agnostic anomaly search: RMM + autoencoder + bump hunt in 63 spectra.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        if command in (None, name):
            add: Callable[[Subcommands], None] = getattr(
                importlib.import_module(entry.module), entry.adder
            )
            add(commands)
        else:
            add_command(commands, name)
    return parser


def _command_named(words: Sequence[str]) -> str:
    """The subcommand the command line names ("" when it names none: ``anomscan --help``)."""
    first = next((word for word in words if not word.startswith("-")), "")
    return first if first in COMMANDS else ""


def _subcommand(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (the main parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            chosen: argparse.ArgumentParser = action.choices[name]
            return chosen
    return parser


def parse_arguments(words: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; an unknown option exits 2 naming the closest one."""
    parser = build_parser(_command_named(words))
    arguments, extras = parser.parse_known_args(words)
    if extras:
        chosen = _subcommand(parser, getattr(arguments, "command", None))
        if isinstance(chosen, CommandParser):
            chosen.unknown(extras)
        chosen.error(f"unknown argument(s): {' '.join(extras)}")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomscan` console script; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    clear_stop()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigint)

    def command() -> int:
        # Parsing runs guarded too: a fault of the parser itself (a help text argparse can
        # not format) is reported with a log, never as a traceback.
        arguments = parse_arguments(words)
        return int(arguments.handler(arguments))

    status: int = guarded(command, words)
    return status
