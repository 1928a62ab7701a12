"""The reinterpretation commands: `acceptance`, `inject` and `limits` on a finished scan.

Each reads a run folder and writes its outputs beside the run's own (RUN/acceptance/,
RUN/injection/, RUN/limits.json); the run's results are never changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.cli.common import add_run_command, canonical_spectrum, progress_bar
from agent.cli.parser import Subcommands
from agent.reinterp import InjectionRequest, run_acceptance, run_injection
from agent.scan import low_count_text, parse_widths, run_limits
from agent.scan.blinding import check_unblinded
from core.anomaly import point_text
from core.events import SCHEMA_NAMES
from core.synth import EXTRA_TYPES

__all__ = ["add_acceptance_parser", "add_inject_parser", "add_limits_parser"]


def _command_acceptance(arguments: argparse.Namespace) -> int:
    """`anomscan acceptance RUN FILES...`: a signal sample through the run's AE and AR cuts."""
    output = run_acceptance(
        Path(arguments.run),
        list(arguments.files),
        schema=arguments.schema,
        name=arguments.name or "",
        tree=arguments.tree,
        mapping=arguments.mapping,
    )
    # one row per AR point and one column per stream: 8 columns fit any terminal, however
    # many points the run scanned
    streams = list(dict.fromkeys(row["stream"] for row in output["streams"]))
    cells = {(r["point_pb"], r["stream"]): r for r in output["streams"]}
    table = Table(title=f"acceptance of {output['name']} ({output['n_events']} events)")
    table.add_column("AR pb", justify="right", no_wrap=True)
    for stream in streams:
        table.add_column(stream, justify="right", no_wrap=True)
    for point in output["points_pb"]:
        table.add_row(
            point_text(point),
            *(
                f"{cells[point, stream]['acceptance']:.3f}"
                + ("*" if cells[point, stream]["whole_stream"] else "")
                for stream in streams
            ),
        )
    Console().print(table)
    print("* the whole stream (the AR holds every event of the stream at that point)")
    print(f"acceptance: {output['json_path']} and {output['csv_path']}")
    return 0


def add_acceptance_parser(commands: Subcommands) -> None:
    """The `acceptance` subcommand."""
    acceptance = add_run_command(
        commands,
        "acceptance",
        run_help="run folder of a finished scan",
    )
    acceptance.add_argument("files", nargs="+", help="ROOT files of the signal sample")
    acceptance.add_argument("--schema", default="auto", choices=SCHEMA_NAMES)
    acceptance.add_argument("--name", help="output name (RUN/acceptance/NAME.json)")
    acceptance.add_argument("--tree", help="tree name (default: auto)")
    acceptance.add_argument("--mapping", help="column-mapping TOML for --schema mapping")
    acceptance.set_defaults(handler=_command_acceptance)


