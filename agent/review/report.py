"""What a reviewer reads after a scan: RUN/report/ (static HTML).

The index page (headline, significance map, ranked excesses, look-elsewhere, limits, the
decision timeline, LLM messages, the run's configuration and hashes, the autoencoder, the
reinterpretation section), a page per spectrum x AR point (agent/review/pages.py) and the
tool-call page. Every spectrum page carries its whole story, but only the pages a reviewer
must look at are drawn (`drawn_pages`: the top excesses, rescues, fallbacks, spectra
without a background, policy refusals); the others say how to draw them
(`anomscan report RUN --spectrum S --point P`, `write_spectrum_page`), since the plots
are what costs (a 27-point scan has 1701 pages). Every number comes from the run folder
as the scan wrote it (agent/review/run.py); the only quantity computed here is the display
residual (n - B)/sqrt(B) of the spectrum plots.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from agent.figures import plots
from agent.figures.common import PlotFormat, PlotStyle
from agent.review.markup import (
    Figures,
    PlotPlacement,
    annotation_list,
    escape,
    html_page,
    html_table,
    raw_td,
    td,
)
from agent.review.pages import spectrum_page, tool_calls_page
from agent.review.reinterp_sections import reinterpretation_contents, reinterpretation_section
from agent.review.run import (
    RunRecord,
    flagged_excesses,
    load_run,
    parse_json,
    same_value,
    spectrum_slug,
)
from agent.review.why import check_spectrum, number_text
from agent.scan.blinding import VISIBLE_KINDS, changes_after, check_unblinded, unblinding
from agent.scan.results import distinct_excesses
from core.anomaly import point_text
from core.autoencoder import read_model_card, training_warnings
from core.errors import InvalidInputError, ModelError
from core.files import write_text
from core.limits import LOW_COUNT_BACKGROUND
from core.masses import SPECTRUM_NAMES
from core.table import score_histograms, table_is_scored


def _cell_mark(status: str | None, function: str | None, fallback_used: bool) -> str:
    if status == "skipped":
        return plots.MARKS["skipped"]
    if status == "no background":
        return plots.MARKS["failed"]
    if fallback_used:
        return plots.MARKS["fallback"]
    return ""


TOP_DRAWN: Final = 20
"""The distinct excesses (largest local Z first) whose pages are drawn at their best point."""

_DRAWN_KINDS: Final = frozenset(
    {
        "provisional",
        "window_exclusion",
        "masked_background",
        "background_masked",
        "rescue_refused",
        "fallback",
    }
)
"""Decisions that make a spectrum page worth drawing: a rescue, a mask, a fallback."""

Pages = Literal["needed", "all"]


def drawn_pages(run: RunRecord) -> set[tuple[str, int]]:
    """(spectrum, point index) of the pages drawn with the report.

    The best point of each of the `TOP_DRAWN` largest distinct excesses, every flagged
    excess, every spectrum without an accepted background, and every spectrum-point with a
    rescue, mask or fallback decision or a policy refusal.
    """
    points = [float(p) for p in run.results["points_pb"]]

    def index_of(point_pb: Any) -> int | None:
        return next((i for i, p in enumerate(points) if same_value(p, point_pb)), None)

    wanted = [(e["spectrum"], e["xsec_pb"]) for e in distinct_excesses(run.results["excesses"])][
        :TOP_DRAWN
    ]
    wanted += [(e["spectrum"], e["xsec_pb"]) for e in flagged_excesses(run)]
    wanted += [
        (row["spectrum"], row["point_pb"])
        for row in run.decisions
        if row["spectrum"]
        and (row["kind"] in _DRAWN_KINDS or str(row["gate"] or "").startswith("refused"))
    ]
    drawn = {(s, i) for s, p in wanted if (i := index_of(p)) is not None}
    for i, point in enumerate(run.points):
        summary = point["summary"] or {"spectra": []}
        drawn |= {(e["spectrum"], i) for e in summary["spectra"] if e["status"] == "no background"}
    return drawn


def map_order(points: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The map's rows: point indices by cross section, and the points where all was skipped.

    A point where every spectrum was skipped (too few events) gets no row; the report lists
    it under the map instead.
    """
    order = sorted(range(len(points)), key=lambda i: float(points[i]["point_pb"]))

    def all_skipped(i: int) -> bool:
        spectra = (points[i]["summary"] or {"spectra": []})["spectra"]
        return bool(spectra) and all(entry["status"] == "skipped" for entry in spectra)

    return [i for i in order if not all_skipped(i)], [i for i in order if all_skipped(i)]


