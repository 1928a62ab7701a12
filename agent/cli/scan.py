"""The scan commands: `scan` (new or `--resume`) and `demo`, and their table of excesses.

A failed scan ends in one line and exit 2 for an anticipated fault of its inputs or run
folder (`SCAN_INPUT_ERRORS`), else 1. A resumed scan keeps the config it was started with,
so options that would change it are refused with --resume (`RESUME_KEEPS` lists the ones
that may be given). A new scan stopped before it did any work leaves no folder behind,
so the same --out can be used again; once it holds work, `--resume` continues it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from agent.cli.parser import CommandParser, Subcommands, add_command
from agent.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_INVALID_INPUT
from agent.runtime.audit import open_readonly
from agent.scan import (
    ScanConfig,
    distinct_excesses,
    read_config,
    resolve_inputs,
    run_scan,
)
from agent.stop import EXIT_TERMINATED, was_terminated
from core.anomaly import point_text
from core.errors import AnomscanError, InvalidInputError
from core.synth import load_truth

__all__ = ["RESUME_KEEPS", "SCAN_INPUT_ERRORS", "add_demo_parser", "add_scan_parser"]

SCAN_INPUT_ERRORS = (
    "InvalidInputError",
    "ModelError",
    "AuditError",
    "InputFileError",
    "SchemaError",
    "OutputError",
)
"""Anticipated faults of a scan's inputs or run folder: one line, exit status 2."""

RESUME_KEEPS = frozenset({"resume", "quiet", "handler", "command"})
"""Options that may be given with --resume: the rest would change the run and are refused."""

_OPTION_NAMES = {"data": "DATA", "llm_timeout_s": "--llm-timeout"}


def _scan_error(error: AnomscanError) -> int:
    """One line for a failed scan; 2 for bad input or an unwritable run folder, else 1."""
    anticipated = any(cls.__name__ in SCAN_INPUT_ERRORS for cls in type(error).__mro__)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"anomscan scan: {first}", file=sys.stderr)
    return EXIT_INVALID_INPUT if anticipated else EXIT_FAILURE


def _points_text(excess: dict[str, Any]) -> str:
    """The AR points where a distinct excess appears: their range (pb) and number."""

    def short(pb: float) -> str:
        return f"{pb:.2g}" if pb < 10 else f"{pb:.0f}"

    points = excess["points_pb"]
    if len(points) == 1:
        return f"{short(points[0])} (1)"
    return f"{short(points[0])}-{short(points[-1])} ({len(points)})"


def _excess_table(distinct: list[dict[str, Any]]) -> Table:
    """One row per distinct excess: its best AR point, the points it appears at, its Z."""
    table = Table(
        title="largest local excesses (BumpHunter against the accepted background): one row "
        "per spectrum and window, at its best AR point, and the AR points where it appears"
    )
    columns = ("spectrum", "AR pb", "seen at pb", "function", "window GeV", "data", "bkg")
    for column in (*columns, "Z loc", "Z glob"):
        table.add_column(
            column, justify="left" if column in ("spectrum", "function") else "right", no_wrap=True
        )
    for excess in distinct:
        low, high = excess["window_gev"]
        table.add_row(
            excess["spectrum"],
            point_text(excess["xsec_pb"]),
            _points_text(excess),
            str(excess["function"])[:24],
            f"{low:.0f}-{high:.0f}",
            f"{excess['data']:.0f}",
            f"{excess['background']:.1f}",
            f"{excess['local_z']:.2f}",
            f"{excess['global_z']:.2f}",
        )
    return table


