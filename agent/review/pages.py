"""The report's pages of one spectrum at one AR point, and the page of every tool call.

A spectrum page shows the data with the accepted background and its band, the excess, every
decision (background choices with their candidates, tests and checks), the fits, the
searches and the `--why` text; the tool-call page every logged input and output.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from agent.figures import plots
from agent.figures.common import PlotStyle
from agent.review.markup import Figures, annotation_list, escape, html_page, html_table, raw_td, td
from agent.review.run import RunRecord, spectrum_slug
from agent.review.why import BACKGROUND_KINDS, number_text, spectrum_story, why_text
from agent.scan.blinding import VISIBLE_KINDS
from core.masses import SPECTRUM_NAMES


def _checks_markup(checks: list[dict[str, Any]]) -> str:
    """Each robustness check of a candidate: verdict (coloured) and its numbers."""
    items = []
    for check in checks:
        verdict = check.get("status") or ("pass" if check["passed"] else "fail")
        numbers = ", ".join(
            f"{escape(k)} {escape(number_text(v))}"
            for k, v in sorted(check.get("numbers", {}).items())
        )
        items.append(
            f'<div><span class="{verdict}">{escape(check["name"])}: {verdict}</span> '
            f'<span class="mono">{numbers}</span></div>'
        )
    return "".join(items)


def _tests_table(tests: list[dict[str, Any]]) -> str:
    """The nested-function tests (F-test, likelihood ratio) of a background choice."""
    return html_table(
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
                td(t.get("method")),
                td(t.get("lower")),
                td(t.get("higher")),
                td(number_text(t.get("chi2_lower")), cls="num"),
                td(number_text(t.get("chi2_higher")), cls="num"),
                td(t.get("n_bins"), cls="num"),
                td(number_text(t.get("test_statistic")), cls="num"),
                td(number_text(t.get("p_value")), cls="num"),
                td(number_text(t.get("significant"))),
                td(t.get("note")),
            ]
            for t in tests
        ),
        'class="tests"',
    )


def _candidates_table(row: dict[str, Any]) -> str:
    """The candidate functions of a background choice: fit quality, verdict, checks."""
    fits_by_function = {c["function"]: c for c in row["tool_candidates"]}

    def quality(function: str, key: str) -> str:
        fit = fits_by_function.get(function)
        return "-" if fit is None else number_text(fit.get(key))

    return html_table(
        ("function", "source", "deviance", "ndf", "fit p", "passed", "robustness checks"),
        (
            [
                td(c["function"]),
                td(c["source"]),
                td(quality(c["function"], "deviance"), cls="num"),
                td(quality(c["function"], "ndf"), cls="num"),
                td(quality(c["function"], "p_value"), cls="num"),
                td("pass" if c["passed"] else "fail", cls="pass" if c["passed"] else "fail"),
                raw_td(_checks_markup(c["checks"])),
            ]
            for c in row["candidates"]
        ),
        'class="candidates"',
    )


def _background_decision_markup(row: dict[str, Any]) -> str:
    """A background decision: choice, tests, candidates, fallback, its tool call, annotations."""
    parts = [
        f'<h3 id="decision-{row["seq"]}">{escape(row["kind"])} (decision seq {row["seq"]}, '
        f"{escape(row['step_id'])}): chosen <b>{escape(row['chosen'])}</b> by "
        f"{escape(row['policy'])}</h3>",
        f"<p>{escape(row['rationale'])}</p><p>gate: {escape(row['gate'])}</p>",
    ]
    if row["tests"]:
        parts.append(_tests_table(row["tests"]))
    parts.append(_candidates_table(row))
    fallback = row.get("fallback")
    if fallback:
        parts.append(
            '<p>Symbolic fallback: <span class="mono">'
            f"{escape(fallback.get('expression', fallback))}</span></p>"
            f"<pre>{escape(json.dumps(fallback, indent=1)[:3000])}</pre>"
        )
    if row["tool_call_seq"] is not None:
        parts.append(
            f'<p><a href="../tool_calls.html#call-{row["tool_call_seq"]}">the choose_background '
            "tool call</a></p>"
        )
    parts.append(annotation_list(row["annotations"]))
    return "".join(parts)


def _decision_markup(row: dict[str, Any]) -> str:
    """Any decision: background ones in full, the others as choice, rationale and numbers."""
    if row["kind"] in BACKGROUND_KINDS:
        return _background_decision_markup(row)
    return (
        f'<h3 id="decision-{row["seq"]}">{escape(row["kind"])} (decision seq {row["seq"]}, '
        f"{escape(row['step_id'])}, {escape(row['policy'])}): "
        f"{escape(json.dumps(row['chosen']))}</h3><p>{escape(row['rationale'])}</p>"
        + (f"<p>gate: {escape(row['gate'])}</p>" if row["gate"] else "")
        + (
            f'<p class="mono">numbers: {escape(json.dumps(row["numbers"]))}</p>'
            if row["numbers"]
            else ""
        )
        + annotation_list(row["annotations"])
    )


SPECTRUM_NOTE = (
    '<p class="note">Background: the accepted fit\'s expected counts per bin '
    "(points/point-NNN.npz), with its 1-sigma fit uncertainty as a shaded band "
    "(the fit covariance propagated linearly to each bin, background_error in the "
    "same file; absent for runs made before it existed). Lower panel: "
    "(n - B)/sqrt(B) per bin, for display only, with the band as (+-sigma_B)/sqrt(B)."
    "</p>"
)
"""The note under every spectrum figure."""


def _spectrum_figure(
    story: dict[str, Any], point: dict[str, Any], title: str, figures: Figures, style: PlotStyle
) -> str:
    """The spectrum with its accepted background and band, window and mask, and its note."""
    result = story["result"] or {}
    k = SPECTRUM_NAMES.index(story["spectrum"])
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
    slug = spectrum_slug(story["spectrum"], story["index"])
    return figures.img(figure, slug, f"spectrum {title}", prefix="../") + SPECTRUM_NOTE


def _excess_markup(excess: dict[str, Any]) -> str:
    """The spectrum's excess at this point as results.json has it."""
    return html_table(
        ("local p", "local Z", "spectrum-global Z", "scan-global Z", "window (GeV)"),
        [
            [
                td(number_text(excess["local_p"]), value=excess["local_p"], cls="num"),
                td(number_text(excess["local_z"]), value=excess["local_z"], cls="num"),
                td(
                    ("> " if excess["global_z_is_lower_limit"] else "")
                    + number_text(excess["global_z"]),
                    value=excess["global_z"],
                    cls="num",
                ),
                td(number_text(excess["scan_global_z"]), cls="num"),
                td(f"{excess['window_gev'][0]:.1f} - {excess['window_gev'][1]:.1f}"),
            ]
        ],
        'id="excess"',
    )


