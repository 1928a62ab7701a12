"""The review report's reinterpretation section: acceptances, injections and the AE gain.

Drawn from RUN/acceptance/*.json, RUN/injection/*.json and RUN/sensitivity.json when present
(agent/reinterp/ writes them); the report shows their numbers and plots, it computes nothing.
Anchors: #reinterpretation, #acceptance-NAME, #injection-NAME, #sensitivity
(`reinterpretation_contents` lists them for the report's contents line).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.figures.common import PlotStyle
from agent.figures.reinterp import acceptance_map_figure, linearity_figure
from agent.reinterp.sensitivity import SENSITIVITY_CSV, SENSITIVITY_JSON, dz_note, sensitivity_rows

ImageMaker = Callable[[Any, str, str], str]
"""figure, name, alt text -> the <img> markup of the report (its `Figures.img`)."""


def _e(value: Any) -> str:
    """`value` as HTML text."""
    return html.escape(str(value))


def _n(value: Any, digits: int = 3) -> str:
    """A number of the section: `digits` significant digits, - for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _mean(summary: dict[str, Any], key: str) -> Any:
    """The toys' mean of `key` (None when an older injection file lacks it)."""
    return summary.get(key, {}).get("mean")


def _table(header: list[str], rows: list[list[str]], attrs: str = "") -> str:
    """A table of escaped `header` texts over rows of cell markup."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table {attrs}><tr>{head}</tr>{body}</table>"


def reinterpretation_outputs(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The acceptance and injection results written in the run folder (sorted by name)."""
    acceptances = [
        json.loads(p.read_text()) for p in sorted((run_dir / "acceptance").glob("*.json"))
    ]
    injections = [json.loads(p.read_text()) for p in sorted((run_dir / "injection").glob("*.json"))]
    return acceptances, injections


def _pull(summary: dict[str, Any], key: str) -> str:
    """Mean pull and its toys' width, e.g. "-0.05 (1.02)"."""
    found = summary.get(key, {})
    if found.get("mean") is None:
        return "-"
    width = found.get("std")
    return f"{found['mean']:+.2f}" + ("" if width is None else f" ({width:.2f})")


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def reinterpretation_contents(run_dir: Path) -> list[tuple[str, str]]:
    """(anchor, label) of every part of the section, in its order (empty: no section)."""
    acceptances, injections = reinterpretation_outputs(run_dir)
    if not acceptances and not injections:
        return []
    found = [("reinterpretation", "reinterpretation")]
    found += [(_anchor("acceptance", a["name"]), f"acceptance {a['name']}") for a in acceptances]
    found += [(_anchor("injection", i["name"]), f"injection {i['name']}") for i in injections]
    if injections:
        found.append(("sensitivity", "sensitivity gain"))
    return found


def _acceptance_markup(output: dict[str, Any], img: ImageMaker, style: PlotStyle) -> str:
    figure = acceptance_map_figure(output, style=style)
    image = img(figure, f"acceptance-{output['name']}", f"acceptance map of {output['name']}")
    return (
        f'<h3 id="{_anchor("acceptance", output["name"])}">Acceptance of '
        f"{_e(output['name'])}</h3>"
        f"<p>{output['n_events']} events ({_e(', '.join(Path(f).name for f in output['inputs']))}"
        f") through the run's selection, RMM and autoencoder (model "
        f"{_e(output['model_sha256'][:12])}); L_search = {output['lumi_search_pb']:g} pb^-1. "
        f"{_e(output['definition'])}. Numbers: {_e(output['json_path'])}.</p>" + image
    )


