"""The `anomscan` command line: generate, tool, datasets, scan, audit, report, export, ...."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from agent.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    InternalError,
    guarded,
)
from core.anomaly import point_text
from core.errors import AnomscanError, InvalidInputError, OutputError
from core.files import atomic_path, json_text
from core.masses import SPECTRUM_NAMES
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
    output = get_tool(name).call(payload)
    _print_json(output)
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
            what = "is not a regular file" if path.exists() else "does not exist"
            raise InvalidInputError(f"input file {path} {what}; give a JSON file")
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


SCAN_INPUT_ERRORS = (
    "InvalidInputError",
    "ModelError",
    "AuditError",
    "InputFileError",
    "SchemaError",
    "OutputError",
)
"""Anticipated faults of a scan's inputs or run folder: one line, exit status 2."""


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


def _print_excesses(results: dict[str, Any], top: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    from agent.scan import distinct_excesses

    console = Console() if sys.stdout.isatty() else Console(width=110)  # a file or pipe
    distinct = distinct_excesses(results["excesses"])
    table = Table(
        title="largest local excesses (BumpHunter against the accepted background): one row "
        "per spectrum and window, at its best AR point, and the AR points where it appears"
    )
    columns = ("spectrum", "AR pb", "seen at pb", "function", "window GeV", "data", "bkg")
    for column in (*columns, "Z loc", "Z glob"):
        table.add_column(
            column, justify="left" if column in ("spectrum", "function") else "right", no_wrap=True
        )
    for excess in distinct[:top]:
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
    console.print(table)
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


def _scan_config(arguments: argparse.Namespace) -> Any:
    from agent.scan import ScanConfig

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
        **_llm_fields(arguments),
    }
    if arguments.xsec_range is not None:
        fields["xsec_range"] = tuple(arguments.xsec_range)
    try:
        return ScanConfig.model_validate(fields)
    except ValidationError as error:
        problem = error.errors()[0]
        raise InvalidInputError(
            f"--{'-'.join(str(p) for p in problem['loc'] if not isinstance(p, int))}".replace(
                "_", "-"
            )
            + f": {problem['msg']} (given {problem.get('input')!r})"
        ) from error


RESUME_KEEPS = frozenset({"resume", "quiet", "handler", "command"})
"""Options that may be given with --resume: the rest would change the run and are refused."""

_OPTION_NAMES = {"data": "DATA", "llm_timeout_s": "--llm-timeout"}


def _changed_on_resume(arguments: argparse.Namespace) -> list[str]:
    """The scan options given with --resume (a resumed run keeps its recorded config)."""
    defaults = vars(build_parser().parse_args(["scan"]))
    return [
        _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
        for name, value in vars(arguments).items()
        if name not in RESUME_KEEPS and name in defaults and value != defaults[name]
    ]


def _scan(arguments: argparse.Namespace) -> tuple[int, Any]:
    from agent.scan import read_config, resolve_inputs, run_scan

    config: Any = None
    try:
        if arguments.resume is not None:
            changed = _changed_on_resume(arguments)
            if changed:
                raise InvalidInputError(
                    f"{', '.join(changed)} given with --resume: a resumed scan keeps the config "
                    f"it was started with ({Path(arguments.resume) / 'config.json'}); drop "
                    "the option, or start a new scan with another --out"
                )
            config = read_config(Path(arguments.resume))
            outcome = run_scan(config, resume=True, show_progress=not arguments.quiet)
        else:
            config = _scan_config(arguments)
            resolve_inputs(config)
            outcome = _new_scan(config, show_progress=not arguments.quiet)
    except AnomscanError as error:
        return _scan_error(error), None
    except KeyboardInterrupt as stop:
        how = "terminated" if _terminated(stop) else "interrupted"
        folder = Path(arguments.resume or (config.run_dir if config is not None else ""))
        if not folder.is_dir() or not (folder / "config.json").is_file():
            print(f"anomscan scan: {how} before the run folder was made", file=sys.stderr)
        else:
            print(
                f"anomscan scan: {how}; {folder} keeps every completed step: continue "
                f"with `anomscan scan --resume {folder}`",
                file=sys.stderr,
            )
        return (EXIT_TERMINATED if _terminated(stop) else EXIT_INTERRUPTED), None
    return 0, outcome