def _parse_floats(text: str) -> tuple[float, ...]:
    """Parse comma-separated numbers (``0.02,0.05,0.1``)."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers, e.g. 0.02,0.05,0.1"
        ) from error


def _parse_extra(text: str) -> dict[str, int]:
    """Parse extra objects per signal event (``photons=1,electrons=1``)."""
    extra: dict[str, int] = {}
    for part in text.split(","):
        kind, _, count = part.partition("=")
        if kind not in EXTRA_TYPES or not count.isdigit():
            raise argparse.ArgumentTypeError(
                f"--extra {text!r}: expected KIND=N[,KIND=N] with KIND one of {EXTRA_TYPES}, "
                "e.g. photons=1,electrons=1"
            )
        extra[kind] = int(count)
    return extra


def _command_inject(arguments: argparse.Namespace) -> int:
    """`anomscan inject RUN --pair P --mass M --width W --xsec X,...`: injection and recovery."""
    check_unblinded(Path(arguments.run), "an injection (its recovery sees the data)")
    request = InjectionRequest(
        pair=arguments.pair,
        mass=arguments.mass,
        width=arguments.width,
        xsec_pb=arguments.xsec,
        streams=None if not arguments.stream else tuple(arguments.stream),
        toys=arguments.toys,
        seed=arguments.seed,
        extra=arguments.extra or {},
        executor=arguments.executor,
        name=arguments.name or "",
        background=arguments.background,
        rule_toys=arguments.rule_toys,
    )
    with progress_bar("injecting and re-analysing") as advance:
        output = run_injection(Path(arguments.run), request, progress=advance)
    for summary in output["strengths"]:
        print(summary["text"])
    gains = [row for row in output["sensitivity"] if row["dz_percent"] is not None]
    for row in gains:
        print(
            f"  {row['spectrum']} @ {point_text(row['point_pb'])} pb, {row['xsec_pb']:g} pb: "
            "expected Z "
            f"{row['z_ae']:.2f} with the AE cut, {row['z_whole_stream']:.2f} whole stream, "
            f"dZ = {row['dz_percent']:+.0f} %"
        )
    print(f"injection: {output['json_path']} (plot {output['plots']['linearity']})")
    print(f"sensitivity of every injection of the run: {Path(arguments.run) / 'sensitivity.json'}")
    return 0


def add_inject_parser(commands: Subcommands) -> None:
    """The `inject` subcommand."""
    inject = add_run_command(
        commands,
        "inject",
        run_help="run folder of a finished scan",
    )
    inject.add_argument("--pair", required=True, help="e.g. jm")
    inject.add_argument("--mass", required=True, type=float, help="GeV")
    inject.add_argument(
        "--width",
        type=float,
        default=0.0,
        help="intrinsic width / mass (0: detector resolution; sigma = resolution (+) w m)",
    )
    inject.add_argument(
        "--xsec", required=True, type=_parse_floats, help="injected cross-sections, pb: a,b,c"
    )
    inject.add_argument("--stream", action="append", help="stream to analyse (repeatable)")
    inject.add_argument("--toys", type=int, default=1, help="injections per cross-section")
    inject.add_argument("--seed", type=int, default=0)
    inject.add_argument("--extra", type=_parse_extra, help="extra objects, e.g. photons=1")
    inject.add_argument("--executor", choices=["serial", "ray", "auto"], default="serial")
    inject.add_argument("--name", help="output name (RUN/injection/NAME.json)")
    inject.add_argument(
        "--background",
        choices=["fit", "data"],
        default="fit",
        help="toys' background: fit = a Poisson draw of the run's accepted background "
        "prediction per toy (default), data = the run's data in every toy",
    )
    inject.add_argument(
        "--rule-toys",
        type=int,
        help="rerun the scan's rule (choice, checks, bump hunt) in the first N toys only "
        "(default: all); the run's function and background are refitted in every toy",
    )
    inject.set_defaults(handler=_command_inject)


def _command_limits(arguments: argparse.Namespace) -> int:
    """`anomscan limits RUN`: 95 % CL limits on Gaussian signals, RUN/limits.json and .csv."""
    run_dir = Path(arguments.run)
    widths = parse_widths(arguments.widths)
    with progress_bar("setting limits (every accepted spectrum and point, one pass)"):
        outcome = run_limits(
            run_dir,
            spectrum=None if arguments.spectrum is None else canonical_spectrum(arguments.spectrum),
            widths=widths,
            method=arguments.method,
        )
    print(
        f"{outcome.n_limits} limits in {outcome.n_curves} curves -> {outcome.json_path}, "
        f"{outcome.csv_path}"
        + (f"; plots in {outcome.plots[0].parent}" if outcome.plots else "")
        + f"\n{low_count_text(outcome.n_low_count, outcome.n_counting)}"
    )
    return 0


def add_limits_parser(commands: Subcommands) -> None:
    """The `limits` subcommand."""
    limits = add_run_command(
        commands,
        "limits",
    )
    limits.add_argument("--spectrum", help="only this spectrum, e.g. T2/jm")
    limits.add_argument(
        "--widths", default="0,5,10,15", help="signal widths, percent of the mass (0: resolution)"
    )
    limits.add_argument(
        "--method",
        choices=["auto", "asymptotic", "poisson", "pyhf"],
        default="auto",
        help="auto: exact CLs of the window count below 5 background events, asymptotic "
        "above; asymptotic, poisson: one of them for every limit; pyhf: the reference",
    )
    limits.set_defaults(handler=_command_limits)
