"""What a reviewer reads after a scan: RUN/report/ (static HTML) and the `--why` story.

Every number comes from the run folder as the scan wrote it: results.json, the audit log
(decisions, tool_calls, fits, bumps, runs, artifacts, annotations), the per-point NPZ and
JSON files, the model card and the event table's scores. Nothing is refitted or retested;
the only quantity computed here is the display residual (n - B)/sqrt(B) of the spectrum
plots. The HTML asks nothing of the network: styles are inline, plots are embedded as
data URIs (or written beside the page with `plots="beside"`), there is no script.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.figures import plots
from agent.runtime.audit import AUDIT_FILE, AuditError, open_readonly
from core.anomaly import point_text
from core.errors import InvalidInputError
from core.limits import LOW_COUNT_BACKGROUND
from core.masses import PAIRS, STREAMS

SPECTRUM_NAMES = tuple(f"{stream}/{pair}" for stream in STREAMS for pair in PAIRS)
BACKGROUND_KINDS = ("background", "background_fallback", "background_masked")
PlotPlacement = Literal["embedded", "beside"]


def _json(text: Any) -> Any:
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)


def spectrum_slug(spectrum: str, index: int) -> str:
    """The file stem of a spectrum x point page, e.g. T3_jm-point-000."""
    return f"{spectrum.replace('/', '_')}-point-{index:03d}"


@dataclass
class RunRecord:
    """One run folder as read for the report (audit rows parsed, per-point files loaded)."""

    run_dir: Path
    results: dict[str, Any]
    config: dict[str, Any]
    runs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    fits: list[dict[str, Any]]
    bumps: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    llm_messages: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    points: list[dict[str, Any]] = field(default_factory=list)

    def point_index(self, point: float | str) -> int:
        """The index of an AR point given in pb (or as #INDEX); InvalidInputError if absent."""
        points = self.results["points_pb"]
        if isinstance(point, str) and point.startswith("#"):
            index = int(point[1:])
            if 0 <= index < len(points):
                return index
        else:
            value = float(point)
            for index, scanned in enumerate(points):
                if math.isclose(value, scanned, rel_tol=1e-3):
                    return index
        raise InvalidInputError(
            f"AR point {point}: the scan has points {[float(f'{p:.6g}') for p in points]} pb "
            "(or give #INDEX)"
        )

    def tool_call(self, key: str) -> dict[str, Any] | None:
        """The tool call with this audit key (step:tool:label), outputs parsed."""
        for call in self.tool_calls:
            if call["key"] == key:
                return call
        return None

    def annotations_of(self, decision_seq: int) -> list[dict[str, Any]]:
        """The reviewer annotations of one decision."""
        return [a for a in self.annotations if a["decision_seq"] == decision_seq]


def _rows(db: Any, table: str) -> list[dict[str, Any]]:
    if not db[table].exists():
        return []
    return [dict(row) for row in db.query(f"select * from [{table}] order by seq")]


def load_run(run_dir: Path) -> RunRecord:
    """Read a finished scan's run folder; InvalidInputError when it is not one."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise InvalidInputError(
            f"{run_dir} has no results.json: give the run folder of a finished scan (or "
            f"finish it with `anomscan scan --resume {run_dir}`)"
        )
    results = json.loads(results_path.read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    db = open_readonly(run_dir / AUDIT_FILE)
    try:
        tables = {
            name: _rows(db, name)
            for name in (
                "runs",
                "steps",
                "decisions",
                "tool_calls",
                "fits",
                "bumps",
                "artifacts",
                "llm_messages",
                "annotations",
            )
        }
    finally:
        db.close()
    for row in tables["decisions"]:
        for column in ("chosen", "options", "numbers"):
            row[column] = _json(row[column])
    for row in tables["tool_calls"]:
        output = row["output"]
        if output is None and row.get("output_path"):
            path = run_dir / str(row["output_path"])
            output = path.read_text() if path.is_file() else None
        row["output"] = _json(output)
        row["input"] = _json(row["input"])
    for row in tables["runs"]:
        for column in ("config", "versions", "inputs"):
            row[column] = _json(row[column])
    for row in tables["fits"]:
        row["parameters"] = _json(row["parameters"])
        row["fit_range"] = _json(row["fit_range"])
    record = RunRecord(run_dir=run_dir, results=results, config=config, **tables)
    for index, point in enumerate(results["points_pb"]):
        stem = f"point-{index:03d}"
        summary_path = run_dir / "points" / f"{stem}.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        entry: dict[str, Any] = {"index": index, "point_pb": point, "summary": summary}
        arrays = run_dir / "points" / f"{stem}.npz"
        if arrays.is_file():
            with np.load(arrays) as data:
                entry["edges"] = np.asarray(data["edges"], dtype=float)
                entry["counts"] = np.asarray(data["counts"], dtype=float)
                entry["background"] = np.asarray(data["background"], dtype=float)
                if "background_error" in data.files:
                    entry["background_error"] = np.asarray(data["background_error"], dtype=float)
        spectra = run_dir / "spectra" / f"{stem}.npz"
        if "counts" not in entry and spectra.is_file():
            with np.load(spectra) as data:
                entry["edges"] = np.asarray(data["edges"], dtype=float)
                entry["counts"] = np.asarray(data["counts"], dtype=float)
        record.points.append(entry)
    return record


def flagged_excesses(run: RunRecord) -> list[dict[str, Any]]:
    """The excesses the scan flagged: a window exclusion was triggered, or the scan-wide best.

    In the order of results.json (by local Z).
    """
    triggered = {
        (row["spectrum"], float(row["point_pb"]))
        for row in run.decisions
        if row["kind"] == "window_exclusion" and row["point_pb"] is not None
    }
    lee = run.results.get("look_elsewhere") or {}
    best = lee.get("best") or {}
    flagged = []
    for excess in run.results["excesses"]:
        hit = any(s == excess["spectrum"] and _same(p, excess["xsec_pb"]) for s, p in triggered)
        is_best = best.get("spectrum") == excess["spectrum"] and _same(
            best.get("cross_section_pb"), excess["xsec_pb"]
        )
        if hit or is_best or excess.get("masked_window_gev") is not None:
            flagged.append(excess)
    return flagged


# ---------------------------------------------------------------- one spectrum's story


def check_spectrum(spectrum: str) -> None:
    """InvalidInputError unless `spectrum` is one of the 63 STREAM/PAIR names."""
    if spectrum not in SPECTRUM_NAMES:
        raise InvalidInputError(
            f"spectrum {spectrum!r}: expected STREAM/PAIR such as T2/jm ({SPECTRUM_NAMES[0]} .. "
            f"{SPECTRUM_NAMES[-1]})"
        )


def spectrum_story(run: RunRecord, spectrum: str, index: int) -> dict[str, Any]:
    """Everything the log holds about one spectrum at one AR point, in the order it happened.

    Keys: spectrum, point_pb, index, status, reason, result (points/point-NNN.json entry),
    decisions (rows, background ones with `candidates`, `tests`, `fallback` and the tool
    call key), fits (fits rows of this point), bump (bumps row), excess (results.json row).
    """
    check_spectrum(spectrum)
    point = run.points[index]
    point_pb = point["point_pb"]
    summary = point["summary"] or {"spectra": []}
    result = next((s for s in summary["spectra"] if s["spectrum"] == spectrum), None)
    decisions = []
    for row in run.decisions:
        if row["spectrum"] != spectrum or not _same(row["point_pb"], point_pb):
            continue
        entry = dict(row)
        if row["kind"] in BACKGROUND_KINDS:
            key = f"{row['step_id']}:choose_background:{spectrum}"
            call = run.tool_call(key)
            output = call["output"] if call and isinstance(call["output"], dict) else {}
            entry["candidates"] = row["options"] if isinstance(row["options"], list) else []
            entry["tests"] = output.get("tests", [])
            entry["fallback"] = output.get("fallback")
            entry["tool_call_seq"] = None if call is None else call["seq"]
            entry["tool_chosen"] = output.get("chosen")
            entry["tool_candidates"] = output.get("candidates") or []
        entry["annotations"] = run.annotations_of(int(row["seq"]))
        decisions.append(entry)
    searches = [
        call
        for call in run.tool_calls
        if call["tool"] == "search_spectrum"
        and call["key"].endswith(f":search_spectrum:{spectrum}")
        and any(
            _same(step["point_pb"], point_pb) and step["step_id"] == call["step_id"]
            for step in run.steps
        )
    ]
    step_ids = {
        step["step_id"]
        for step in run.steps
        if _same(step["point_pb"], point_pb) and step["node"] == "choose_backgrounds"
    }
    fits = [f for f in run.fits if f["spectrum"] == spectrum and f["step_id"] in step_ids]
    bump = next(
        (b for b in run.bumps if b["spectrum"] == spectrum and _same(b["point_pb"], point_pb)),
        None,
    )
    excess = next(
        (
            e
            for e in run.results["excesses"]
            if e["spectrum"] == spectrum
            and any(_same(p, point_pb) for p in [e["xsec_pb"], *e.get("repeated_at_pb", [])])
        ),
        None,
    )
    spectra_file = f"spectra/point-{index:03d}.npz"
    artifact = next((a for a in run.artifacts if a["path"] == spectra_file), None)
    k = SPECTRUM_NAMES.index(spectrum)
    inputs = {
        "spectra_file": spectra_file,
        "sha256": None if artifact is None else artifact["sha256"],
        "n_events": None if "counts" not in point else float(point["counts"][k].sum()),
    }
    return {
        "inputs": inputs,
        "spectrum": spectrum,
        "index": index,
        "point_pb": point_pb,
        "status": None if result is None else result["status"],
        "reason": None if result is None else result.get("reason"),
        "result": result,
        "decisions": decisions,
        "fits": fits,
        "bump": bump,
        "excess": excess,
        "searches": searches,
    }


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _check_text(check: dict[str, Any]) -> str:
    numbers = ", ".join(f"{k} {_number(v)}" for k, v in sorted(check.get("numbers", {}).items()))
    verdict = check.get("status") or ("pass" if check.get("passed") else "fail")
    verdict = "FAIL" if verdict == "fail" else verdict
    return f"{check['name']}: {verdict} ({numbers})"


def _deciding_gof(checks: list[dict[str, Any]]) -> str:
    """The goodness-of-fit p that decided the check (toys where bins are sparse)."""
    gof = next((c for c in checks if c.get("name") == "goodness_of_fit"), None)
    if gof is None:
        return ""
    numbers = gof.get("numbers", {})
    toys = numbers.get("n_toys")
    source = f"{_number(toys)} toys" if toys else "asymptotic"
    return f"; goodness-of-fit p {_number(numbers.get('p_value'))} ({source}) decides"


def why_text(story: dict[str, Any]) -> str:
    """The `anomscan audit RUN --why SPECTRUM POINT` explanation, from the log alone."""
    lines = [
        f"{story['spectrum']} at AR point {point_text(story['point_pb'])} pb (#{story['index']})"
    ]
    inputs = story["inputs"]
    lines.append(
        f"input: {inputs['spectra_file']} (sha256 {inputs['sha256'] or 'not logged'}), "
        f"{_number(inputs['n_events'])} events in the spectrum"
    )
    lines.append(
        f"status: {story['status']}" + (f" ({story['reason']})" if story["reason"] else "")
    )
    for row in story["decisions"]:
        head = (
            f"[decision seq {row['seq']}, {row['step_id']}, {row['kind']}, policy "
            f"{row['policy']}] chosen: {row['chosen']}"
        )
        lines.append(head)
        if row.get("rationale"):
            lines.append(f"  why: {row['rationale']}")
        if row.get("gate"):
            lines.append(f"  gate: {row['gate']}")
        if row["kind"] in BACKGROUND_KINDS:
            tried = list(
                dict.fromkeys(
                    [name for t in row["tests"] for name in (t["lower"], t["higher"])]
                    + [c["function"] for c in row["candidates"]]
                )
            )
            lines.append(f"  functions tried: {', '.join(tried) if tried else 'none'}")
            for test in row["tests"]:
                lines.append(
                    f"  {test.get('method', 'test')} {test['lower']} vs {test['higher']}: "
                    f"statistic {_number(test.get('test_statistic'))}, p "
                    f"{_number(test.get('p_value'))}, significant "
                    f"{_number(test.get('significant'))}"
                )
            fits_by_function = {c["function"]: c for c in row["tool_candidates"]}
            for candidate in row["candidates"]:
                verdict = "passed" if candidate["passed"] else "failed"
                fit = fits_by_function.get(candidate["function"])
                quality = (
                    ""
                    if fit is None
                    else f", deviance {_number(fit['deviance'])} / ndf {fit['ndf']}, asymptotic "
                    f"p {_number(fit['p_value'])}"
                )
                quality += _deciding_gof(candidate["checks"])
                lines.append(
                    f"  {candidate['function']} ({candidate['source']}): {verdict}{quality}"
                )
                lines.extend(f"    {_check_text(check)}" for check in candidate["checks"])
            if row.get("fallback"):
                fallback = row["fallback"]
                lines.append(f"  symbolic fallback: {fallback.get('expression', fallback)}")
            lines.append(f"  chosen function: {row['chosen']}")
        lines.extend(
            f"  annotation by {a['by']}: {a['verdict']} - {a['note']}" for a in row["annotations"]
        )
    for fit in story["fits"]:
        lines.append(
            f"fit: {fit['function']} chi2 {_number(fit['chi2'])} / ndf {fit['ndf']}, p "
            f"{_number(fit['p_value'])}, range {fit['fit_range']} GeV, passed "
            f"{_number(bool(fit['passed']))}"
        )
    for call in story["searches"]:
        output = call["output"] if isinstance(call["output"], dict) else {}
        exclusion = output.get("window_exclusion")
        lines.append(
            f"search_spectrum (tool call seq {call['seq']}): {output.get('function')} fit p "
            f"{_number(output.get('p_value'))}"
            + (
                ""
                if not exclusion
                else f"; window exclusion {exclusion.get('window_gev')} GeV accepted "
                f"{_number(exclusion.get('accepted'))}"
            )
            + (
                ""
                if not output.get("masked_window_gev")
                else f"; fitted with {output['masked_window_gev']} GeV masked (mask from "
                f"{output.get('mask_from')})"
            )
        )
    bump = story["bump"]
    if bump is not None:
        lines.append(
            f"bump: window {bump['window_lo']:.1f}-{bump['window_hi']:.1f} GeV, data "
            f"{_number(bump['data'])}, background {_number(bump['background'])}, local p "
            f"{_number(bump['local_p'])} (Z {_number(bump['local_z'])}), spectrum-global Z "
            f"{_number(bump['global_z'])}"
        )
    excess = story["excess"]
    if excess is not None:
        lines.append(
            f"result: local Z {_number(excess['local_z'])}, spectrum-global Z "
            f"{_number(excess['global_z'])}"
            + ("" if not excess["global_z_is_lower_limit"] else " (lower limit)")
            + f", scan-global Z {_number(excess['scan_global_z'])}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML


STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#111}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#eee}td.num{text-align:right;font-family:monospace}
.pass{color:#070}.fail{color:#b00;font-weight:bold}.mono{font-family:monospace;font-size:0.8em}
table.map td{padding:0;width:1.4em;height:1.4em;text-align:center;font-size:0.7em}
table.map a{display:block;color:#000;text-decoration:none}
img{max-width:100%}.note{color:#555;font-size:0.85em}
pre{white-space:pre-wrap;font-size:0.75em;background:#f6f6f6;padding:4px;max-height:20em;overflow:auto}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], attrs: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NO_VALUE = object()


def _td(text: Any, *, value: Any = _NO_VALUE, cls: str = "") -> str:
    data = "" if value is _NO_VALUE else f' data-value="{_e(json.dumps(value))}"'
    klass = f' class="{cls}"' if cls else ""
    return f"<td{klass}{data}>{_e(text)}</td>"


def _raw_td(markup: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f"<td{klass}>{markup}</td>"


@dataclass
class _Figures:
    folder: Path
    fmt: plots.PlotFormat
    placement: PlotPlacement
    written: list[Path] = field(default_factory=list)

    def img(self, figure: Any, name: str, alt: str, prefix: str = "") -> str:
        data = plots.encode(figure, self.fmt)
        mime = "image/png" if self.fmt == "png" else "image/svg+xml"
        if self.placement == "embedded":
            source = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        else:
            path = self.folder / "plots" / f"{name}.{self.fmt}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            self.written.append(path)
            source = f"{prefix}plots/{path.name}"
        return f'<img src="{_e(source)}" alt="{_e(alt)}" data-plot="{_e(name)}">'


def _cell_mark(status: str | None, function: str | None, fallback_used: bool) -> str:
    if status == "skipped":
        return plots.MARKS["skipped"]
    if status == "no background":
        return plots.MARKS["failed"]
    if fallback_used:
        return plots.MARKS["fallback"]
    return ""


def _map_arrays(run: RunRecord) -> tuple[np.ndarray, list[list[str]], list[list[str | None]]]:
    points = run.points
    local_z = np.full((len(points), len(SPECTRUM_NAMES)), np.nan)
    marks = [["" for _ in SPECTRUM_NAMES] for _ in points]
    statuses: list[list[str | None]] = [[None for _ in SPECTRUM_NAMES] for _ in points]
    fallbacks = {
        (row["spectrum"], float(row["point_pb"]))
        for row in run.decisions
        if row["kind"] == "background_fallback" and row["chosen"] is not None
    }
    for i, point in enumerate(points):
        summary = point["summary"] or {"spectra": []}
        for entry in summary["spectra"]:
            j = SPECTRUM_NAMES.index(entry["spectrum"])
            statuses[i][j] = entry["status"]
            if entry["status"] == "excess":
                local_z[i, j] = entry["local_z"]
            fallback_used = any(
                s == entry["spectrum"] and _same(p, point["point_pb"]) for s, p in fallbacks
            )
            marks[i][j] = _cell_mark(entry["status"], entry.get("function"), fallback_used)
    return local_z, marks, statuses


def _map_table(run: RunRecord, local_z: np.ndarray, marks: list[list[str]]) -> str:
    import matplotlib as mpl

    colour_map = mpl.colormaps["viridis"]
    finite = local_z[np.isfinite(local_z)]
    top = float(finite.max()) if finite.size else 1.0
    header = "<tr><th>AR point</th>" + "".join(
        f'<th title="{_e(n)}">{_e(n.replace("/", " "))}</th>' for n in SPECTRUM_NAMES
    )
    rows = []
    for i, point in enumerate(run.points):
        cells = [f"<th>{point['point_pb']:.3g} pb</th>"]
        for j, name in enumerate(SPECTRUM_NAMES):
            z = local_z[i, j]
            colour = (
                mpl.colors.to_hex(colour_map(min(1.0, max(0.0, z / top))))
                if np.isfinite(z)
                else "#fff"
            )
            text_colour = "#fff" if np.isfinite(z) and z / top < 0.6 else "#000"
            label = f"{z:.1f}" if np.isfinite(z) else marks[i][j]
            title = f"{name} at {point_text(point['point_pb'])} pb: " + (
                f"local Z {z:.2f}" if np.isfinite(z) else "no excess test"
            )
            cells.append(
                f'<td style="background:{colour}" title="{_e(title)}">'
                f'<a style="color:{text_colour}" href="spectra/{spectrum_slug(name, i)}.html">'
                f"{_e(label)}</a></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div style="overflow-x:auto">'
        f'<table class="map" id="map-table"><thead>{header}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _excess_table(run: RunRecord) -> str:
    header = (
        "# (flagged: window exclusion triggered or scan-wide best)",
        "spectrum",
        "AR point (pb)",
        "window (GeV)",
        "data",
        "background",
        "local p",
        "local Z",
        "spectrum-global Z",
        "scan-global Z",
        "function",
        "fit p",
        "masked window (GeV)",
    )
    rows = []
    flagged = {id(e) for e in flagged_excesses(run)}
    for rank, excess in enumerate(run.results["excesses"], start=1):
        index = run.point_index(excess["xsec_pb"])
        slug = spectrum_slug(excess["spectrum"], index)
        low, high = excess["window_gev"]
        masked = excess.get("masked_window_gev")
        global_text = _number(excess["global_z"])
        if excess["global_z_is_lower_limit"]:
            global_text = "> " + global_text
        rows.append(
            [
                _td(f"{rank} flagged" if id(excess) in flagged else rank),
                _raw_td(
                    f'<a href="spectra/{slug}.html" data-field="spectrum">'
                    f"{_e(excess['spectrum'])}</a>"
                ),
                _td(_number(excess["xsec_pb"]), value=excess["xsec_pb"], cls="num"),
                _td(f"{low:.1f} - {high:.1f}", value=excess["window_gev"], cls="num"),
                _td(_number(excess["data"]), value=excess["data"], cls="num"),
                _td(_number(excess["background"]), value=excess["background"], cls="num"),
                _td(_number(excess["local_p"]), value=excess["local_p"], cls="num"),
                _td(_number(excess["local_z"]), value=excess["local_z"], cls="num"),
                _td(global_text, value=excess["global_z"], cls="num"),
                _td(_number(excess["scan_global_z"]), value=excess["scan_global_z"], cls="num"),
                _td(excess["function"], value=excess["function"]),
                _td(_number(excess["fit_p_value"]), value=excess["fit_p_value"], cls="num"),
                _td(
                    "-" if masked is None else f"{masked[0]:.1f} - {masked[1]:.1f}",
                    value=masked,
                    cls="num",
                ),
            ]
        )
    return _table(header, rows, 'id="excesses"')


def _annotation_list(items: list[dict[str, Any]]) -> str:
    return "".join(
        f'<div class="annotation" data-decision="{a["decision_seq"]}"><b>{_e(a["verdict"])}</b> '
        f"by {_e(a['by'])}: {_e(a['note'])}</div>"
        for a in items
    )


def _timeline(run: RunRecord) -> str:
    header = ("seq", "step", "kind", "spectrum", "AR pb", "policy", "chosen", "why", "gate",
              "tool calls", "annotations")  # fmt: skip
    points = run.results["points_pb"]
    rows = []
    for row in run.decisions:
        if row["kind"] == "skip":
            continue
        spectrum = row["spectrum"] or ""
        link = ""
        if spectrum and row["point_pb"] is not None:
            index = next((i for i, p in enumerate(points) if _same(p, row["point_pb"])), None)
            if index is not None:
                link = f'<a href="spectra/{spectrum_slug(spectrum, index)}.html">{_e(spectrum)}</a>'
        chosen = row["chosen"]
        chosen_text = chosen if isinstance(chosen, str) else json.dumps(chosen)
        gate = str(row["gate"] or "")
        rows.append(
            [
                f'<td id="decision-{row["seq"]}">{row["seq"]}</td>',
                _td(row["step_id"]),
                _td(row["kind"]),
                _raw_td(link or _e(spectrum)),
                _td("" if row["point_pb"] is None else f"{row['point_pb']:.3g}", cls="num"),
                _td(row["policy"]),
                _td(chosen_text[:120]),
                _td(row["rationale"]),
                _td(gate, cls="fail" if gate.startswith("refused") else ""),
                _raw_td(f'<a href="tool_calls.html#step-{_e(row["step_id"])}">calls</a>'),
                _raw_td(_annotation_list(run.annotations_of(int(row["seq"])))),
            ]
        )
    skipped = sum(1 for row in run.decisions if row["kind"] == "skip")
    note = (
        f'<p class="note">{skipped} `skip` decisions (too few events) are listed on the '
        "spectrum pages and marked on the map.</p>"
    )
    return note + _table(header, rows, 'id="timeline"')


def _llm_section(run: RunRecord) -> str:
    if not run.llm_messages:
        return '<p class="note">No LLM messages: the scan ran with a deterministic policy.</p>'
    rows = [
        [
            _td(m["seq"]),
            _td(m["step_id"]),
            _td(m["model"]),
            _td(m["role"]),
            _raw_td(f"<pre>{_e(m['content'])}</pre>"),
            _td(m["tokens"]),
        ]
        for m in run.llm_messages
    ]
    return _table(("seq", "step", "model", "role", "content", "tokens"), rows, 'id="llm"')


def _config_section(run: RunRecord) -> str:
    start = next((r for r in run.runs if r["event"] == "start"), None)
    finish = [r for r in run.runs if r["event"] == "finish"]
    parts = []
    if start is not None:
        config = start["config"] or {}
        parts.append(
            _table(
                ("setting", "value"),
                ([_td(k), _td(json.dumps(v))] for k, v in sorted(config.items())),
                'id="config"',
            )
        )
        versions = start["versions"] or {}
        parts.append("<h3>Versions</h3>")
        parts.append(
            _table(
                ("package", "version"),
                ([_td(k), _td(v)] for k, v in sorted(versions.items())),
                'id="versions"',
            )
        )
    parts.append("<h3>Inputs and hashes (SHA-256)</h3>")
    rows = [
        [_td(a["kind"]), _td(a["path"], cls="mono"), _td(a["sha256"], cls="mono"), _td(a["bytes"])]
        for a in run.artifacts
        if a["kind"] in ("input", "model", "event table part")
    ]
    if finish:
        last = finish[-1]
        rows.append([_td("model (run)"), _td(""), _td(last["model_sha256"], cls="mono"), _td("")])
    rows.append(
        [
            _td("event table"),
            _td("events/"),
            _td(run.results.get("table_sha256"), cls="mono"),
            _td(""),
        ]
    )
    parts.append(_table(("kind", "path", "sha256", "bytes"), rows, 'id="hashes"'))
    events = [r for r in run.runs if r["event"] in ("resume", "failed")]
    if events:
        parts.append(
            '<p class="note">'
            + "; ".join(f"{r['event']} (seq {r['seq']})" for r in events)
            + "</p>"
        )
    return "".join(parts)


def _stop_text(reason: str) -> str:
    """Why the AR sweep ended, without a policy's own "stop:" prefix."""
    text = reason.strip().removeprefix("stop:").strip()
    return text or "the planned points were scanned"


def _model_path(run: RunRecord) -> Path | None:
    for artifact in run.artifacts:
        if artifact["kind"] == "model":
            path = Path(artifact["path"])
            return path if path.is_absolute() else run.run_dir / path
    return None


def _autoencoder_section(run: RunRecord, figures: _Figures, style: plots.PlotStyle) -> str:
    from core.autoencoder import read_model_card, training_warnings
    from core.errors import ModelError

    parts = []
    model = _model_path(run)
    if model is None:
        return '<p class="note">No model artifact in the audit.</p>'
    try:
        card = read_model_card(model)
    except ModelError as error:
        parts.append(f'<p class="note">Model card not readable: {_e(error)}</p>')
    else:
        parts.append(
            f"<p>{_e(model)}: {card.n_training_events} training events (fraction "
            f"{card.fraction:g}, seed {card.seed}), hidden {list(card.hidden_sizes)}, best epoch "
            f"{card.best_epoch + 1} of {len(card.loss_train)}, ONNX sha256 "
            f'<span class="mono">{_e(card.onnx_sha256)}</span></p>'
        )
        parts.extend(
            f'<p class="note warning">Warning: {_e(text)}.</p>' for text in training_warnings(card)
        )
        figure = plots.loss_curves(card.loss_train, card.loss_validation, card.best_epoch, style)
        parts.append(figures.img(figure, "loss", "autoencoder loss curves"))
    events = run.run_dir / "events"
    if events.is_dir():
        from core.table import read_event_table

        table = read_event_table(events)
        if table.score is not None:
            scores = {
                stream: np.asarray(table.score[table.stream_bits[:, k]], dtype=float)
                for k, stream in enumerate(STREAMS)
            }
            cuts: dict[float, dict[str, float | None]] = {}
            for row in run.decisions:
                numbers = row["numbers"]
                if row["kind"] == "anomaly_region" and isinstance(numbers, dict):
                    lowest = numbers.get("lowest_score_in_region")
                    if isinstance(lowest, dict):
                        cuts[float(row["point_pb"])] = lowest
            if not cuts:
                parts.append(
                    '<p class="note">The AR cuts are not in this audit (a scan from before '
                    "the anomaly_region decision recorded them).</p>"
                )
            figure = plots.score_distributions(scores, cuts, style)
            parts.append(figures.img(figure, "scores", "anomaly score per stream with the AR cuts"))
            parts.append(
                '<p class="note">Lines: the lowest score inside each AR point\'s anomaly region '
                "(events at or above it pass), from the anomaly_region decisions.</p>"
            )
    return "".join(parts)


def _lee_section(run: RunRecord) -> str:
    lee = run.results.get("look_elsewhere")
    if not lee:
        return '<p class="note">No scan-wide look-elsewhere test (no accepted background).</p>'
    best = lee["best"]
    rows = [
        [_td("largest excess"), _td(f"{best['spectrum']} at {best['cross_section_pb']:.4g} pb")],
        [_td("window (GeV)"), _td(f"{best['window'][0]:.1f} - {best['window'][1]:.1f}")],
        [_td("local p"), _td(_number(lee["local_p"]), value=lee["local_p"], cls="num")],
        [_td("local Z"), _td(_number(lee["local_z"]), value=lee["local_z"], cls="num")],
        [_td("scan-global p"), _td(_number(lee["global_p"]), value=lee["global_p"], cls="num")],
        [
            _td("scan-global Z"),
            _td(
                ("> " if lee["global_z_is_lower_limit"] else "") + _number(lee["global_z"]),
                value=lee["global_z"],
                cls="num",
            ),
        ],
        [_td("tests (spectrum x point)"), _td(lee["n_tests"])],
        [_td("pseudo-scans"), _td(lee["n_pseudo_scans"])],
        [_td("effective trials"), _td(_number(lee["effective_trials"]))],
        [_td("method"), _td(lee["method"])],
    ]
    note = ""
    if lee["global_z_is_lower_limit"]:
        note = (
            '<p class="note">No pseudo-scan reached the observed excess: the scan-global Z is a '
            "lower limit set by the number of pseudo-scans.</p>"
        )
    return _table(("quantity", "value"), rows, 'id="look-elsewhere"') + note


def _checks_markup(checks: list[dict[str, Any]]) -> str:
    items = []
    for check in checks:
        verdict = check.get("status") or ("pass" if check["passed"] else "fail")
        numbers = ", ".join(
            f"{_e(k)} {_e(_number(v))}" for k, v in sorted(check.get("numbers", {}).items())
        )
        items.append(
            f'<div><span class="{verdict}">{_e(check["name"])}: {verdict}</span> '
            f'<span class="mono">{numbers}</span></div>'
        )
    return "".join(items)


def _background_decision_markup(row: dict[str, Any]) -> str:
    parts = [
        f'<h3 id="decision-{row["seq"]}">{_e(row["kind"])} (decision seq {row["seq"]}, '
        f"{_e(row['step_id'])}): chosen <b>{_e(row['chosen'])}</b> by {_e(row['policy'])}</h3>",
        f"<p>{_e(row['rationale'])}</p><p>gate: {_e(row['gate'])}</p>",
    ]
    if row["tests"]:
        parts.append(
            _table(
                (
                    "method",
                    "lower",
                    "higher",
                    "chi2 lower",
                    "chi2 higher",
                    "bins",
                    "statistic",
                    "p",
                    "significant",
                    "note",
                ),
                (
                    [
                        _td(t.get("method")),
                        _td(t.get("lower")),
                        _td(t.get("higher")),
                        _td(_number(t.get("chi2_lower")), cls="num"),
                        _td(_number(t.get("chi2_higher")), cls="num"),
                        _td(t.get("n_bins"), cls="num"),
                        _td(_number(t.get("test_statistic")), cls="num"),
                        _td(_number(t.get("p_value")), cls="num"),
                        _td(_number(t.get("significant"))),
                        _td(t.get("note")),
                    ]
                    for t in row["tests"]
                ),
                'class="tests"',
            )
        )
    fits_by_function = {c["function"]: c for c in row["tool_candidates"]}

    def quality(function: str, key: str) -> str:
        fit = fits_by_function.get(function)
        return "-" if fit is None else _number(fit.get(key))

    parts.append(
        _table(
            ("function", "source", "deviance", "ndf", "fit p", "passed", "robustness checks"),
            (
                [
                    _td(c["function"]),
                    _td(c["source"]),
                    _td(quality(c["function"], "deviance"), cls="num"),
                    _td(quality(c["function"], "ndf"), cls="num"),
                    _td(quality(c["function"], "p_value"), cls="num"),
                    _td("pass" if c["passed"] else "fail", cls="pass" if c["passed"] else "fail"),
                    _raw_td(_checks_markup(c["checks"])),
                ]
                for c in row["candidates"]
            ),
            'class="candidates"',
        )
    )
    fallback = row.get("fallback")
    if fallback:
        parts.append(
            '<p>Symbolic fallback: <span class="mono">'
            f"{_e(fallback.get('expression', fallback))}</span></p>"
            f"<pre>{_e(json.dumps(fallback, indent=1)[:3000])}</pre>"
        )
    if row["tool_call_seq"] is not None:
        parts.append(
            f'<p><a href="../tool_calls.html#call-{row["tool_call_seq"]}">the choose_background '
            "tool call</a></p>"
        )
    parts.append(_annotation_list(row["annotations"]))
    return "".join(parts)


def _spectrum_page(
    run: RunRecord, spectrum: str, index: int, figures: _Figures, style: plots.PlotStyle
) -> str:
    story = spectrum_story(run, spectrum, index)
    point = run.points[index]
    title = f"{spectrum} at {story['point_pb']:.4g} pb"
    parts = [f'<p><a href="../index.html">report</a></p><h1>{_e(title)}</h1>']
    parts.append(
        f"<p>status: <b>{_e(story['status'])}</b>"
        + (f" ({_e(story['reason'])})" if story["reason"] else "")
        + "</p>"
    )
    result = story["result"] or {}
    k = SPECTRUM_NAMES.index(spectrum)
    if "counts" in point and story["status"] != "skipped":
        counts = point["counts"][k]
        bins = tuple(result["bins"]) if result.get("bins") else None
        background = None
        background_error = None
        if bins is not None and "background" in point:
            background = point["background"][k][bins[0] : bins[1]]
            if "background_error" in point:
                background_error = point["background_error"][k][bins[0] : bins[1]]
        window = tuple(result["window_gev"]) if result.get("window_gev") else None
        masked = tuple(result["masked_window_gev"]) if result.get("masked_window_gev") else None
        figure = plots.spectrum_plot(
            point["edges"],
            counts,
            background,
            bins,
            window,
            masked,
            title,
            style,
            background_error=background_error,
        )
        parts.append(
            figures.img(figure, spectrum_slug(spectrum, index), f"spectrum {title}", prefix="../")
        )
        parts.append(
            '<p class="note">Background: the accepted fit\'s expected counts per bin '
            "(points/point-NNN.npz), with its 1-sigma fit uncertainty as a shaded band "
            "(the fit covariance propagated linearly to each bin, background_error in the "
            "same file; absent for runs made before it existed). Lower panel: "
            "(n - B)/sqrt(B) per bin, for display only, with the band as (+-sigma_B)/sqrt(B)."
            "</p>"
        )
    excess = story["excess"]
    if excess is not None:
        parts.append(
            _table(
                ("local p", "local Z", "spectrum-global Z", "scan-global Z", "window (GeV)"),
                [
                    [
                        _td(_number(excess["local_p"]), value=excess["local_p"], cls="num"),
                        _td(_number(excess["local_z"]), value=excess["local_z"], cls="num"),
                        _td(
                            ("> " if excess["global_z_is_lower_limit"] else "")
                            + _number(excess["global_z"]),
                            value=excess["global_z"],
                            cls="num",
                        ),
                        _td(_number(excess["scan_global_z"]), cls="num"),
                        _td(f"{excess['window_gev'][0]:.1f} - {excess['window_gev'][1]:.1f}"),
                    ]
                ],
                'id="excess"',
            )
        )
    parts.append("<h2>Decisions</h2>")
    for row in story["decisions"]:
        if row["kind"] in BACKGROUND_KINDS:
            parts.append(_background_decision_markup(row))
        else:
            parts.append(
                f'<h3 id="decision-{row["seq"]}">{_e(row["kind"])} (decision seq {row["seq"]}, '
                f"{_e(row['step_id'])}, {_e(row['policy'])}): {_e(json.dumps(row['chosen']))}"
                f"</h3><p>{_e(row['rationale'])}</p>"
                + (f"<p>gate: {_e(row['gate'])}</p>" if row["gate"] else "")
                + (
                    f'<p class="mono">numbers: {_e(json.dumps(row["numbers"]))}</p>'
                    if row["numbers"]
                    else ""
                )
                + _annotation_list(row["annotations"])
            )
    if story["fits"]:
        parts.append("<h2>Fits</h2>")
        parts.append(
            _table(
                ("function", "parameters", "chi2", "ndf", "p", "fit range (GeV)", "passed"),
                (
                    [
                        _td(f["function"]),
                        _td(json.dumps(f["parameters"]), cls="mono"),
                        _td(_number(f["chi2"]), cls="num"),
                        _td(f["ndf"], cls="num"),
                        _td(_number(f["p_value"]), cls="num"),
                        _td(json.dumps(f["fit_range"])),
                        _td(_number(bool(f["passed"]))),
                    ]
                    for f in story["fits"]
                ),
            )
        )
    for call in story["searches"]:
        parts.append(
            f'<p><a href="../tool_calls.html#call-{call["seq"]}">search_spectrum tool call '
            f"(seq {call['seq']})</a></p>"
        )
    parts.append(f"<h2>In the terminal</h2><pre>{_e(why_text(story))}</pre>")
    return _page(title, "".join(parts))


def _tool_calls_page(run: RunRecord) -> str:
    parts = ['<p><a href="index.html">report</a></p><h1>Tool calls</h1>']
    step = None
    for call in run.tool_calls:
        if call["step_id"] != step:
            step = call["step_id"]
            parts.append(f'<h2 id="step-{_e(step)}">{_e(step)}</h2>')
        output = call["output"]
        text = output if isinstance(output, str) else json.dumps(output)
        inputs = call["input"] if isinstance(call["input"], str) else json.dumps(call["input"])
        parts.append(
            f'<div id="call-{call["seq"]}"><b>{_e(call["tool"])}</b> {_e(call["key"])} '
            f"(seq {call['seq']}, {_number(call['seconds'])} s, worker {_e(call['worker'])}, "
            f"replayable {_number(bool(call['replayable']))})"
            f'<div class="mono">input sha256 {_e(call["input_sha256"])}; output sha256 '
            f"{_e(call['output_sha256'])}</div>"
            f"<details><summary>input</summary><pre>{_e((inputs or '')[:4000])}</pre></details>"
            f"<details><summary>output</summary><pre>{_e((text or '')[:8000])}</pre></details>"
            "</div>"
        )
    return _page("tool calls", "".join(parts))


def _counting_note(limits: dict[str, Any]) -> str:
    """How many limits are the exact CLs of their window count (older files: none said)."""
    flags = [flag for c in limits["curves"] for flag in c.get("counting", [])]
    if not flags:
        return ""
    return (
        f"{sum(flags)} of them, whose window expects less than {LOW_COUNT_BACKGROUND:g} "
        "background events, are the "
        "exact CLs of the window count (column counting); the others asymptotic."
    )


def _limits_section(
    run_dir: Path, folder: Path, figures: _Figures, style: plots.PlotStyle
) -> list[str]:
    """The limits of RUN/limits.json (`anomscan limits`), one figure per AR point; none: nothing."""
    import os

    path = run_dir / "limits.json"
    if not path.is_file():
        return []
    limits = _json(path.read_text())
    points = sorted({float(c["point_pb"]) for c in limits["curves"]})
    link = os.path.relpath(path, folder)
    csv_link = os.path.relpath(run_dir / "limits.csv", folder)
    parts = [
        '<h2 id="limits">95 % CL limits on Gaussian signals</h2>',
        f'<p class="note">{limits["n_limits"]} limits ({_e(limits["method"])} CLs, '
        f"{_e(limits['test_statistic'])}; background uncertainty: {_e(limits['nuisance'])}), "
        f"search luminosity {limits['search_luminosity_pb']:.6g} pb^-1; solid: observed, "
        "dashed: expected median, shaded: +-1 and +-2 sigma. "
        f"{_counting_note(limits)} Numbers: "
        f'<a href="{_e(link)}">limits.json</a>, <a href="{_e(csv_link)}">limits.csv</a>.</p>',
    ]
    for k, point in enumerate(points):
        curves = [c for c in limits["curves"] if math.isclose(float(c["point_pb"]), point)]
        parts.append(f"<h3>AR point {point_text(point)} pb</h3>")
        parts.append(
            figures.img(
                plots.limit_curves_plot(curves, point, style),
                f"limits-{k:03d}",
                f"95 % CL limits at the AR point {point_text(point)} pb",
            )
        )
    return parts


@dataclass(frozen=True)
class ReportOutcome:
    """Where the report went and what it holds."""

    index: Path
    pages: int
    plots_written: tuple[Path, ...]


def write_report(
    run_dir: Path,
    output: Path | None = None,
    *,
    style: plots.PlotStyle = "Simulation",
    fmt: plots.PlotFormat = "png",
    placement: PlotPlacement = "embedded",
    progress: Callable[[int, int], None] | None = None,
) -> ReportOutcome:
    """Write RUN/report/index.html, a page per spectrum x point and the tool-call page.

    `progress(pages_done, pages_total)` is called after each spectrum page.
    """
    run = load_run(run_dir)
    folder = output or run_dir / "report"
    try:
        (folder / "spectra").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the report folder {folder}: {error.strerror}; give a writable -o"
        ) from error
    figures = _Figures(folder, fmt, placement)
    results = run.results
    local_z, marks, _ = _map_arrays(run)
    map_image = figures.img(
        plots.significance_map(local_z, marks, results["points_pb"], SPECTRUM_NAMES, style),
        "significance-map",
        "significance map: AR points x 63 spectra, colour = local Z",
    )
    lee = results.get("look_elsewhere")
    headline = (
        f"{len(results['points_pb'])} AR points, {len(results['excesses'])} (spectrum, point) "
        f"excess tests, {len(results['skipped'])} skipped; scan-global Z "
        + (
            "-"
            if results["scan_global_z"] is None
            else ("> " if results["scan_global_z_is_lower_limit"] else "")
            + _number(results["scan_global_z"])
        )
        + (f" for {lee['best']['spectrum']}" if lee else "")
    )
    from agent.review.reinterp import reinterpretation_contents, reinterpretation_section

    contents = [
        ("#map", "significance map"),
        ("#excess-table", "excesses"),
        ("#lee", "look-elsewhere"),
        *([("#limits", "limits")] if (run_dir / "limits.json").is_file() else []),
        ("#timeline-section", "decisions"),
        ("#run", "run"),
        ("#ae", "autoencoder"),
        *((f"#{anchor}", label) for anchor, label in reinterpretation_contents(run_dir)),
        ("tool_calls.html", "tool calls"),
    ]
    body = [
        f"<h1>anomscan report: {_e(results['run_id'])}</h1>",
        f'<p id="headline">{_e(headline)}. Luminosity {results["luminosity_pb"]:g} pb^-1. '
        f"Sweep ended: {_e(_stop_text(results['stop_reason']))}</p>",
        '<p id="contents">'
        + " | ".join(f'<a href="{_e(href)}">{_e(label)}</a>' for href, label in contents)
        + "</p>",
        '<h2 id="map">Significance map</h2>',
        map_image,
        '<p class="note">Each cell links to its spectrum page: data, background, window, '
        "function choice and every decision.</p>",
        _map_table(run, local_z, marks),
        '<h2 id="excess-table">Ranked excesses</h2>',
        '<p class="note">From results.json; local Z of the BumpHunter window, spectrum-global '
        "Z from its toys (&gt;: lower limit from the toy count), scan-global Z on the largest "
        "excess only.</p>",
        _excess_table(run),
        '<h2 id="lee">Scan-wide look-elsewhere</h2>',
        _lee_section(run),
        *_limits_section(run_dir, folder, figures, style),
        '<h2 id="timeline-section">Decision timeline</h2>',
        _timeline(run),
        "<h3>LLM messages</h3>",
        _llm_section(run),
        '<h2 id="run">Run configuration</h2>',
        _config_section(run),
        '<h2 id="ae">Autoencoder</h2>',
        _autoencoder_section(run, figures, style),
    ]
    body.append(reinterpretation_section(run_dir, figures.img, style, folder))
    (folder / "index.html").write_text(_page(f"anomscan report {results['run_id']}", "".join(body)))
    pages = 1
    total = len(run.points) * len(SPECTRUM_NAMES)
    for index in range(len(run.points)):
        for spectrum in SPECTRUM_NAMES:
            page = _spectrum_page(run, spectrum, index, figures, style)
            (folder / "spectra" / f"{spectrum_slug(spectrum, index)}.html").write_text(page)
            pages += 1
            if progress is not None:
                progress(pages - 1, total)
    (folder / "tool_calls.html").write_text(_tool_calls_page(run))
    return ReportOutcome(folder / "index.html", pages + 1, tuple(figures.written))


__all__ = [
    "AuditError",
    "ReportOutcome",
    "load_run",
    "spectrum_story",
    "why_text",
    "write_report",
]