def _new_scan(config: Any, *, show_progress: bool) -> Any:
    """A new scan; a folder it made and that holds no tool call yet is removed on failure.

    A scan refused before it did any work (bad input found by the first node) leaves
    nothing that would block the same --out; once it has work in its folder, the folder
    stays and `anomscan scan --resume` continues it after the cause is fixed.
    """
    import shutil

    from agent.scan import run_scan

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
    from agent.runtime.audit import open_readonly

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


def _command_scan(arguments: argparse.Namespace) -> int:
    status, outcome = _scan(arguments)
    if outcome is None:
        return status
    _print_excesses(outcome.results)
    for note in outcome.results.get("input_notes") or []:
        print(f"inputs: {note}")
    print(f"run folder: {outcome.run_dir}")
    print(f"audit: {outcome.run_dir / 'audit.sqlite'} (anomscan audit {outcome.run_dir})")
    return status


AUDIT_USAGE = (
    "usage: anomscan audit RUN [--why SPECTRUM POINT] | anomscan audit verify RUN | "
    "anomscan audit export RUN | anomscan audit annotate RUN DECISION_SEQ --verdict "
    "agree|question|reject --note TEXT --by NAME"
)


def canonical_spectrum(text: str) -> str:
    """The spectrum name as written in the results (``t2/JM`` -> ``T2/jm``); else unchanged."""
    by_lower = {name.lower(): name for name in SPECTRUM_NAMES}
    return by_lower.get(text.strip().lower(), text)


def _ar_point(text: str) -> str:
    """An AR point as given to --why: a positive cross-section in pb or #INDEX."""
    if text.startswith("#") and text[1:].isdigit():
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(
            f"--why POINT {text!r}: give the AR point as a cross-section in pb (e.g. 0.3) or "
            "as #INDEX (e.g. #0)"
        )
    return text


@contextlib.contextmanager
def _audit_log_read(path: Path) -> Iterator[None]:
    """Turn an unreadable audit log (corrupt, truncated, not SQLite) into one line, exit 2."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        raise InvalidInputError(
            f"the audit log {path} can not be read ({error}): it is corrupt, truncated or not "
            "an anomscan audit log; restore it from a copy of the run folder"
        ) from error


def _command_why(run_dir: Path, spectrum: str, point: str) -> int:
    """`anomscan audit RUN --why SPECTRUM POINT`: one spectrum's result from the log alone."""
    from agent.review.report import check_spectrum, load_run, spectrum_story, why_text

    spectrum = canonical_spectrum(spectrum)
    check_spectrum(spectrum)
    point = _ar_point(point)
    with _audit_log_read(run_dir / "audit.sqlite"):
        run = load_run(run_dir)
        story = spectrum_story(run, spectrum, run.point_index(point))
    print(why_text(story))
    return 0


def _command_annotate(arguments: argparse.Namespace, words: list[str]) -> int:
    """`anomscan audit annotate RUN DECISION_SEQ --verdict V --note TEXT --by NAME`."""
    from agent.runtime import audit

    if len(words) != 2 or not words[1].isdigit() or arguments.verdict is None:
        print(AUDIT_USAGE, file=sys.stderr)
        return EXIT_INVALID_INPUT
    from agent.runtime.runlock import run_folder_lock

    path = Path(words[0]) / audit.AUDIT_FILE
    with _audit_log_read(path):
        audit.open_readonly(path).close()  # not a run folder: refused before the lock makes one
    with _audit_log_read(path), run_folder_lock(path.parent, "anomscan audit annotate"):
        row = audit.annotate(
            path, int(words[1]), arguments.verdict, arguments.note or "", arguments.by or ""
        )
    print(f"annotation seq {row['seq']} on decision {row['decision_seq']}: {row['verdict']}")
    return 0