def _print_excesses(results: dict[str, Any], top: int = 10) -> None:
    """The `top` distinct excesses of a scan's results, its scan-wide Z and its counts."""
    console = Console() if sys.stdout.isatty() else Console(width=110)  # a file or pipe
    if results.get("blinded"):
        lee = results["look_elsewhere"] or {}
        console.print(
            f"blinded scan: {len(results['points_pb'])} AR points, "
            f"{len(results['backgrounds'])} (spectrum, point) backgrounds accepted, "
            f"{len(results['skipped'])} skipped, {lee.get('n_tests', 0)} tests in the "
            "scan-wide look-elsewhere; the excesses are sealed in "
            f"{results['blinded']['sealed']} until `anomscan unblind RUN --by NAME`"
        )
        return
    distinct = distinct_excesses(results["excesses"])
    console.print(_excess_table(distinct[:top]))
    if results["scan_global_z"] is not None:
        lee = results["look_elsewhere"]
        console.print(
            f"scan-wide: largest excess {lee['best']['spectrum']} at "
            f"{point_text(lee['best']['cross_section_pb'])} pb, local Z = {lee['local_z']:.2f}, "
            f"scan-global Z = {results['scan_global_z']:.2f}"
            f"{' (lower limit)' if results['scan_global_z_is_lower_limit'] else ''} "
            f"({lee['n_pseudo_scans']} pseudo-scans)"
        )
    console.print(
        f"{len(results['points_pb'])} AR points, {len(distinct)} distinct excesses in "
        f"{len(results['excesses'])} (spectrum, point) rows, {len(results['skipped'])} skipped"
    )


def _llm_fields(arguments: argparse.Namespace) -> dict[str, Any]:
    """The scan config's policy fields (the API key stays in the environment)."""
    fields: dict[str, Any] = {"policy": getattr(arguments, "policy", "rules")}
    for name in ("base_url", "model", "timeout_s", "max_rejections", "max_calls", "max_tokens"):
        value = getattr(arguments, f"llm_{name}", None)
        if value is not None:
            fields[f"llm_{name}"] = value
    return fields


def _scan_config(arguments: argparse.Namespace) -> ScanConfig:
    """The config of a new scan; an invalid option is one line naming it."""
    out = arguments.out or f"runs/scan-{time.strftime('%Y%m%d-%H%M%S')}"
    fields: dict[str, Any] = {
        "data": list(arguments.data),
        "manifest": arguments.manifest,
        "lumi_pb": arguments.lumi_pb,
        "run_dir": str(Path(out).resolve()),
        "points_per_decade": arguments.points_per_decade,
        "budget_minutes": arguments.budget_minutes,
        "max_points": arguments.max_points,
        "executor": arguments.executor,
        "seed": arguments.seed,
        "model": None if arguments.model is None else str(Path(arguments.model).resolve()),
        "events": arguments.events,
        "epochs": arguments.epochs,
        "gof_toys": arguments.gof_toys,
        **({"limits": True} if getattr(arguments, "limits", False) else {}),
        **({"blind": True} if getattr(arguments, "blind", False) else {}),
        **_llm_fields(arguments),
    }
    if arguments.xsec_range is not None:
        fields["xsec_range"] = tuple(arguments.xsec_range)
    try:
        return ScanConfig.model_validate(fields)
    except ValidationError as error:
        problem = error.errors()[0]
        names = [str(p) for p in problem["loc"] if not isinstance(p, int)]
        if not names:  # a rule between options: its message names them
            raise InvalidInputError(str(problem["msg"]).removeprefix("Value error, ")) from error
        raise InvalidInputError(
            f"--{'-'.join(names)}".replace("_", "-")
            + f": {problem['msg']} (given {problem.get('input')!r})"
        ) from error


def _scan_defaults() -> dict[str, Any]:
    """The arguments of a bare `anomscan scan`: every option at its default."""
    parser = CommandParser(prog="anomscan")
    add_scan_parser(parser.add_subparsers(dest="command", required=True))
    return vars(parser.parse_args(["scan"]))


def _changed_on_resume(arguments: argparse.Namespace) -> list[str]:
    """The scan options given with --resume (a resumed run keeps its recorded config)."""
    defaults = _scan_defaults()
    return [
        _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
        for name, value in vars(arguments).items()
        if name not in RESUME_KEEPS and name in defaults and value != defaults[name]
    ]


def _resume_scan(arguments: argparse.Namespace) -> Any:
    """Continue the scan in --resume RUN_DIR with its recorded config."""
    changed = _changed_on_resume(arguments)
    if changed:
        raise InvalidInputError(
            f"{', '.join(changed)} given with --resume: a resumed scan keeps the config "
            f"it was started with ({Path(arguments.resume) / 'config.json'}); drop "
            "the option, or start a new scan with another --out"
        )
    return run_scan(
        read_config(Path(arguments.resume)), resume=True, show_progress=not arguments.quiet
    )


