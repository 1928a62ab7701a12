"""The `anomscan` command line: generate, tool, demo (and later scan, audit, report, replay)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.errors import EXIT_FAILURE, EXIT_INVALID_INPUT, InternalError, guarded
from core.errors import InvalidInputError, OutputError
from core.files import json_text
from core.synth import PAIR_TYPES
from tools.registry import all_tools, get_tool

__all__ = ["EXIT_FAILURE", "EXIT_INVALID_INPUT", "build_parser", "main"]

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


def _print_json(data: Any) -> None:
    try:
        text = json_text(data)
    except OutputError as error:
        raise InternalError(f"the output is not valid JSON: {error}") from error
    print(text)


def _run_tool(name: str, payload: dict[str, Any]) -> int:
    _print_json(get_tool(name).call(payload))
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


def _command_generate(arguments: argparse.Namespace) -> int:
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


def _command_tool(arguments: argparse.Namespace) -> int:
    if arguments.name == "list":
        width = max(len(t.name) for t in all_tools())
        for tool in all_tools():
            print(f"{tool.name:<{width}}  {tool.description}")
        return 0
    tool = get_tool(arguments.name)
    if arguments.schema:
        _print_json(
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
        if not path.is_file():
            raise InvalidInputError(f"input file {path} does not exist; give a JSON file")
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InvalidInputError(
                f"input file {path} is larger than {MAX_INPUT_BYTES} bytes; pass large arrays "
                "as files (paths) instead"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"input file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8 JSON"
            ) from error
    return _run_tool(tool.name, parse_tool_input(text, where))


def _command_datasets(arguments: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from core.datasets import load_manifest, validate_dataset

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


def _command_demo(arguments: argparse.Namespace) -> int:
    from agent.pipeline import run_demo

    return run_demo(
        Path(arguments.output),
        n_events=arguments.events,
        seed=arguments.seed,
        executor=arguments.executor,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `anomscan` command."""
    parser = argparse.ArgumentParser(
        prog="anomscan",
        description="Model-agnostic anomaly search: RMM + autoencoder + bump hunt in 63 spectra.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="write a synthetic NanoAOD-schema sample with injected signals"
    )
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

    tool = commands.add_parser("tool", help="run one tool: JSON in, JSON out ('list' to list)")
    tool.add_argument("name", help="tool name, or 'list'")
    tool.add_argument("--json", help="input as a JSON object")
    tool.add_argument("--input", help="input from a JSON file")
    tool.add_argument("--schema", action="store_true", help="print input/output JSON Schema")
    tool.set_defaults(handler=_command_tool)

    datasets = commands.add_parser("datasets", help="dataset manifests: validate")
    datasets.add_argument("action", choices=["validate"])
    datasets.add_argument("manifest", type=Path, help="manifest TOML")
    datasets.set_defaults(handler=_command_datasets)

    demo = commands.add_parser("demo", help="generate a sample and run the deepest pipeline")
    demo.add_argument("-o", "--output", default="runs/demo", help="run folder")
    demo.add_argument("-n", "--events", type=int, default=100_000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--executor",
        choices=["serial", "ray", "auto"],
        default="auto",
        help="event pass and spectra fan-out: serial, Ray, or auto (Ray for large jobs)",
    )
    demo.set_defaults(handler=_command_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomscan` console script; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    arguments = build_parser().parse_args(words)
    status: int = guarded(lambda: int(arguments.handler(arguments)), words)
    return status


if __name__ == "__main__":
    sys.exit(main())