def _command_audit(arguments: argparse.Namespace) -> int:
    from agent.runtime import audit

    words = list(arguments.target)
    action = words.pop(0) if words and words[0] in ("verify", "export", "annotate") else "table"
    if action == "annotate":
        return _command_annotate(arguments, words)
    if len(words) != 1:
        print(AUDIT_USAGE, file=sys.stderr)
        return EXIT_INVALID_INPUT
    if arguments.why is not None:
        return _command_why(Path(words[0]), *arguments.why)
    path = Path(words[0]) / audit.AUDIT_FILE
    if action == "verify":
        report = audit.verify(path)
        for problem in report.problems:
            print(problem)
        for note in report.notes:
            print(note)
        if report.ok:
            print(f"{path}: {report.n_rows} rows, hash chain intact")
            return 0
        print(f"{path}: {len(report.problems)} problem(s) in {report.n_rows} rows")
        return EXIT_FAILURE
    if action == "export":
        output = Path(arguments.output or Path(words[0]) / "audit.jsonl")
        with _audit_log_read(path), atomic_path(output, what="audit export") as partial:
            n_rows = audit.export_jsonl(path, partial)
        print(f"{n_rows} rows -> {output}")
        return 0
    with _audit_log_read(path):
        rows = audit.decisions(
            path,
            step=arguments.step,
            spectrum=None if arguments.spectrum is None else canonical_spectrum(arguments.spectrum),
            point_pb=arguments.point,
            policy=arguments.policy,
        )
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)  # a file or pipe
    console.print(_decision_summary(path, rows))
    filtered = any(
        value is not None
        for value in (arguments.step, arguments.spectrum, arguments.point, arguments.policy)
    )
    shown = rows if filtered or arguments.all else [r for r in rows if r["kind"] != "skip"]
    if len(shown) > AUDIT_ROWS_SHOWN and not arguments.all:
        console.print(
            f"the first {AUDIT_ROWS_SHOWN} of {len(shown)} rows below; --all shows every row, "
            "--spectrum/--point/--step/--policy select, `audit export` writes them all"
        )
        shown = shown[:AUDIT_ROWS_SHOWN]
    elif len(shown) < len(rows):
        console.print(f"{len(rows) - len(shown)} skip rows hidden (--all shows them)")
    console.print(_decision_table(shown))
    return 0


AUDIT_ROWS_SHOWN = 200
"""Rows `anomscan audit RUN` prints without --all (after its summary)."""


def _decision_summary(path: Path, rows: list[dict[str, Any]]) -> Any:
    """Counts per decision kind, with the refusals by a gate and the policy fallbacks."""
    from rich.table import Table

    kinds: dict[str, list[int]] = {}
    for row in rows:
        counts = kinds.setdefault(str(row["kind"]), [0, 0, 0])
        counts[0] += 1
        counts[1] += str(row["gate"] or "").startswith(("refused", "no candidate"))
        counts[2] += "fell back" in str(row["rationale"] or "")
    table = Table(title=f"{len(rows)} decisions in {path}")
    for column in ("kind", "rows", "refused or no candidate", "fallback to rules"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, (n, refused, fallback) in sorted(kinds.items()):
        table.add_row(kind, str(n), str(refused or ""), str(fallback or ""))
    return table


def _decision_table(rows: list[dict[str, Any]]) -> Any:
    """The decision rows; long text folds inside its cell, whole."""
    from rich.table import Table

    table = Table()
    for column in ("seq", "step", "kind", "spectrum", "AR pb", "chosen", "policy", "why", "gate"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row["seq"]),
            str(row["step_id"]),
            str(row["kind"]),
            row["spectrum"] or "",
            "" if row["point_pb"] is None else point_text(float(row["point_pb"])),
            str(row["chosen"] or ""),
            str(row["policy"] or ""),
            str(row["rationale"] or ""),
            str(row["gate"] or ""),
        )
    return table


def _command_report(arguments: argparse.Namespace) -> int:
    """`anomscan report RUN`: RUN/report/index.html with its spectrum pages and plots."""
    from agent.review.report import write_report

    with _progress_bar("writing the report's spectrum pages") as advance:
        outcome = write_report(
            Path(arguments.run),
            None if arguments.output is None else Path(arguments.output),
            style=arguments.style,
            fmt=arguments.format,
            placement=arguments.plots,
            progress=advance,
        )
    print(f"report: {outcome.index} ({outcome.pages} pages)")
    return 0


def _command_export(arguments: argparse.Namespace) -> int:
    """`anomscan export RUN --hepdata DIR`: HEPData submission YAML of the run."""
    from agent.review.hepdata import export_hepdata

    outcome = export_hepdata(Path(arguments.run), Path(arguments.hepdata))
    print(f"HEPData submission: {outcome.submission} ({outcome.n_tables} tables)")
    return 0