def _stopped(stop: KeyboardInterrupt, folder: Path) -> int:
    """Say where a stopped scan's work is kept; 143 after SIGTERM, else 130."""
    how = "terminated" if was_terminated(stop) else "interrupted"
    if not folder.is_dir() or not (folder / "config.json").is_file():
        print(f"anomscan scan: {how} before the run folder was made", file=sys.stderr)
    else:
        print(
            f"anomscan scan: {how}; {folder} keeps every completed step: continue "
            f"with `anomscan scan --resume {folder}`",
            file=sys.stderr,
        )
    return EXIT_TERMINATED if was_terminated(stop) else EXIT_INTERRUPTED


def _scan(arguments: argparse.Namespace) -> tuple[int, Any]:
    """Run a new or resumed scan: its exit status and outcome (None when it failed)."""
    config: Any = None
    try:
        if arguments.resume is not None:
            outcome = _resume_scan(arguments)
        else:
            config = _scan_config(arguments)
            resolve_inputs(config)
            outcome = _new_scan(config, show_progress=not arguments.quiet)
    except AnomscanError as error:
        return _scan_error(error), None
    except KeyboardInterrupt as stop:
        folder = Path(arguments.resume or (config.run_dir if config is not None else ""))
        return _stopped(stop, folder), None
    return 0, outcome


