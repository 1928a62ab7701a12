"""`anomscan`: the parser assembled from the command groups, SIGTERM, and the exit status.

Each command group (tools, scan, review, reinterp) defines its subcommands and their
functions in its own module; this one only adds them, in the order `anomscan --help` lists
them. Every outcome, parsing included, goes through `agent.errors.guarded`, so a command
ends in at most one stderr line and a known exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from agent.cli.common import SIGTERM_RECEIVED, CommandParser, Subcommands, Terminated
from agent.cli.reinterp import add_acceptance_parser, add_inject_parser, add_limits_parser
from agent.cli.review import (
    add_audit_parser,
    add_export_parser,
    add_replay_parser,
    add_report_parser,
)
from agent.cli.scan import add_demo_parser, add_scan_parser
from agent.cli.tools import (
    add_datasets_parser,
    add_generate_parser,
    add_mcp_parser,
    add_tool_parser,
)
from agent.errors import guarded

__all__ = ["build_parser", "main", "parse_arguments"]

SUBCOMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    add_generate_parser,
    add_tool_parser,
    add_datasets_parser,
    add_scan_parser,
    add_audit_parser,
    add_report_parser,
    add_export_parser,
    add_replay_parser,
    add_demo_parser,
    add_acceptance_parser,
    add_inject_parser,
    add_limits_parser,
    add_mcp_parser,
)
"""The subcommands in the order `anomscan --help` lists them."""


def build_parser() -> CommandParser:
    """The argument parser of every `anomscan` command."""
    parser = CommandParser(
        prog="anomscan",
        description="Model-agnostic anomaly search: RMM + autoencoder + bump hunt in 63 spectra.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(commands)
    return parser


def _subcommand(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (the main parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            chosen: argparse.ArgumentParser = action.choices[name]
            return chosen
    return parser


def parse_arguments(words: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; an unknown option exits 2 naming the closest one."""
    parser = build_parser()
    arguments, extras = parser.parse_known_args(words)
    if extras:
        chosen = _subcommand(parser, getattr(arguments, "command", None))
        if isinstance(chosen, CommandParser):
            chosen.unknown(extras)
        chosen.error(f"unknown argument(s): {' '.join(extras)}")
    return arguments


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM: remember it and stop the command as Ctrl-C does."""
    SIGTERM_RECEIVED.set()
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomscan` console script; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)

    def command() -> int:
        # Parsing runs guarded too: a fault of the parser itself (a help text argparse can
        # not format) is reported with a log, never as a traceback.
        arguments = parse_arguments(words)
        return int(arguments.handler(arguments))

    status: int = guarded(command, words)
    return status