@contextlib.contextmanager
def _progress_bar(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr (done / total, elapsed, ETA) when it is a terminal; else None.

    Without calls to the function it yields, the bar pulses beside the elapsed time.
    """
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(
        f"[bold cyan]{what}[/]", *columns, console=Console(stderr=True), transient=True
    ) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _command_replay(arguments: argparse.Namespace) -> int:
    from agent.review.replay import replay

    run_dir = Path(arguments.run)
    tools = set(arguments.tool) if arguments.tool else None
    with _progress_bar("replaying tool calls") as advance:
        report = replay(run_dir, tools=tools, progress=advance)
    for difference in report.differences:
        print(difference)
    skipped = ", ".join(f"{name} x{n}" for name, n in sorted(report.not_replayed.items()))
    print(
        f"replayed {report.n_replayed} tool calls: {len(report.differences)} difference(s)"
        + (f"; not replayed (they write files): {skipped}" if skipped else "")
    )
    return 0 if not report.differences else EXIT_FAILURE


def _command_demo(arguments: argparse.Namespace) -> int:
    """The scan on the built-in sample, closing with a comparison against its truth."""
    from core.synth import load_truth

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
    if Path(arguments.out, "config.json").exists():
        import shutil

        shutil.rmtree(arguments.out)
    status, outcome = _scan(arguments)
    if outcome is None:
        return status
    _print_excesses(outcome.results, top=8)
    truth = load_truth(outcome.run_dir / "data" / "truth.json")["truth"]
    assert isinstance(truth, list)
    found = []
    for signal in truth:
        spec = signal["spec"]
        hits = [
            e
            for e in outcome.results["excesses"]
            if e["spectrum"].endswith("/" + spec["pair"])
            and e["window_gev"][0] - spec["width"] * 3
            <= spec["mass"]
            <= e["window_gev"][1] + spec["width"] * 3
        ]
        best = max(hits, key=lambda e: e["local_z"], default=None)
        found.append(
            f"{signal['label']}: "
            + (
                f"found in {best['spectrum']} at {point_text(best['xsec_pb'])} pb, "
                f"local Z {best['local_z']:.1f}"
                if best
                else "not among the excesses"
            )
        )
    print("injected (truth.json, read only here): " + "; ".join(found))
    print(f"run folder: {outcome.run_dir}")
    print(f"audit: {outcome.run_dir / 'audit.sqlite'} (anomscan audit {outcome.run_dir})")
    return status


def _command_acceptance(arguments: argparse.Namespace) -> int:
    """`anomscan acceptance RUN FILES...`: a signal sample through the run's AE and AR cuts."""
    from agent.reinterp.injection import run_acceptance

    output = run_acceptance(
        Path(arguments.run),
        list(arguments.files),
        schema=arguments.schema,
        name=arguments.name or "",
        tree=arguments.tree,
        mapping=arguments.mapping,
    )
    from rich.console import Console
    from rich.table import Table

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


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers, e.g. 0.02,0.05,0.1"
        ) from error


def _parse_extra(text: str) -> dict[str, int]:
    from core.synth import EXTRA_TYPES

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
    from agent.reinterp.injection import InjectionRequest, run_injection

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
    with _progress_bar("injecting and re-analysing") as advance:
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


def add_reinterpretation_commands(commands: Any) -> None:
    """The `acceptance` and `inject` subcommands (issue 16)."""
    acceptance = commands.add_parser(
        "acceptance", help="acceptance of a signal sample through a run's autoencoder and ARs"
    )
    acceptance.add_argument("run", help="run folder of a finished scan")
    acceptance.add_argument("files", nargs="+", help="ROOT files of the signal sample")
    acceptance.add_argument(
        "--schema",
        default="auto",
        choices=["auto", "nanoaod", "atlas_opendata", "physlite", "cartesian", "mapping"],
    )
    acceptance.add_argument("--name", help="output name (RUN/acceptance/NAME.json)")
    acceptance.add_argument("--tree", help="tree name (default: auto)")
    acceptance.add_argument("--mapping", help="column-mapping TOML for --schema mapping")
    acceptance.set_defaults(handler=_command_acceptance)

    inject = commands.add_parser(
        "inject", help="inject generated signal into a copy of a run's events and recover it"
    )
    inject.add_argument("run", help="run folder of a finished scan")
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
    from agent.scan import low_count_text, parse_widths, run_limits

    run_dir = Path(arguments.run)
    widths = parse_widths(arguments.widths)
    with _progress_bar("setting limits (every accepted spectrum and point, one pass)"):
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


def _add_limits_parser(commands: Any) -> None:
    """The `limits` subcommand."""
    limits = commands.add_parser(
        "limits",
        help="95 %% CL CLs limits on Gaussian signals of a finished scan (RUN/limits.json)",
    )
    limits.add_argument("run", help="run folder")
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


