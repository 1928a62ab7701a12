"""The review report's reinterpretation section: acceptances, injections and the AE gain.

Drawn from RUN/acceptance/*.json and RUN/injection/*.json when present (agent/reinterp.py
writes them); the report shows their numbers and plots, it computes nothing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.plots import PlotStyle
from agent.reinterp_plots import acceptance_map_figure, linearity_figure

ImageMaker = Callable[[Any, str, str], str]
"""figure, name, alt text -> the <img> markup of the report (its _Figures.img)."""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _mean(summary: dict[str, Any], key: str) -> Any:
    """The toys' mean of `key` (None when an older injection file lacks it)."""
    return summary.get(key, {}).get("mean")


def _table(header: list[str], rows: list[list[str]], attrs: str = "") -> str:
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


def _acceptance_markup(output: dict[str, Any], img: ImageMaker, style: PlotStyle) -> str:
    figure = acceptance_map_figure(output, style=style)
    image = img(figure, f"acceptance-{output['name']}", f"acceptance map of {output['name']}")
    return (
        f"<h3>Acceptance of {_e(output['name'])}</h3>"
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
                    f"{spectrum['n_fitted']}/{spectrum['n_toys']}",
                    _n(spectrum["fitted_yield"]["mean"]),
                    _n(spectrum["pull"]["mean"], 2),
                    _n(spectrum["local_z"]["mean"], 3),
                    _n(_mean(spectrum, "run_function_yield")),
                    _n(_mean(spectrum, "run_function_pull"), 2),
                    _n(_mean(spectrum, "fixed_shape_yield")),
                    _n(_mean(spectrum, "fixed_shape_pull"), 2),
                ]
            )
    recovery = _table(
        [
            "xsec pb",
            "spectrum",
            "AR pb",
            "expected",
            "injected",
            "accepted",
            "fitted",
            "pull",
            "local Z",
            "fitted (run fn)",
            "pull (run fn)",
            "fitted (run bkg)",
            "pull (run bkg)",
        ],
        rows,
        'class="injection"',
    )
    tops = "; ".join(
        f"{s['xsec_pb']:g} pb: top excess of the injected spectra is the injected one in "
        f"{s['top_is_injected_fraction']:.0%} of toys, of the whole scan in "
        f"{s['top_of_scan_is_injected_fraction']:.0%}"
        for s in output["strengths"]
    )
    gains = _table(
        [
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
                _n(r["xsec_pb"]),
                _e(r["spectrum"]),
                _n(r["point_pb"]) + (" (whole)" if r["whole_stream"] else ""),
                _n(r["signal_ae"]),
                _n(r["background_ae"]),
                _n(r["z_ae"]),
                _n(r["signal_whole_stream"]),
                _n(r["background_whole_stream"]),
                _n(r["z_whole_stream"]),
                _n(r["dz_percent"], 3),
            ]
            for r in output["sensitivity"]
        ],
        'class="sensitivity"',
    )
    figure = linearity_figure(output, style=style)
    image = img(figure, f"linearity-{output['name']}", f"injection linearity {output['name']}")
    return (
        f"<h3>Injection {_e(output['name'])}: X({request['mass']:g}) -&gt; {_e(request['pair'])}"
        f", sigma {output['sigma_gev']:.3g} GeV, {request['toys']} toy(s)</h3>"
        f'<p class="note">{_e(output["method"])}</p>'
        + recovery
        + f"<p>{_e(tops)}</p>"
        + "<h4>Sensitivity gain of the anomaly cut (PHYSICS.md 6)</h4>"
        + gains
        + image
    )


def reinterpretation_section(run_dir: Path, img: ImageMaker, style: PlotStyle) -> str:
    """The section's HTML (empty when the run has no acceptance or injection results)."""
    acceptances, injections = reinterpretation_outputs(run_dir)
    if not acceptances and not injections:
        return ""
    parts = ['<h2 id="reinterpretation">Reinterpretation</h2>']
    parts += [_acceptance_markup(a, img, style) for a in acceptances]
    parts += [_injection_markup(i, img, style) for i in injections]
    return "".join(parts)
