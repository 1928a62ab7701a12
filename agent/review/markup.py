"""The HTML of the report: one style sheet, escaped cells and tables, and its figures.

The pages ask nothing of the network: styles are inline, plots are embedded as data URIs (or
written beside the page with `plots="beside"`), there is no script.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.figures.common import PlotFormat
from agent.figures.plots import encode
from core.files import write_bytes

PlotPlacement = Literal["embedded", "beside"]


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


def escape(value: Any) -> str:
    """`value` as HTML text (None: empty)."""
    return html.escape("" if value is None else str(value))


def html_page(title: str, body: str) -> str:
    """A whole page: `body` (HTML) under `title`, with the report's style sheet."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]], attrs: str = "") -> str:
    """A table of escaped `header` texts over rows of cells (`td`, `raw_td`)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NO_VALUE = object()
"""No `data-value` attribute (None is a value: `data-value="null"`)."""


def td(text: Any, *, value: Any = _NO_VALUE, cls: str = "") -> str:
    """A cell of escaped `text`; `value` (JSON) in `data-value`, the number the text shows."""
    data = "" if value is _NO_VALUE else f' data-value="{escape(json.dumps(value))}"'
    klass = f' class="{cls}"' if cls else ""
    return f"<td{klass}{data}>{escape(text)}</td>"


def raw_td(markup: str, cls: str = "") -> str:
    """A cell of HTML `markup` (links, nested tables), not escaped."""
    klass = f' class="{cls}"' if cls else ""
    return f"<td{klass}>{markup}</td>"


@dataclass
class Figures:
    """Where the report's figures go: embedded as data URIs, or files beside the pages.

    `written` lists the files written (placement "beside"), in order.
    """

    folder: Path
    fmt: PlotFormat
    placement: PlotPlacement
    written: list[Path] = field(default_factory=list)

    def img(self, figure: Any, name: str, alt: str, prefix: str = "") -> str:
        """The <img> of `figure` (encoded, closed); `prefix` leads from the page to the folder."""
        data = encode(figure, self.fmt)
        mime = "image/png" if self.fmt == "png" else "image/svg+xml"
        if self.placement == "embedded":
            source = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        else:
            path = self.folder / "plots" / f"{name}.{self.fmt}"
            path.parent.mkdir(exist_ok=True)
            write_bytes(path, data, what="report plot")
            self.written.append(path)
            source = f"{prefix}plots/{path.name}"
        return f'<img src="{escape(source)}" alt="{escape(alt)}" data-plot="{escape(name)}">'


def annotation_list(items: list[dict[str, Any]]) -> str:
    """The reviewer annotations of a decision, one <div> each."""
    return "".join(
        f'<div class="annotation" data-decision="{a["decision_seq"]}">'
        f"<b>{escape(a['verdict'])}</b> by {escape(a['by'])}: {escape(a['note'])}</div>"
        for a in items
    )