def _injection_markup(output: dict[str, Any], img: ImageMaker, style: PlotStyle) -> str:
    request = output["request"]
    rows = []
    for strength in output["strengths"]:
        for spectrum in strength["spectra"]:
            rows.append(
                [
                    _n(strength["xsec_pb"]),
                    _e(spectrum["spectrum"]),
                    _n(spectrum["point_pb"]),
                    _n(_mean(spectrum, "expected_yield")),
                    _n(spectrum["injected_yield"]["mean"]),
                    f"{spectrum['n_fitted']}/{spectrum.get('n_rule_toys', spectrum['n_toys'])}",
                    _n(spectrum["fitted_yield"]["mean"]),
                    _pull(spectrum, "pull"),
                    _n(spectrum["local_z"]["mean"], 3),
                    _n(_mean(spectrum, "run_function_yield")),
                    _pull(spectrum, "run_function_pull"),
                    _n(_mean(spectrum, "fixed_shape_yield")),
                    _pull(spectrum, "fixed_shape_pull"),
                ]
            )
    recovery = _table(
        [
            "injection",
            "xsec pb",
            "spectrum",
            "AR pb",
            "expected",
            "injected",
            "rule accepted",
            "fitted (rule)",
            "pull (rule)",
            "local Z",
            "fitted (run fn)",
            "pull (run fn)",
            "fitted (run bkg)",
            "pull (run bkg)",
        ],
        rows,
        'class="injection"',
    )
    tops = "; ".join(_e(s["text"]) for s in output["strengths"])
    figure = linearity_figure(output, style=style)
    image = img(figure, f"linearity-{output['name']}", f"injection linearity {output['name']}")
    background = request.get("background", "data")
    return (
        f'<h3 id="{_anchor("injection", output["name"])}">Injection {_e(output["name"])}: '
        f"X({request['mass']:g}) -&gt; {_e(request['pair'])}, sigma {output['sigma_gev']:.3g} "
        f"GeV, {request['toys']} toy(s), background {_e(background)}</h3>"
        f'<p class="note">{_e(output["method"])}. Pulls: mean (width) over the toys. Numbers: '
        f"{_e(output['json_path'])}.</p>" + recovery + f"<p>{tops}</p>" + image
    )


def _no_gain(row: dict[str, Any]) -> str:
    """Why a sensitivity row has no dZ (rows written before `dz_note` get it here)."""
    return row.get("dz_note") or dz_note(
        row.get("z_ae"),
        row.get("z_whole_stream"),
        str(row.get("background_ae_status")),
        str(row.get("background_whole_stream_status")),
    )


def _sensitivity_markup(run_dir: Path, folder: Path | None) -> str:
    """The expected Z with and without the AR cut and dZ of every injection of the run."""
    path = run_dir / SENSITIVITY_JSON
    if path.is_file():
        document = json.loads(path.read_text())
        rows, definition = document["rows"], document["definition"]
    else:  # a run folder injected before sensitivity.json existed
        rows, definition = sensitivity_rows(run_dir), "(from RUN/injection/*.json)"
    links = ""
    if path.is_file():
        where = folder or run_dir
        json_link = os.path.relpath(path, where)
        csv_link = os.path.relpath(run_dir / SENSITIVITY_CSV, where)
        links = (
            f' Numbers: <a href="{_e(json_link)}">sensitivity.json</a>, '
            f'<a href="{_e(csv_link)}">sensitivity.csv</a>.'
        )
    gains = _table(
        [
            "injection",
            "xsec pb",
            "spectrum",
            "AR pb",
            "s (AE)",
            "b (AE)",
            "Z_AE",
            "s (stream)",
            "b",
            "Z",
            "dZ %",
        ],
        [
            [
                _e(r["injection"]),
                _n(r["xsec_pb"]),
                _e(r["spectrum"]),
                _n(r["point_pb"]) + (" (whole)" if r["whole_stream"] else ""),
                _n(r["signal_ae"]),
                _n(r["background_ae"]),
                _n(r["z_ae"]),
                _n(r["signal_whole_stream"]),
                _n(r["background_whole_stream"]),
                _n(r["z_whole_stream"]),
                _n(r["dz_percent"], 3) if r["dz_percent"] is not None else _e(_no_gain(r)),
            ]
            for r in rows
        ],
        'class="sensitivity"',
    )
    return (
        '<h3 id="sensitivity">Sensitivity gain of the anomaly cut (PHYSICS.md 6)</h3>'
        f'<p class="note">{_e(definition)}.{links}</p>' + gains
    )


def reinterpretation_section(
    run_dir: Path, img: ImageMaker, style: PlotStyle, folder: Path | None = None
) -> str:
    """The section's HTML (empty when the run has no acceptance or injection results).

    `folder` is where the page is written (links to the run's files are relative to it).
    """
    acceptances, injections = reinterpretation_outputs(run_dir)
    if not acceptances and not injections:
        return ""
    parts = ['<h2 id="reinterpretation">Reinterpretation</h2>']
    parts += [_acceptance_markup(a, img, style) for a in acceptances]
    parts += [_injection_markup(i, img, style) for i in injections]
    if injections:
        parts.append(_sensitivity_markup(run_dir, folder))
    return "".join(parts)