def _map_arrays(
    run: RunRecord, order: Sequence[int]
) -> tuple[np.ndarray, list[list[str]], list[list[str | None]]]:
    """Local Z, marks and statuses of the map's rows (the points of `order`) x 63 spectra."""
    points = [run.points[i] for i in order]
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
            if entry["status"] == "excess" and not run.results.get("blinded"):
                local_z[i, j] = entry["local_z"]
            fallback_used = any(
                s == entry["spectrum"] and same_value(p, point["point_pb"]) for s, p in fallbacks
            )
            marks[i][j] = _cell_mark(entry["status"], entry.get("function"), fallback_used)
    return local_z, marks, statuses


def _map_table(
    run: RunRecord, order: Sequence[int], local_z: np.ndarray, marks: list[list[str]]
) -> str:
    import matplotlib as mpl

    colour_map = mpl.colormaps["viridis"]
    finite = local_z[np.isfinite(local_z)]
    top = float(finite.max()) if finite.size else 1.0
    header = "<tr><th>AR point</th>" + "".join(
        f'<th title="{escape(n)}">{escape(n.replace("/", " "))}</th>' for n in SPECTRUM_NAMES
    )
    rows = []
    for row, i in enumerate(order):
        point = run.points[i]
        cells = [f"<th>{point['point_pb']:.3g} pb</th>"]
        for j, name in enumerate(SPECTRUM_NAMES):
            z = local_z[row, j]
            colour = (
                mpl.colors.to_hex(colour_map(min(1.0, max(0.0, z / top))))
                if np.isfinite(z)
                else "#fff"
            )
            text_colour = "#fff" if np.isfinite(z) and z / top < 0.6 else "#000"
            label = f"{z:.1f}" if np.isfinite(z) else marks[row][j]
            title = f"{name} at {point_text(point['point_pb'])} pb: " + (
                f"local Z {z:.2f}" if np.isfinite(z) else "no excess test"
            )
            cells.append(
                f'<td style="background:{colour}" title="{escape(title)}">'
                f'<a style="color:{text_colour}" href="spectra/{spectrum_slug(name, i)}.html">'
                f"{escape(label)}</a></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div style="overflow-x:auto">'
        f'<table class="map" id="map-table"><thead>{header}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _points_text(points_pb: Sequence[float]) -> str:
    """The AR points where an excess appears: "0.3" or "0.237 - 4.87 (9 points)"."""
    if len(points_pb) == 1:
        return number_text(points_pb[0])
    low, high = number_text(min(points_pb)), number_text(max(points_pb))
    return f"{low} - {high} ({len(points_pb)} points)"


def _excess_table(run: RunRecord) -> str:
    """One row per distinct excess (a spectrum's overlapping windows), at its best point."""
    header = (
        "# (flagged: window exclusion triggered or scan-wide best)",
        "spectrum",
        "AR point (pb)",
        "seen at AR points (pb)",
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
    flagged = [(e["spectrum"], e["window_gev"]) for e in flagged_excesses(run)]
    for rank, excess in enumerate(distinct_excesses(run.results["excesses"]), start=1):
        is_flagged = any(
            spectrum == excess["spectrum"]
            and window[0] < excess["window_gev"][1]
            and excess["window_gev"][0] < window[1]
            for spectrum, window in flagged
        )
        index = run.point_index(excess["xsec_pb"])
        slug = spectrum_slug(excess["spectrum"], index)
        low, high = excess["window_gev"]
        masked = excess.get("masked_window_gev")
        global_text = number_text(excess["global_z"])
        if excess["global_z_is_lower_limit"]:
            global_text = "> " + global_text
        rows.append(
            [
                td(f"{rank} flagged" if is_flagged else rank),
                raw_td(
                    f'<a href="spectra/{slug}.html" data-field="spectrum">'
                    f"{escape(excess['spectrum'])}</a>"
                ),
                td(number_text(excess["xsec_pb"]), value=excess["xsec_pb"], cls="num"),
                td(_points_text(excess["points_pb"]), cls="num"),
                td(f"{low:.1f} - {high:.1f}", value=excess["window_gev"], cls="num"),
                td(number_text(excess["data"]), value=excess["data"], cls="num"),
                td(number_text(excess["background"]), value=excess["background"], cls="num"),
                td(number_text(excess["local_p"]), value=excess["local_p"], cls="num"),
                td(number_text(excess["local_z"]), value=excess["local_z"], cls="num"),
                td(global_text, value=excess["global_z"], cls="num"),
                td(number_text(excess["scan_global_z"]), value=excess["scan_global_z"], cls="num"),
                td(excess["function"], value=excess["function"]),
                td(number_text(excess["fit_p_value"]), value=excess["fit_p_value"], cls="num"),
                td(
                    "-" if masked is None else f"{masked[0]:.1f} - {masked[1]:.1f}",
                    value=masked,
                    cls="num",
                ),
            ]
        )
    return html_table(header, rows, 'id="excesses"')


def _timeline(run: RunRecord) -> str:
    header = ("seq", "step", "kind", "spectrum", "AR pb", "policy", "chosen", "why", "gate",
              "tool calls", "annotations")  # fmt: skip
    points = run.results["points_pb"]
    rows = []
    blinded = bool(run.results.get("blinded"))
    for row in run.decisions:
        if row["kind"] == "skip" or (blinded and row["kind"] not in VISIBLE_KINDS):
            continue
        spectrum = row["spectrum"] or ""
        link = ""
        if spectrum and row["point_pb"] is not None:
            index = next((i for i, p in enumerate(points) if same_value(p, row["point_pb"])), None)
            if index is not None:
                slug = spectrum_slug(spectrum, index)
                link = f'<a href="spectra/{slug}.html">{escape(spectrum)}</a>'
        chosen = row["chosen"]
        chosen_text = chosen if isinstance(chosen, str) else json.dumps(chosen)
        gate = str(row["gate"] or "")
        rows.append(
            [
                f'<td id="decision-{row["seq"]}">{row["seq"]}</td>',
                td(row["step_id"]),
                td(row["kind"]),
                raw_td(link or escape(spectrum)),
                td("" if row["point_pb"] is None else f"{row['point_pb']:.3g}", cls="num"),
                td(row["policy"]),
                td(chosen_text[:120]),
                td(row["rationale"]),
                td(gate, cls="fail" if gate.startswith("refused") else ""),
                raw_td(f'<a href="tool_calls.html#step-{escape(row["step_id"])}">calls</a>'),
                raw_td(annotation_list(run.annotations_of(int(row["seq"])))),
            ]
        )
    skipped = sum(1 for row in run.decisions if row["kind"] == "skip")
    note = (
        f'<p class="note">{skipped} `skip` decisions (too few events) are listed on the '
        "spectrum pages and marked on the map.</p>"
    )
    return note + html_table(header, rows, 'id="timeline"')


def _llm_section(run: RunRecord) -> str:
    if not run.llm_messages:
        return '<p class="note">No LLM messages: the scan ran with a deterministic policy.</p>'
    rows = [
        [
            td(m["seq"]),
            td(m["step_id"]),
            td(m["model"]),
            td(m["role"]),
            raw_td(f"<pre>{escape(m['content'])}</pre>"),
            td(m["tokens"]),
        ]
        for m in run.llm_messages
    ]
    return html_table(("seq", "step", "model", "role", "content", "tokens"), rows, 'id="llm"')


def _config_section(run: RunRecord) -> str:
    start = next((r for r in run.runs if r["event"] == "start"), None)
    finish = [r for r in run.runs if r["event"] == "finish"]
    parts = []
    if start is not None:
        config = start["config"] or {}
        parts.append(
            html_table(
                ("setting", "value"),
                ([td(k), td(json.dumps(v))] for k, v in sorted(config.items())),
                'id="config"',
            )
        )
        versions = start["versions"] or {}
        parts.append("<h3>Versions</h3>")
        parts.append(
            html_table(
                ("package", "version"),
                ([td(k), td(v)] for k, v in sorted(versions.items())),
                'id="versions"',
            )
        )
    parts.append("<h3>Inputs and hashes (SHA-256)</h3>")
    rows = [
        [td(a["kind"]), td(a["path"], cls="mono"), td(a["sha256"], cls="mono"), td(a["bytes"])]
        for a in run.artifacts
        if a["kind"] in ("input", "model", "event table part")
    ]
    if finish:
        last = finish[-1]
        rows.append([td("model (run)"), td(""), td(last["model_sha256"], cls="mono"), td("")])
    rows.append(
        [
            td("event table"),
            td("events/"),
            td(run.results.get("table_sha256"), cls="mono"),
            td(""),
        ]
    )
    plan = next((r for r in run.runs if r["event"] == "plan"), None)
    if plan is not None:
        # the plan committed before the data were read (`anomscan audit plan RUN`)
        hashes = (
            ("plan", f"audit seq {plan['seq']}", plan["config"]["plan_sha256"]),
            ("code", "core/ tools/ agent/", plan["config"]["code_sha256"]),
            ("data", "the inputs, paths aside", plan["inputs"]["data_sha256"]),
        )
        rows += [
            [td(kind), td(what), td(digest, cls="mono"), td("")] for kind, what, digest in hashes
        ]
    parts.append(html_table(("kind", "path", "sha256", "bytes"), rows, 'id="hashes"'))
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


def _autoencoder_section(run: RunRecord, figures: Figures, style: PlotStyle) -> str:
    parts = []
    model = _model_path(run)
    if model is None:
        return '<p class="note">No model artifact in the audit.</p>'
    try:
        card = read_model_card(model)
    except ModelError as error:
        parts.append(f'<p class="note">Model card not readable: {escape(error)}</p>')
    else:
        parts.append(
            f"<p>{escape(model)}: {card.n_training_events} training events (fraction "
            f"{card.fraction:g}, seed {card.seed}), hidden {list(card.hidden_sizes)}, best epoch "
            f"{card.best_epoch + 1} of {len(card.loss_train)}, ONNX sha256 "
            f'<span class="mono">{escape(card.onnx_sha256)}</span></p>'
        )
        parts.extend(
            f'<p class="note warning">Warning: {escape(text)}.</p>'
            for text in training_warnings(card)
        )
        figure = plots.loss_curves(card.loss_train, card.loss_validation, card.best_epoch, style)
        parts.append(figures.img(figure, "loss", "autoencoder loss curves"))
    events = run.run_dir / "events"
    if events.is_dir() and table_is_scored(events):
        histograms = score_histograms(events)
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
        figure = plots.score_distributions(histograms, cuts, style)
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
        [td("largest excess"), td(f"{best['spectrum']} at {best['cross_section_pb']:.4g} pb")],
        [td("window (GeV)"), td(f"{best['window'][0]:.1f} - {best['window'][1]:.1f}")],
        [td("local p"), td(number_text(lee["local_p"]), value=lee["local_p"], cls="num")],
        [td("local Z"), td(number_text(lee["local_z"]), value=lee["local_z"], cls="num")],
        [td("scan-global p"), td(number_text(lee["global_p"]), value=lee["global_p"], cls="num")],
        [
            td("scan-global Z"),
            td(
                ("> " if lee["global_z_is_lower_limit"] else "") + number_text(lee["global_z"]),
                value=lee["global_z"],
                cls="num",
            ),
        ],
        [td("tests (spectrum x point)"), td(lee["n_tests"])],
        [td("pseudo-scans"), td(lee["n_pseudo_scans"])],
        [td("effective trials"), td(number_text(lee["effective_trials"]))],
        [td("method"), td(lee["method"])],
    ]
    note = ""
    if lee["global_z_is_lower_limit"]:
        note = (
            '<p class="note">No pseudo-scan reached the observed excess: the scan-global Z is a '
            "lower limit set by the number of pseudo-scans.</p>"
        )
    return html_table(("quantity", "value"), rows, 'id="look-elsewhere"') + note


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


def _limits_section(run_dir: Path, folder: Path, figures: Figures, style: PlotStyle) -> list[str]:
    """The limits of RUN/limits.json (`anomscan limits`), one figure per AR point; none: nothing."""
    path = run_dir / "limits.json"
    if not path.is_file():
        return []
    limits = parse_json(path.read_text())
    points = sorted({float(c["point_pb"]) for c in limits["curves"]})
    link = os.path.relpath(path, folder)
    csv_link = os.path.relpath(run_dir / "limits.csv", folder)
    parts = [
        '<h2 id="limits">95 % CL limits on Gaussian signals</h2>',
        f'<p class="note">{limits["n_limits"]} limits ({escape(limits["method"])} CLs, '
        f"{escape(limits['test_statistic'])}; background uncertainty: "
        f"{escape(limits['nuisance'])}), "
        f"search luminosity {limits['search_luminosity_pb']:.6g} pb^-1; solid: observed"
        + (" (sealed until unblinding)" if "observed" in limits else "")
        + ", dashed: expected median, shaded: +-1 and +-2 sigma. "
        f"{_counting_note(limits)} Numbers: "
        f'<a href="{escape(link)}">limits.json</a>, '
        f'<a href="{escape(csv_link)}">limits.csv</a>.</p>',
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


def _blinded_note(what: str) -> str:
    return (
        f'<p class="note" id="blinded-{what}">Blinded scan: the {what} are sealed until '
        "`anomscan unblind RUN --by NAME`.</p>"
    )


def _blinded_lee_section(run: RunRecord) -> str:
    """The look-elsewhere test of a blinded scan: its method and size, not its result."""
    lee = run.results.get("look_elsewhere") or {}
    rows = [[td(key.replace("_", " ")), td(value)] for key, value in lee.items()]
    return html_table(("quantity", "value"), rows, 'id="look-elsewhere"') + _blinded_note(
        "look-elsewhere result and the scan-global Z"
    )


def _unblinding_note(run_dir: Path) -> str:
    """For an unblinded scan: who unblinded it, when, and what changed since (rows)."""
    row = unblinding(run_dir)
    if row is None:
        return ""
    record = row["config"]
    text = (
        f"Blinded plan (sha256 {record['plan_sha256']}), unblinded by {record['by']} at "
        f"{record['at']} (audit seq {row['seq']})"
        + (f": {record['note']}" if record["note"] else "")
    )
    changes = changes_after(run_dir, int(row["seq"]))
    if not changes:
        return f'<p id="unblinding">{escape(text)}; no change after unblinding.</p>'
    listed = "; ".join(f"{table} seq {seq} ({key})" for table, seq, key in changes)
    return (
        f'<p id="unblinding" class="warning">{escape(text)}; {len(changes)} rows were '
        f"added after unblinding: {escape(listed)}</p>"
    )


def _headline(results: dict[str, Any]) -> str:
    """Points, excess tests, skipped spectra and the scan-global Z of the largest excess."""
    if results.get("blinded"):
        return (
            f"Blinded scan: {len(results['points_pb'])} AR points, "
            f"{len(results['backgrounds'])} accepted backgrounds, {len(results['skipped'])} "
            f"skipped; the excesses and the look-elsewhere result are sealed in "
            f"{results['blinded']['sealed']} until `{results['blinded']['unblind']}`"
        )
    lee = results.get("look_elsewhere")
    return (
        f"{len(results['points_pb'])} AR points, {len(results['excesses'])} (spectrum, point) "
        f"excess tests, {len(results['skipped'])} skipped; scan-global Z "
        + (
            "-"
            if results["scan_global_z"] is None
            else ("> " if results["scan_global_z_is_lower_limit"] else "")
            + number_text(results["scan_global_z"])
        )
        + (f" for {lee['best']['spectrum']}" if lee else "")
    )


def _contents(run_dir: Path) -> list[tuple[str, str]]:
    """(href, label) of every section of the index page, in its order, and the tool calls."""
    return [
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


def _index_page(run: RunRecord, folder: Path, figures: Figures, style: PlotStyle) -> str:
    """The index page: headline, contents, then every section (figures in page order)."""
    results = run.results
    order, all_skipped = map_order(run.points)
    local_z, marks, _ = _map_arrays(run, order)
    rows_pb = [run.points[i]["point_pb"] for i in order]
    map_image = figures.img(
        plots.significance_map(local_z, marks, rows_pb, SPECTRUM_NAMES, style),
        "significance-map",
        "significance map: AR points x 63 spectra, colour = local Z",
    )
    skipped_note = (
        '<p class="note">Not on the map, every spectrum skipped (too few events): '
        + ", ".join(f"{point_text(run.points[i]['point_pb'])} pb" for i in all_skipped)
        + ".</p>"
        if all_skipped
        else ""
    )
    contents = _contents(run.run_dir)
    blinded = bool(results.get("blinded"))
    # why the sweep ended may name the excesses it followed: not in a blinded report
    ended = "" if blinded else f" Sweep ended: {escape(_stop_text(results['stop_reason']))}"
    body = [
        f"<h1>anomscan report: {escape(results['run_id'])}</h1>",
        f'<p id="headline">{escape(_headline(results))}. Luminosity '
        f"{results['luminosity_pb']:g} pb^-1.{ended}</p>",
        _unblinding_note(run.run_dir),
        '<p id="contents">'
        + " | ".join(f'<a href="{escape(href)}">{escape(label)}</a>' for href, label in contents)
        + "</p>",
        '<h2 id="map">Significance map</h2>',
        map_image,
        '<p class="note">AR points by cross section, refinements in place. Each cell links '
        "to its spectrum page: data, background, window, function choice and every "
        "decision.</p>",
        skipped_note,
        _map_table(run, order, local_z, marks),
        '<h2 id="excess-table">Ranked excesses</h2>',
        '<p class="note">From results.json, one row per distinct excess (a spectrum\'s '
        "overlapping windows) at the AR point of its largest local Z, with every point where "
        "it appears; local Z of the BumpHunter window, spectrum-global Z from its toys "
        "(&gt;: lower limit from the toy count), scan-global Z on the largest excess only. "
        "Every row of every point: results.csv.</p>",
        _blinded_note("excesses") if blinded else _excess_table(run),
        '<h2 id="lee">Scan-wide look-elsewhere</h2>',
        _blinded_lee_section(run) if blinded else _lee_section(run),
        *_limits_section(run.run_dir, folder, figures, style),
        '<h2 id="timeline-section">Decision timeline</h2>',
        _timeline(run),
        "<h3>LLM messages</h3>",
        _blinded_note("LLM messages") if results.get("blinded") else _llm_section(run),
        '<h2 id="run">Run configuration</h2>',
        _config_section(run),
        '<h2 id="ae">Autoencoder</h2>',
        _autoencoder_section(run, figures, style),
    ]
    body.append(reinterpretation_section(run.run_dir, figures.img, style, folder))
    return html_page(f"anomscan report {results['run_id']}", "".join(body))


def write_report(
    run_dir: Path,
    output: Path | None = None,
    *,
    style: PlotStyle = "Simulation",
    fmt: PlotFormat = "png",
    placement: PlotPlacement = "embedded",
    pages: Pages = "needed",
    progress: Callable[[int, int], None] | None = None,
) -> ReportOutcome:
    """Write RUN/report/index.html, a page per spectrum x point and the tool-call page.

    With `pages` "needed" only the pages of `drawn_pages` get their figure; "all" draws
    every one. `progress(pages_done, pages_total)` is called after each spectrum page.
    """
    run = load_run(run_dir)
    folder = _report_folder(run_dir, output)
    figures = Figures(folder, fmt, placement)
    write_text(folder / "index.html", _index_page(run, folder, figures, style), what="report")
    blinded = bool(run.results.get("blinded"))
    drawn = set() if blinded else drawn_pages(run)
    count = 1
    total = len(run.points) * len(SPECTRUM_NAMES)
    for index in range(len(run.points)):
        for spectrum in SPECTRUM_NAMES:
            figure = pages == "all" or (spectrum, index) in drawn
            page = spectrum_page(
                run, spectrum, index, figures, style, figure=figure, blinded=blinded
            )
            path = folder / "spectra" / f"{spectrum_slug(spectrum, index)}.html"
            write_text(path, page, what="report page")
            count += 1
            if progress is not None:
                progress(count - 1, total)
    calls = tool_calls_page(run, blinded=blinded)
    write_text(folder / "tool_calls.html", calls, what="report page")
    return ReportOutcome(folder / "index.html", count + 1, tuple(figures.written))


def write_spectrum_page(
    run_dir: Path,
    spectrum: str,
    point: float | str,
    output: Path | None = None,
    *,
    style: PlotStyle = "Simulation",
    fmt: PlotFormat = "png",
    placement: PlotPlacement = "embedded",
) -> Path:
    """Draw one spectrum page (`point` in pb or "#INDEX") into the report folder; its path.

    Raises InvalidInputError for a spectrum or point the run does not have.
    """
    check_spectrum(spectrum)
    check_unblinded(run_dir, "a drawn spectrum page")
    run = load_run(run_dir)
    index = run.point_index(point)
    folder = _report_folder(run_dir, output)
    page = spectrum_page(run, spectrum, index, Figures(folder, fmt, placement), style)
    path = folder / "spectra" / f"{spectrum_slug(spectrum, index)}.html"
    return write_text(path, page, what="report page")


def _report_folder(run_dir: Path, output: Path | None) -> Path:
    """The report folder (default RUN/report) with its spectra/ folder made."""
    folder = output or run_dir / "report"
    try:
        (folder / "spectra").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the report folder {folder}: {error.strerror}; give a writable -o"
        ) from error
    return folder