def _fits_markup(fits: list[dict[str, Any]]) -> str:
    """The fits rows of the spectrum at this point."""
    return "<h2>Fits</h2>" + html_table(
        ("function", "parameters", "chi2", "ndf", "p", "fit range (GeV)", "passed"),
        (
            [
                td(f["function"]),
                td(json.dumps(f["parameters"]), cls="mono"),
                td(number_text(f["chi2"]), cls="num"),
                td(f["ndf"], cls="num"),
                td(number_text(f["p_value"]), cls="num"),
                td(json.dumps(f["fit_range"])),
                td(number_text(bool(f["passed"]))),
            ]
            for f in fits
        ),
    )


def spectrum_page(
    run: RunRecord,
    spectrum: str,
    index: int,
    figures: Figures,
    style: PlotStyle,
    *,
    figure: bool = True,
    blinded: bool = False,
) -> str:
    """The page of `spectrum` at AR point number `index`: its story in HTML, and its figure.

    Without `figure` the page says how to draw it (`anomscan report RUN --spectrum ...`).
    A `blinded` page shows the background decisions only (`agent.scan.blinding`).
    """
    story = spectrum_story(run, spectrum, index)
    point = run.points[index]
    title = f"{spectrum} at {story['point_pb']:.4g} pb"
    parts = [f'<p><a href="../index.html">report</a></p><h1>{escape(title)}</h1>']
    parts.append(
        f"<p>status: <b>{escape(story['status'])}</b>"
        + (f" ({escape(story['reason'])})" if story["reason"] else "")
        + "</p>"
    )
    if blinded:
        parts.append(
            '<p class="note" id="blinded">Blinded scan: the data, the search windows and '
            "the decisions taken on them are sealed until `anomscan unblind RUN --by "
            "NAME`.</p><h2>Decisions</h2>"
        )
        parts.extend(
            _decision_markup(row) for row in story["decisions"] if row["kind"] in VISIBLE_KINDS
        )
        return html_page(title, "".join(parts))
    if "counts" in point and story["status"] != "skipped":
        if figure:
            parts.append(_spectrum_figure(story, point, title, figures, style))
        else:
            command = shlex.join(
                ["anomscan", "report", str(run.run_dir), "--spectrum", spectrum, "--point",
                 f"{story['point_pb']:.6g}"]
            )  # fmt: skip
            parts.append(
                '<p class="note" id="not-drawn">Not drawn with the report (no top excess, '
                "rescue, fallback, missing background or refusal here); draw it with "
                f'<span class="mono">{escape(command)}</span></p>'
            )
    if story["excess"] is not None:
        parts.append(_excess_markup(story["excess"]))
    parts.append("<h2>Decisions</h2>")
    parts.extend(_decision_markup(row) for row in story["decisions"])
    if story["fits"]:
        parts.append(_fits_markup(story["fits"]))
    for call in story["searches"]:
        parts.append(
            f'<p><a href="../tool_calls.html#call-{call["seq"]}">search_spectrum tool call '
            f"(seq {call['seq']})</a></p>"
        )
    parts.append(f"<h2>In the terminal</h2><pre>{escape(why_text(story))}</pre>")
    return html_page(title, "".join(parts))