def _new_scan(config: ScanConfig, *, show_progress: bool) -> Any:
    """A new scan; a folder it made and that holds no tool call yet is removed on failure.

    A scan refused before it did any work (bad input found by the first node) leaves
    nothing that would block the same --out; once it has work in its folder, the folder
    stays and `anomscan scan --resume` continues it after the cause is fixed.
    """
    folder = Path(config.run_dir)
    existed = folder.exists()
    try:
        return run_scan(config, show_progress=show_progress)
    except AnomscanError:
        if not existed and folder.is_dir() and not _holds_work(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _holds_work(folder: Path) -> bool:
    """Whether a run folder's audit log has a tool call or a decision (work to resume)."""
    log = folder / "audit.sqlite"
    if not log.is_file():
        return False
    try:
        db = open_readonly(log)
    except AnomscanError:
        return True  # unreadable now (a folder made read-only mid-write): keep it
    try:
        return any(
            db[table].exists() and db[table].count > 0 for table in ("tool_calls", "decisions")
        )
    finally:
        db.close()


def _print_run_folder(run_dir: Path) -> None:
    """The closing lines of a scan: where its run folder and audit log are."""
    print(f"run folder: {run_dir}")
    print(f"audit: {run_dir / 'audit.sqlite'} (anomscan audit {run_dir})")


def _command_scan(arguments: argparse.Namespace) -> int:
    """`anomscan scan`: the autonomous scan, then its table of excesses."""
    status, outcome = _scan(arguments)
    if outcome is None:
        return status
    _print_excesses(outcome.results)
    for note in outcome.results.get("input_notes") or []:
        print(f"inputs: {note}")
    _print_run_folder(outcome.run_dir)
    return status


def add_scan_parser(commands: Subcommands) -> None:
    """The `scan` subcommand."""
    scan = add_command(commands, "scan")
    scan.add_argument("data", nargs="*", help="ROOT files or globs")
    scan.add_argument("--manifest", help="dataset manifest (TOML) with files and lumi_pb")
    scan.add_argument("--lumi-pb", type=float, help="integrated luminosity, pb^-1")
    scan.add_argument("--out", help="run folder (default runs/scan-DATE-TIME)")
    scan.add_argument("--points-per-decade", type=int, default=4)
    scan.add_argument("--xsec-range", nargs=2, type=float, metavar=("LO", "HI"), help="pb")
    scan.add_argument("--budget-minutes", type=float)
    scan.add_argument("--max-points", type=int, help="AR point budget (default grid + 6)")
    scan.add_argument("--executor", choices=["ray", "process", "serial", "auto"], default="auto")
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped scan")
    scan.add_argument("--model", help="a trained autoencoder (.onnx with its card)")
    scan.add_argument("--events", type=int, help="built-in sample size (default 100000)")
    scan.add_argument("--epochs", type=int, default=30, help="autoencoder training epochs")
    scan.add_argument(
        "--gof-toys", type=int, default=1000, help="goodness-of-fit toys per fit (sparse bins)"
    )
    scan.add_argument("--quiet", action="store_true", help="no progress display")
    scan.add_argument("--limits", action="store_true", help="set 95 %% CL limits as the last step")
    scan.add_argument(
        "--blind",
        action="store_true",
        help="withhold what reveals the data in the search windows (counts, Z, excesses) "
        "from results.json, the terminal and the report until `anomscan unblind RUN --by ME`",
    )
    scan.add_argument("--policy", choices=["rules", "llm"], default="rules")
    scan.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (ANOMSCAN_LLM_BASE_URL)")
    scan.add_argument("--llm-model", help="chat model (ANOMSCAN_LLM_MODEL)")
    scan.add_argument("--llm-timeout", dest="llm_timeout_s", type=float, help="s per request")
    scan.add_argument("--llm-max-rejections", type=int, help="refusals sent back per decision")
    scan.add_argument("--llm-max-calls", type=int, help="LLM requests per scan")
    scan.add_argument("--llm-max-tokens", type=int, help="LLM tokens per scan")
    scan.set_defaults(handler=_command_scan)


def _truth_text(signal: dict[str, Any], excesses: list[dict[str, Any]]) -> str:
    """Whether an injected signal is among the excesses: its strongest one within 3 widths."""
    spec = signal["spec"]
    hits = [
        e
        for e in excesses
        if e["spectrum"].endswith("/" + spec["pair"])
        and e["window_gev"][0] - spec["width"] * 3
        <= spec["mass"]
        <= e["window_gev"][1] + spec["width"] * 3
    ]
    best = max(hits, key=lambda e: e["local_z"], default=None)
    return f"{signal['label']}: " + (
        f"found in {best['spectrum']} at {point_text(best['xsec_pb'])} pb, "
        f"local Z {best['local_z']:.1f}"
        if best
        else "not among the excesses"
    )


def _demo_arguments(arguments: argparse.Namespace) -> None:
    """Set the scan options `demo` does not offer to the scan's defaults on the built-in sample."""
    arguments.data = []
    arguments.manifest = None
    arguments.lumi_pb = None
    arguments.out = arguments.output
    arguments.resume = None
    arguments.model = None
    arguments.xsec_range = None
    arguments.budget_minutes = None
    arguments.max_points = None
    arguments.epochs = 30
    arguments.gof_toys = 1000
    arguments.quiet = False


def _command_demo(arguments: argparse.Namespace) -> int:
    """The scan on the built-in sample, closing with a comparison against its truth."""
    _demo_arguments(arguments)
    if Path(arguments.out, "config.json").exists():
        shutil.rmtree(arguments.out)
    status, outcome = _scan(arguments)
    if outcome is None:
        return status
    _print_excesses(outcome.results, top=8)
    truth = load_truth(outcome.run_dir / "data" / "truth.json")["truth"]
    assert isinstance(truth, list)
    found = [_truth_text(signal, outcome.results["excesses"]) for signal in truth]
    print("injected (truth.json, read only here): " + "; ".join(found))
    _print_run_folder(outcome.run_dir)
    return status


def add_demo_parser(commands: Subcommands) -> None:
    """The `demo` subcommand."""
    demo = add_command(commands, "demo")
    demo.add_argument("-o", "--output", default="runs/demo", help="run folder")
    demo.add_argument("-n", "--events", type=int, default=100_000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--points-per-decade", type=int, default=4)
    demo.add_argument(
        "--executor",
        choices=["serial", "process", "ray", "auto"],
        default="auto",
        help="event pass and spectra fan-out: serial, processes, Ray, or auto",
    )
    demo.set_defaults(handler=_command_demo)