def _command_mcp(arguments: argparse.Namespace) -> int:
    from agent.mcp_server import serve_stdio

    return serve_stdio(arguments.root)


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `anomscan` command."""
    parser = CommandParser(
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

    scan = commands.add_parser("scan", help="the autonomous scan (no DATA: built-in sample)")
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
    scan.add_argument("--policy", choices=["rules", "llm"], default="rules")
    scan.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (ANOMSCAN_LLM_BASE_URL)")
    scan.add_argument("--llm-model", help="chat model (ANOMSCAN_LLM_MODEL)")
    scan.add_argument("--llm-timeout", dest="llm_timeout_s", type=float, help="s per request")
    scan.add_argument("--llm-max-rejections", type=int, help="refusals sent back per decision")
    scan.add_argument("--llm-max-calls", type=int, help="LLM requests per scan")
    scan.add_argument("--llm-max-tokens", type=int, help="LLM tokens per scan")
    scan.set_defaults(handler=_command_scan)

    audit = commands.add_parser(
        "audit",
        help="decisions of a run as a table (--why SPECTRUM POINT: one spectrum's story); "
        "`audit verify RUN`; `audit export RUN`; `audit annotate RUN SEQ --verdict ...`",
    )
    audit.add_argument(
        "target", nargs="+", help="RUN, or verify RUN, or export RUN, or annotate RUN SEQ"
    )
    audit.add_argument("--step", help="step id or node name (substring)")
    audit.add_argument("--spectrum", help="e.g. T2/jm")
    audit.add_argument("--point", type=float, help="AR point, pb")
    audit.add_argument("--policy", help="only decisions of this policy (llm: its refusals too)")
    audit.add_argument("-o", "--output", help="export: the JSON-lines file")
    audit.add_argument(
        "--why",
        nargs=2,
        metavar=("SPECTRUM", "POINT"),
        help="explain one spectrum at one AR point (pb, or #INDEX) from the log",
    )
    audit.add_argument("--verdict", choices=["agree", "question", "reject"], help="annotate")
    audit.add_argument("--note", help="annotate: the reviewer's note")
    audit.add_argument("--by", help="annotate: the reviewer's name")
    audit.add_argument(
        "--all", action="store_true", help=f"every row (default: the first {AUDIT_ROWS_SHOWN})"
    )
    audit.set_defaults(handler=_command_audit)

    report = commands.add_parser("report", help="static HTML report of a run (RUN/report/)")
    report.add_argument("run", help="run folder")
    report.add_argument("-o", "--output", help="report folder (default RUN/report)")
    report.add_argument(
        "--style",
        choices=["Simulation", "ATLAS", "CMS"],
        default="Simulation",
        help="plot labels: neutral (default), or an experiment's on its own data",
    )
    report.add_argument("--format", choices=["png", "svg"], default="png")
    report.add_argument(
        "--plots", choices=["embedded", "beside"], default="embedded", help="data URIs or files"
    )
    report.set_defaults(handler=_command_report)

    export = commands.add_parser("export", help="export a run (HEPData submission YAML)")
    export.add_argument("run", help="run folder")
    export.add_argument("--hepdata", required=True, metavar="DIR", help="output folder")
    export.set_defaults(handler=_command_export)

    replay = commands.add_parser("replay", help="re-run every logged tool call, report differences")
    replay.add_argument("run", help="run folder")
    replay.add_argument("--tool", action="append", help="only this tool (repeatable)")
    replay.set_defaults(handler=_command_replay)

    demo = commands.add_parser("demo", help="the scan on a freshly generated synthetic sample")
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

    add_reinterpretation_commands(commands)
    _add_limits_parser(commands)

    mcp = commands.add_parser("mcp", help="serve the tools over the Model Context Protocol (stdio)")
    mcp.add_argument("--root", type=Path, help="confine every path in a tool input to this folder")
    mcp.set_defaults(handler=_command_mcp)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (what was completed is kept), exit 143."""


EXIT_TERMINATED = 143
_TERMINATED = threading.Event()
"""Set by SIGTERM: a library (Ray's `get`) may turn `Terminated` into a plain interrupt."""


def _terminate(signum: int, frame: object) -> None:
    _TERMINATED.set()
    raise Terminated


def _terminated(stop: KeyboardInterrupt) -> bool:
    return isinstance(stop, Terminated) or _TERMINATED.is_set()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomscan` console script; returns the exit status."""
    import signal

    words = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)

    def command() -> int:
        # Parsing runs guarded too: a fault of the parser itself (a help text argparse can
        # not format) is reported with a log, never as a traceback.
        arguments = parse_arguments(words)
        return int(arguments.handler(arguments))

    status: int = guarded(command, words)
    return status
