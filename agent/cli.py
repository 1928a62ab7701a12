"""The `anomscan` command line: generate, tool, demo (and later scan, audit, report, replay)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.errors import AnomscanError
from core.synth import PAIR_TYPES
from tools.registry import all_tools, get_tool

EXIT_INVALID_INPUT = 2
EXIT_FAILURE = 1


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
    print(json.dumps(data, indent=2, default=str))


def _run_tool(name: str, payload: dict[str, Any]) -> int:
    try:
        result = get_tool(name).call(payload)
    except ValidationError as error:
        print(f"invalid input for tool {name!r}:\n{error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    _print_json(result)
    return 0


def _command_generate(arguments: argparse.Namespace) -> int:
    payload = {
        "output_dir": str(arguments.output),
        "n_events": arguments.events,
        "seed": arguments.seed,
        "lumi_pb": arguments.lumi,
        "signals": arguments.signal or [],
        "events_per_file": arguments.events_per_file,
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
        print("give either --json or --input, not both", file=sys.stderr)
        return EXIT_INVALID_INPUT
    text = arguments.json if arguments.json is not None else "{}"
    if arguments.input is not None:
        path = Path(arguments.input)
        if not path.is_file():
            print(f"input file {path} does not exist", file=sys.stderr)
            return EXIT_INVALID_INPUT
        text = path.read_text()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        print(f"tool input is not valid JSON: {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    if not isinstance(payload, dict):
        print("tool input must be a JSON object", file=sys.stderr)
        return EXIT_INVALID_INPUT
    return _run_tool(tool.name, payload)


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


def _command_mcp(arguments: argparse.Namespace) -> int:
    from agent.mcp_server import serve_stdio

    return serve_stdio(arguments.root)


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

    mcp = commands.add_parser("mcp", help="serve the tools over the Model Context Protocol (stdio)")
    mcp.add_argument("--root", type=Path, help="confine every path in a tool input to this folder")
    mcp.set_defaults(handler=_command_mcp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomscan` console script; returns the exit status."""
    arguments = build_parser().parse_args(argv)
    try:
        status: int = arguments.handler(arguments)
    except AnomscanError as error:
        print(f"anomscan: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return status


if __name__ == "__main__":
    sys.exit(main())
