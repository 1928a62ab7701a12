"""The tool commands: `tool`, `generate`, `datasets` and `mcp`.

`anomscan tool NAME` runs one registered tool, JSON in and JSON out, validated by the same
pydantic model as the scan and the MCP server use; `generate` is the `generate_sample` tool
with options. A tool input is read whole into memory, so it is capped (`MAX_INPUT_BYTES`):
big arrays travel as files referenced by path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.cli.common import print_json
from agent.cli.parser import Subcommands, add_command
from agent.mcp_server import serve_stdio
from core.datasets import load_manifest, validate_dataset
from core.errors import InvalidInputError
from core.synth import PAIR_TYPES
from tools.registry import all_tools, get_tool

__all__ = [
    "MAX_INPUT_BYTES",
    "add_datasets_parser",
    "add_generate_parser",
    "add_mcp_parser",
    "add_tool_parser",
    "parse_tool_input",
]

MAX_INPUT_BYTES = 10_000_000
"""Largest tool input (--json or --input) the command line reads."""


def _parse_signal(text: str) -> dict[str, Any]:
    """Parse ``PAIR:MASS:WIDTH:N`` (or ``PAIR:MASS:WIDTH:XSECpb``) into a signal input."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in PAIR_TYPES:
        raise argparse.ArgumentTypeError(
            f"signal {text!r}: expected PAIR:MASS:WIDTH:N with PAIR one of {list(PAIR_TYPES)}, "
            "e.g. jm:2000:40:400 or jm:2000:40:0.5pb"
        )
    pair, mass, width, size = parts
    signal: dict[str, Any] = {"pair": pair, "mass": float(mass), "width": float(width)}
    if size.endswith("pb"):
        signal["xsec_pb"] = float(size.removesuffix("pb"))
    else:
        signal["n_events"] = int(size)
    return signal


def _run_tool(name: str, payload: dict[str, Any]) -> int:
    """Run tool `name` on `payload`, print its output, and note non-finite values on stderr."""
    output = get_tool(name).call(payload)
    print_json(output)
    if output.get("non_finite") or output.get("dropped_non_finite"):
        values = output.get("non_finite") or {}
        dropped = output.get("dropped_non_finite") or {}
        print(
            "anomscan: note: non-finite values read ("
            + (", ".join(f"{n} in {branch}" for branch, n in values.items()) or "none")
            + "); dropped "
            + (", ".join(f"{n} {what}" for what, n in dropped.items()) or "nothing")
            + " (see 'notes' in the output)",
            file=sys.stderr,
        )
    return 0


def parse_tool_input(text: str, where: str) -> dict[str, Any]:
    """The JSON object of a tool input; InvalidInputError says what is wrong with it."""
    if len(text) > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"tool input from {where} is {len(text)} characters, more than {MAX_INPUT_BYTES}; "
            "pass large arrays as files (paths) instead"
        )
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"tool input from {where} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise InvalidInputError(
            f"tool input from {where} is nested too deeply to read; flatten it"
        ) from error
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise InvalidInputError(f"tool input from {where} can not be read: {error}") from error
    if not isinstance(payload, dict):
        raise InvalidInputError(
            f"tool input from {where} must be a JSON object, got {type(payload).__name__}"
        )
    return payload


def _read_input_file(path: Path) -> str:
    """The text of an --input file: a regular UTF-8 file of at most `MAX_INPUT_BYTES`."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise InvalidInputError(f"input file {path} {what}; give a JSON file")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"input file {path} is larger than {MAX_INPUT_BYTES} bytes; pass large arrays "
            "as files (paths) instead"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"input file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8 JSON"
        ) from error


def _command_tool(arguments: argparse.Namespace) -> int:
    """`anomscan tool NAME`: list the tools, print a tool's schemas, or run it on JSON."""
    if arguments.name == "list":
        width = max(len(t.name) for t in all_tools())
        for tool in all_tools():
            print(f"{tool.name:<{width}}  {tool.description}")
        return 0
    tool = get_tool(arguments.name)
    if arguments.schema:
        print_json(
            {
                "input": tool.input_model.model_json_schema(),
                "output": tool.output_model.model_json_schema(),
            }
        )
        return 0
    if arguments.json is not None and arguments.input is not None:
        raise InvalidInputError("give either --json or --input, not both")
    text, where = (arguments.json, "--json") if arguments.json is not None else ("{}", "--json")
    if arguments.input is not None:
        path = Path(arguments.input)
        where = f"--input {path}"
        text = _read_input_file(path)
    return _run_tool(tool.name, parse_tool_input(text, where))


