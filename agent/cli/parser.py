"""The parser every command shares, and the table of commands: name, help, where it lives.

`anomscan --help` and a mistyped command need only the names and one line of help each,
so the table says where each command's module is and `agent.cli.main` imports only the
module of the command that runs (importing every command group loads the whole scan
stack: LangGraph, scipy, SQLite, about 2 s).

- `CommandParser` turns argparse's usage block into one line pointing at ``--help`` (exit
  2) and names the closest choice or option to a mistyped one.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from agent.errors import EXIT_INVALID_INPUT

__all__ = ["COMMANDS", "Command", "CommandParser", "Subcommands", "add_command"]


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


@dataclass(frozen=True)
class Command:
    """One subcommand: its line in ``--help``, and the module and function that add it."""

    help: str
    module: str
    adder: str


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "write a synthetic NanoAOD-schema sample with injected signals",
        "agent.cli.tools",
        "add_generate_parser",
    ),
    "tool": Command(
        "run one tool: JSON in, JSON out ('list' to list)", "agent.cli.tools", "add_tool_parser"
    ),
    "datasets": Command("dataset manifests: validate", "agent.cli.tools", "add_datasets_parser"),
    "scan": Command(
        "the autonomous scan (no DATA: built-in sample)", "agent.cli.scan", "add_scan_parser"
    ),
    "audit": Command(
        "decisions of a run as a table (--why SPECTRUM POINT: one spectrum's story); "
        "`audit verify RUN`; `audit export RUN`; `audit plan RUN`; `audit annotate RUN SEQ ...`",
        "agent.cli.review",
        "add_audit_parser",
    ),
    "report": Command(
        "static HTML report of a run (RUN/report/)", "agent.cli.review", "add_report_parser"
    ),
    "unblind": Command(
        "release a blinded scan's sealed results, on record (--by NAME)",
        "agent.cli.review",
        "add_unblind_parser",
    ),
    "export": Command(
        "export a run (HEPData submission YAML)", "agent.cli.review", "add_export_parser"
    ),
    "replay": Command(
        "re-run every logged tool call, report differences",
        "agent.cli.review",
        "add_replay_parser",
    ),
    "demo": Command(
        "the scan on a freshly generated synthetic sample", "agent.cli.scan", "add_demo_parser"
    ),
    "acceptance": Command(
        "acceptance of a signal sample through a run's autoencoder and ARs",
        "agent.cli.reinterp",
        "add_acceptance_parser",
    ),
    "inject": Command(
        "inject generated signal into a copy of a run's events and recover it",
        "agent.cli.reinterp",
        "add_inject_parser",
    ),
    "limits": Command(
        "95 %% CL CLs limits on Gaussian signals of a finished scan (RUN/limits.json)",
        "agent.cli.reinterp",
        "add_limits_parser",
    ),
    "mcp": Command(
        "serve the tools over the Model Context Protocol (stdio)",
        "agent.cli.tools",
        "add_mcp_parser",
    ),
}
"""Every subcommand, in the order `anomscan --help` lists them."""


def add_command(commands: Subcommands, name: str, **options: Any) -> CommandParser:
    """The parser of subcommand `name`, with its help line from `COMMANDS`."""
    parser: CommandParser = commands.add_parser(name, help=COMMANDS[name].help, **options)
    return parser