def tool_calls_page(run: RunRecord, *, blinded: bool = False) -> str:
    """Every logged tool call, grouped by step: hashes, input and output (truncated).

    A blinded scan's page lists no call: their outputs hold the data in the windows.
    """
    parts = ['<p><a href="index.html">report</a></p><h1>Tool calls</h1>']
    if blinded:
        parts.append(
            '<p class="note" id="blinded">Blinded scan: the tool calls (their outputs hold '
            "the data in the search windows) are shown after `anomscan unblind`.</p>"
        )
        return html_page("tool calls", "".join(parts))
    step = None
    for call in run.tool_calls:
        if call["step_id"] != step:
            step = call["step_id"]
            parts.append(f'<h2 id="step-{escape(step)}">{escape(step)}</h2>')
        output = call["output"]
        text = output if isinstance(output, str) else json.dumps(output)
        inputs = call["input"] if isinstance(call["input"], str) else json.dumps(call["input"])
        parts.append(
            f'<div id="call-{call["seq"]}"><b>{escape(call["tool"])}</b> {escape(call["key"])} '
            f"(seq {call['seq']}, {number_text(call['seconds'])} s, worker "
            f"{escape(call['worker'])}, replayable {number_text(bool(call['replayable']))})"
            f'<div class="mono">input sha256 {escape(call["input_sha256"])}; output sha256 '
            f"{escape(call['output_sha256'])}</div>"
            "<details><summary>input</summary>"
            f"<pre>{escape((inputs or '')[:4000])}</pre></details>"
            "<details><summary>output</summary>"
            f"<pre>{escape((text or '')[:8000])}</pre></details>"
            "</div>"
        )
    return html_page("tool calls", "".join(parts))