def add_tool_parser(commands: Subcommands) -> None:
    """The `tool` subcommand."""
    tool = add_command(commands, "tool")
    tool.add_argument("name", help="tool name, or 'list'")
    tool.add_argument("--json", help="input as a JSON object")
    tool.add_argument("--input", help="input from a JSON file")
    tool.add_argument("--schema", action="store_true", help="print input/output JSON Schema")
    tool.set_defaults(handler=_command_tool)


def _command_generate(arguments: argparse.Namespace) -> int:
    """`anomscan generate -o DIR`: the `generate_sample` tool with the command's options."""
    payload = {
        "output_dir": str(arguments.output),
        "n_events": arguments.events,
        "seed": arguments.seed,
        "lumi_pb": arguments.lumi,
        "signals": arguments.signal or [],
        "events_per_file": arguments.events_per_file,
        "progress": sys.stderr.isatty(),
    }
    return _run_tool("generate_sample", payload)


def add_generate_parser(commands: Subcommands) -> None:
    """The `generate` subcommand."""
    generate = add_command(commands, "generate")
    generate.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    generate.add_argument("-n", "--events", type=int, default=100_000, help="background events")
    generate.add_argument("--seed", type=int, default=1)
    generate.add_argument("--lumi", type=float, default=1000.0, help="nominal lumi in pb^-1")
    generate.add_argument("--events-per-file", type=int, default=1_000_000)
    generate.add_argument(
        "--signal",
        action="append",
        type=_parse_signal,
        help="PAIR:MASS:WIDTH:N or PAIR:MASS:WIDTH:XSECpb (GeV), repeatable",
    )
    generate.set_defaults(handler=_command_generate)


def _command_datasets(arguments: argparse.Namespace) -> int:
    """`anomscan datasets validate MANIFEST`: one table of file checks per dataset."""
    datasets = load_manifest(arguments.manifest)
    console = Console()
    for dataset in datasets.values():
        reports = validate_dataset(dataset)
        table = Table(
            title=f"{dataset.name}: {dataset.kind}, {dataset.lumi_pb:g} pb^-1, "
            f"sqrt(s) = {dataset.sqrt_s:g} GeV"
        )
        for column in ("file", "schema", "events", "MB", "in good runs", "notes"):
            table.add_column(column)
        for report in reports:
            table.add_row(
                report.path,
                report.schema,
                str(report.entries),
                "-" if report.size_bytes is None else f"{report.size_bytes / 1e6:.1f}",
                "-" if report.in_good_runs is None else str(report.in_good_runs),
                "; ".join(report.notes),
            )
        console.print(table)
    console.print(f"[green]{len(datasets)} dataset(s) valid[/green]")
    return 0


def add_datasets_parser(commands: Subcommands) -> None:
    """The `datasets` subcommand."""
    datasets = add_command(commands, "datasets")
    datasets.add_argument("action", choices=["validate"])
    datasets.add_argument("manifest", type=Path, help="manifest TOML")
    datasets.set_defaults(handler=_command_datasets)


def _command_mcp(arguments: argparse.Namespace) -> int:
    """`anomscan mcp`: serve the tools over MCP on stdin/stdout."""
    return serve_stdio(arguments.root)


def add_mcp_parser(commands: Subcommands) -> None:
    """The `mcp` subcommand."""
    mcp = add_command(commands, "mcp")
    mcp.add_argument("--root", type=Path, help="confine every path in a tool input to this folder")
    mcp.set_defaults(handler=_command_mcp)
