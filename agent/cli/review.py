"""The review commands of a run folder: `audit`, `report`, `export` and `replay`.

`audit` shows the decisions (or one spectrum's story with --why), verifies the hash chain,
exports the log and records a reviewer's annotation. The commands read a finished (or
stopped) run folder and never change its results: an annotation is the one row a reviewer
adds to the audit log, under the run folder's lock. An audit log that SQLite can not read
(corrupt, truncated, not SQLite) is one line and exit 2, naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.cli.common import add_run_command, canonical_spectrum, progress_bar
from agent.cli.parser import Subcommands, add_command
from agent.errors import EXIT_FAILURE, EXIT_INVALID_INPUT
from agent.review import (
    check_spectrum,
    export_hepdata,
    load_run,
    replay,
    spectrum_story,
    why_text,
    write_report,
    write_spectrum_page,
)
from agent.review.plan import compare_plans, plan_text
from agent.runtime import audit
from agent.runtime.runlock import run_folder_lock
from agent.scan.blinding import check_unblinded, unblind
from core.anomaly import point_text
from core.errors import InvalidInputError
from core.files import atomic_path

__all__ = [
    "AUDIT_ROWS_SHOWN",
    "AUDIT_USAGE",
    "add_audit_parser",
    "add_export_parser",
    "add_replay_parser",
    "add_report_parser",
    "add_unblind_parser",
]

AUDIT_USAGE = (
    "usage: anomscan audit RUN [--why SPECTRUM POINT] | anomscan audit verify RUN | "
    "anomscan audit export RUN | anomscan audit plan RUN [OTHER_RUN] | anomscan audit "
    "annotate RUN DECISION_SEQ --verdict agree|question|reject --note TEXT --by NAME"
)

AUDIT_ROWS_SHOWN = 200
"""Rows `anomscan audit RUN` prints without --all (after its summary)."""


def _ar_point(text: str, option: str = "--why POINT") -> str:
    """An AR point as given to `option`: a positive cross-section in pb or #INDEX."""
    if text.startswith("#") and text[1:].isdigit():
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(
            f"{option} {text!r}: give the AR point as a cross-section in pb (e.g. 0.3) or "
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
    if len(words) != 2 or not words[1].isdigit() or arguments.verdict is None:
        print(AUDIT_USAGE, file=sys.stderr)
        return EXIT_INVALID_INPUT
    path = Path(words[0]) / audit.AUDIT_FILE
    with _audit_log_read(path):
        audit.open_readonly(path).close()  # not a run folder: refused before the lock makes one
    with _audit_log_read(path), run_folder_lock(path.parent, "anomscan audit annotate"):
        row = audit.annotate(
            path, int(words[1]), arguments.verdict, arguments.note or "", arguments.by or ""
        )
    print(f"annotation seq {row['seq']} on decision {row['decision_seq']}: {row['verdict']}")
    return 0


def _command_verify(path: Path) -> int:
    """`anomscan audit verify RUN`: the hash chain's problems and notes; exit 1 if broken."""
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


def _command_audit_export(path: Path, output: Path) -> int:
    """`anomscan audit export RUN`: every row of the log as JSON lines, written atomically."""
    with _audit_log_read(path), atomic_path(output, what="audit export") as partial:
        n_rows = audit.export_jsonl(path, partial)
    print(f"{n_rows} rows -> {output}")
    return 0


def _decision_summary(path: Path, rows: list[dict[str, Any]]) -> Table:
    """Counts per decision kind, with the refusals by a gate and the policy fallbacks."""
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


def _decision_table(rows: list[dict[str, Any]]) -> Table:
    """The decision rows; long text folds inside its cell, whole."""
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


def _command_decisions(arguments: argparse.Namespace, path: Path) -> int:
    """`anomscan audit RUN`: the summary, then the selected decision rows (skips hidden)."""
    with _audit_log_read(path):
        rows = audit.decisions(
            path,
            step=arguments.step,
            spectrum=None if arguments.spectrum is None else canonical_spectrum(arguments.spectrum),
            point_pb=arguments.point,
            policy=arguments.policy,
        )
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


def _command_plan(run_dir: Path, other: Path | None = None) -> int:
    """`anomscan audit plan RUN [OTHER]`: the plan and data of a run, or two runs compared."""
    with _audit_log_read(run_dir / audit.AUDIT_FILE):
        print(plan_text(run_dir))
    if other is not None:
        with _audit_log_read(other / audit.AUDIT_FILE):
            print(compare_plans(run_dir, other))
    return 0


def _command_audit(arguments: argparse.Namespace) -> int:
    """`anomscan audit [verify|export|annotate] RUN ...`: dispatch on the first word."""
    words = list(arguments.target)
    actions = ("verify", "export", "annotate", "plan")
    action = words.pop(0) if words and words[0] in actions else "table"
    if action == "annotate":
        return _command_annotate(arguments, words)
    if action == "plan" and len(words) in (1, 2):
        return _command_plan(*(Path(word) for word in words))
    if len(words) != 1:
        print(AUDIT_USAGE, file=sys.stderr)
        return EXIT_INVALID_INPUT
    if action != "verify":  # the decisions and tool calls hold the data in the windows
        check_unblinded(Path(words[0]), f"`anomscan audit {' '.join(arguments.target)}`")
    if arguments.why is not None:
        return _command_why(Path(words[0]), *arguments.why)
    path = Path(words[0]) / audit.AUDIT_FILE
    if action == "verify":
        return _command_verify(path)
    if action == "export":
        return _command_audit_export(path, Path(arguments.output or Path(words[0]) / "audit.jsonl"))
    return _command_decisions(arguments, path)


def add_audit_parser(commands: Subcommands) -> None:
    """The `audit` subcommand (its actions are the first words of its target)."""
    audit_parser = add_command(commands, "audit")
    audit_parser.add_argument(
        "target",
        nargs="+",
        help="RUN, or verify RUN, or export RUN, or plan RUN [OTHER_RUN], or annotate RUN SEQ",
    )
    audit_parser.add_argument("--step", help="step id or node name (substring)")
    audit_parser.add_argument("--spectrum", help="e.g. T2/jm")
    audit_parser.add_argument("--point", type=float, help="AR point, pb")
    audit_parser.add_argument(
        "--policy", help="only decisions of this policy (llm: its refusals too)"
    )
    audit_parser.add_argument("-o", "--output", help="export: the JSON-lines file")
    audit_parser.add_argument(
        "--why",
        nargs=2,
        metavar=("SPECTRUM", "POINT"),
        help="explain one spectrum at one AR point (pb, or #INDEX) from the log",
    )
    audit_parser.add_argument("--verdict", choices=["agree", "question", "reject"], help="annotate")
    audit_parser.add_argument("--note", help="annotate: the reviewer's note")
    audit_parser.add_argument("--by", help="annotate: the reviewer's name")
    audit_parser.add_argument(
        "--all", action="store_true", help=f"every row (default: the first {AUDIT_ROWS_SHOWN})"
    )
    audit_parser.set_defaults(handler=_command_audit)


def _command_report(arguments: argparse.Namespace) -> int:
    """`anomscan report RUN`: RUN/report/index.html with its spectrum pages and plots.

    With --spectrum and --point only that page, drawn.
    """
    output = None if arguments.output is None else Path(arguments.output)
    if (arguments.spectrum is None) != (arguments.point is None):
        raise InvalidInputError(
            "anomscan report: --spectrum and --point go together (e.g. --spectrum T2/jm "
            "--point 0.3); give both, or neither for the whole report"
        )
    if arguments.spectrum is not None:
        path = write_spectrum_page(
            Path(arguments.run),
            canonical_spectrum(arguments.spectrum),
            _ar_point(arguments.point, "--point"),
            output,
            style=arguments.style,
            fmt=arguments.format,
            placement=arguments.plots,
        )
        print(f"page: {path}")
        return 0
    with progress_bar("writing the report's spectrum pages") as advance:
        outcome = write_report(
            Path(arguments.run),
            output,
            style=arguments.style,
            fmt=arguments.format,
            placement=arguments.plots,
            pages="all" if arguments.all_pages else "needed",
            progress=advance,
        )
    print(f"report: {outcome.index} ({outcome.pages} pages)")
    return 0


def add_report_parser(commands: Subcommands) -> None:
    """The `report` subcommand."""
    report = add_run_command(commands, "report")
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
    report.add_argument("--spectrum", help="draw only this spectrum's page (with --point)")
    report.add_argument("--point", help="its AR point: a cross section in pb, or #INDEX")
    report.add_argument(
        "--all-pages",
        action="store_true",
        help="draw every spectrum page (default: those with a top excess, a rescue, a "
        "fallback, no background or a refusal; the others say how to draw them)",
    )
    report.set_defaults(handler=_command_report)


def _command_export(arguments: argparse.Namespace) -> int:
    """`anomscan export RUN --hepdata DIR`: HEPData submission YAML of the run."""
    check_unblinded(Path(arguments.run), "the HEPData export (the observed spectra)")
    outcome = export_hepdata(Path(arguments.run), Path(arguments.hepdata))
    print(f"HEPData submission: {outcome.submission} ({outcome.n_tables} tables)")
    return 0


def _command_unblind(arguments: argparse.Namespace) -> int:
    """`anomscan unblind RUN --by NAME [--note TEXT]`: release a blinded run's results."""
    run_dir = Path(arguments.run)
    record = unblind(run_dir, arguments.by or "", arguments.note or "")
    print(
        f"unblinded by {record['by']} at {record['at']}: {run_dir / 'results.json'} holds the "
        f"results sealed by the scan (sha256 {record['sealed']['results.json']}); "
        f"`anomscan report {run_dir}` shows them"
    )
    return 0


def add_unblind_parser(commands: Subcommands) -> None:
    """The `unblind` subcommand."""
    unblind_parser = add_run_command(commands, "unblind")
    unblind_parser.add_argument("--by", required=True, help="who unblinds (on record)")
    unblind_parser.add_argument("--note", help="why now, under which approval")
    unblind_parser.set_defaults(handler=_command_unblind)


def add_export_parser(commands: Subcommands) -> None:
    """The `export` subcommand."""
    export = add_run_command(commands, "export")
    export.add_argument("--hepdata", required=True, metavar="DIR", help="output folder")
    export.set_defaults(handler=_command_export)


def _command_replay(arguments: argparse.Namespace) -> int:
    """`anomscan replay RUN`: every logged tool call again; exit 1 on any difference."""
    run_dir = Path(arguments.run)
    tools = set(arguments.tool) if arguments.tool else None
    with progress_bar("replaying tool calls") as advance:
        report = replay(run_dir, tools=tools, progress=advance)
    for difference in report.differences:
        print(difference)
    skipped = ", ".join(f"{name} x{n}" for name, n in sorted(report.not_replayed.items()))
    print(
        f"replayed {report.n_replayed} tool calls: {len(report.differences)} difference(s)"
        + (f"; not replayed (they write files): {skipped}" if skipped else "")
    )
    return 0 if not report.differences else EXIT_FAILURE


def add_replay_parser(commands: Subcommands) -> None:
    """The `replay` subcommand."""
    replay_parser = add_run_command(commands, "replay")
    replay_parser.add_argument("--tool", action="append", help="only this tool (repeatable)")
    replay_parser.set_defaults(handler=_command_replay)
