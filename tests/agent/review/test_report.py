"""What a reviewer reads: the HTML report (rendered in headless Chromium), `audit --why`,
annotations in the hash chain, the datasette metadata and the HEPData export.

One tiny scan (8000 background events + an X(1500) -> j mu signal, two AR points) is made
once per session, a decision is annotated, and the report is written once from it.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.figures import plots
from agent.review import (
    Figures,
    drawn_pages,
    flagged_excesses,
    load_run,
    map_order,
    number_text,
    spectrum_page,
    spectrum_slug,
)
from agent.runtime.audit import CHAIN_COLUMNS, TABLE_COLUMNS, AuditLog
from agent.scan import ScanConfig, distinct_excesses, run_scan
from core.errors import InvalidInputError
from core.masses import SPECTRUM_NAMES
from core.synth import SampleConfig, generate_sample
from tests.agent.conftest import LUMI_PB, SIGNAL, run_cli
from tools.registry import get_tool

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)
NOTE = "window placed on the injected mass; checked by hand"


@dataclass(frozen=True)
class ReviewedRun:
    """A finished scan, one annotated decision, and its report."""

    run_dir: Path
    results: dict[str, Any]
    annotated_seq: int
    decisions_before: list[tuple[Any, ...]]
    annotate_stdout: str


def _decision_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(run_dir / "audit.sqlite") as connection:
        return connection.execute("select * from decisions order by seq").fetchall()


@pytest.fixture(scope="session")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> ReviewedRun:
    """Sample -> model -> scan (in process, few pseudo-scans) -> `audit annotate` -> `report`."""
    folder = tmp_path_factory.mktemp("review")
    info = generate_sample(
        folder / "data", SampleConfig(n_events=8000, seed=3, signals=(SIGNAL,), lumi_pb=LUMI_PB)
    )
    files = [str(p) for p in info.files]
    model = folder / "model" / "autoencoder.onnx"
    model.parent.mkdir()
    get_tool("train_autoencoder").call(
        {"inputs": files, "output": str(model), "seed": 1, "max_epochs": 10}
    )
    run_dir = folder / "run"
    config = ScanConfig(
        data=files,
        lumi_pb=LUMI_PB,
        run_dir=str(run_dir),
        model=str(model),
        xsec_range=(0.3, 3.0),
        points_per_decade=1,
        max_points=2,
        executor="serial",
        seed=5,
        n_pseudo_scans=200,
        max_pseudo_scans=500,
    )
    run_scan(config, show_progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["excesses"], "the tiny scan must yield at least one excess"
    top = results["excesses"][0]
    with sqlite3.connect(run_dir / "audit.sqlite") as connection:
        (seq,) = connection.execute(
            "select seq from decisions where spectrum = ? and point_pb = ? and kind like "
            "'background%' and chosen is not null order by seq desc limit 1",
            (top["spectrum"], top["xsec_pb"]),
        ).fetchone()
    before = _decision_rows(run_dir)
    annotated = run_cli(
        "audit", "annotate", str(run_dir), str(seq), "--verdict", "agree", "--note", NOTE,
        "--by", "reviewer A",
    )  # fmt: skip
    assert annotated.returncode == 0, annotated.stderr
    report = run_cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    return ReviewedRun(run_dir, results, int(seq), before, annotated.stdout)


class _Collector(HTMLParser):
    """Every tag with its attributes, and the cells (attributes, text) of one table id."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id = table_id
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[list[tuple[dict[str, str], str]]] = []
        self._depth = 0
        self._cell: tuple[dict[str, str], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("id") == self.table_id:
            self._depth = 1
        elif tag == "table" and self._depth:
            self._depth += 1
        if self._depth and tag == "tr":
            self.rows.append([])
        if self._depth and tag == "td":
            self._cell = (attributes, [])

    def handle_endtag(self, tag: str) -> None:
        if self._depth and tag == "td" and self._cell is not None:
            self.rows[-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        if tag == "table" and self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)


def _parse(path: Path, table_id: str = "excesses") -> _Collector:
    collector = _Collector(table_id)
    collector.feed(path.read_text())
    return collector


def _chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM.is_file(), (
        "install Chromium: apt-get install -y chromium (make test does: scripts/ensure-chromium)"
    )
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env=os.environ | {"HOME": profile},
        )


PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (i) {
    return [i.getAttribute('data-plot'), i.complete, i.naturalWidth];
  });
  var requests = performance.getEntriesByType('resource').map(function (r) { return r.name; });
  document.body.setAttribute('data-probe', JSON.stringify({images: images, requests: requests,
    map: !!document.getElementById('map-table'), excesses: !!document.getElementById('excesses'),
    rows: document.querySelectorAll('#excesses tbody tr').length,
    axis: Array.prototype.map.call(document.querySelectorAll('#map-table tbody th'),
      function (t) { return t.textContent; })}));
});
</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(reviewed: ReviewedRun, tmp_path: Path) -> None:
    report = reviewed.run_dir / "report"
    index = report / "index.html"
    probe_page = report / "_probe.html"
    probe_page.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dumped = _chromium("--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri())
    probe_page.unlink()
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    marker = 'data-probe="'
    assert marker in dumped.stdout, dumped.stdout[-2000:]
    raw = dumped.stdout.split(marker, 1)[1].split('"', 1)[0]
    probe = json.loads(raw.replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["map"] and probe["excesses"]
    assert probe["rows"] == len(distinct_excesses(reviewed.results["excesses"]))
    axis = [float(text.removesuffix(" pb")) for text in probe["axis"]]
    assert axis == sorted(axis) and len(axis) == len(set(axis)) >= 1, axis
    names = [name for name, _, _ in probe["images"]]
    assert {"significance-map", "loss", "scores"} <= set(names)
    broken = [image for image in probe["images"] if not image[1] or image[2] <= 0]
    assert not broken, broken
    outside = [r for r in probe["requests"] if not r.startswith(("file:", "data:"))]
    assert not outside, outside

    shot = tmp_path / "shot.png"
    taken = _chromium("--window-size=1400,1000", f"--screenshot={shot}", index.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1000, 1400)
    not_white = (pixels < 0.95).any(axis=2).mean()
    assert not_white > 0.05, f"the first screen is nearly empty ({not_white:.1%} ink)"
    # viridis cells of the map (green-blue-yellow, low red) are on the first screen
    viridis = (pixels[..., 1] > 0.3) & (pixels[..., 0] < 0.35) & (pixels[..., 2] > 0.3)
    assert viridis.sum() > 200, "no significance-map colours on the first screen"


def test_report_has_no_reference_outside_the_folder(reviewed: ReviewedRun) -> None:
    report = reviewed.run_dir / "report"
    pages = [report / "index.html", report / "tool_calls.html", *report.glob("spectra/*.html")]
    n_points = len(reviewed.results["points_pb"])
    assert len(pages) == 2 + 63 * n_points
    for page in pages:
        for tag, attributes in _parse(page).tags:
            for name in ("src", "href"):
                value = attributes.get(name, "")
                assert not value.startswith(("http:", "https:", "//")), (page, tag, value)
                if value and not value.startswith(("data:", "#")):
                    target = (page.parent / value.split("#", 1)[0]).resolve()
                    assert target.is_file(), (page, value)
        assert "<script" not in page.read_text()


def test_report_draws_the_pages_a_reviewer_needs_and_says_how_to_draw_the_others(
    reviewed: ReviewedRun,
) -> None:
    """Drawn: the top excess and what `drawn_pages` lists; the rest carry the command,
    which draws the page when run."""
    run = load_run(reviewed.run_dir)
    drawn = drawn_pages(run)
    top = reviewed.results["excesses"][0]
    assert (top["spectrum"], run.point_index(top["xsec_pb"])) in drawn
    spectra = reviewed.run_dir / "report" / "spectra"
    not_drawn = []
    for index, point in enumerate(run.points):
        for entry in point["summary"]["spectra"]:
            page = (spectra / f"{spectrum_slug(entry['spectrum'], index)}.html").read_text()
            if (entry["spectrum"], index) in drawn:
                assert "<img" in page and "not-drawn" not in page
            elif entry["status"] != "skipped":
                assert "<img" not in page and 'id="not-drawn"' in page
                assert "Decisions" in page and "In the terminal" in page  # the whole story
                not_drawn.append((entry["spectrum"], index, page))
    assert not_drawn, "the tiny scan has spectra without an excess worth drawing"
    spectrum, index, page = not_drawn[0]
    command = html.unescape(page.split('<span class="mono">', 1)[1].split("</span>", 1)[0])
    words = command.split()
    assert words[:3] == ["anomscan", "report", str(reviewed.run_dir)]
    copy = reviewed.run_dir.parent / "report-page"
    done = run_cli(*words[1:], "-o", str(copy))
    assert done.returncode == 0, done.stderr
    drawn_page = copy / "spectra" / f"{spectrum_slug(spectrum, index)}.html"
    assert done.stdout.strip() == f"page: {drawn_page}"
    assert "<img" in drawn_page.read_text()
    bad = run_cli("report", str(reviewed.run_dir), "--spectrum", spectrum, "--point", "77")
    assert bad.returncode == 2 and "points" in bad.stderr and "Traceback" not in bad.stderr
    half = run_cli("report", str(reviewed.run_dir), "--spectrum", spectrum)
    assert half.returncode == 2 and "go together" in half.stderr


def test_the_map_sorts_the_points_and_leaves_out_the_all_skipped_ones() -> None:
    def point(pb: float, statuses: list[str] | None) -> dict[str, Any]:
        spectra = [{"spectrum": "T1/jj", "status": s} for s in statuses or []]
        return {"point_pb": pb, "summary": None if statuses is None else {"spectra": spectra}}

    points = [
        point(1.0, ["excess", "skipped"]),
        point(10.0, ["excess"]),
        point(0.001, ["skipped", "skipped"]),  # every spectrum skipped: off the map
        point(0.237, ["no background"]),  # a refinement, scanned after the grid
        point(0.42, None),  # no summary: kept, not claimed all-skipped
    ]
    assert map_order(points) == ([3, 4, 0, 1], [2])


@pytest.mark.slow
def test_every_number_of_the_excess_table_is_the_one_in_results_json(
    reviewed: ReviewedRun,
) -> None:
    table = _parse(reviewed.run_dir / "report" / "index.html")
    rows = [row for row in table.rows if row]
    excesses = distinct_excesses(reviewed.results["excesses"])
    assert len(rows) == len(excesses)
    keys = (
        "xsec_pb", "window_gev", "data", "background", "local_p", "local_z", "global_z",
        "scan_global_z", "function", "fit_p_value", "masked_window_gev",
    )  # fmt: skip
    for row, excess in zip(rows, excesses, strict=True):
        assert row[1][1] == excess["spectrum"]
        seen = excess["points_pb"]
        expected = number_text(seen[0]) if len(seen) == 1 else f"({len(seen)} points)"
        assert expected in row[3][1], (row[3][1], seen)
        valued = [cell for cell in row if "data-value" in cell[0]]
        assert len(valued) == len(keys)
        for (attributes, text), key in zip(valued, keys, strict=True):
            value = json.loads(attributes["data-value"])
            assert value == excess[key], (key, value, excess[key])
            if key in ("data", "background", "local_p", "local_z", "scan_global_z"):
                assert text == number_text(excess[key])
            if key == "global_z":
                prefix = "> " if excess["global_z_is_lower_limit"] else ""
                assert text == prefix + number_text(excess[key])
    index = (reviewed.run_dir / "report" / "index.html").read_text()
    assert html.escape(reviewed.results["look_elsewhere"]["method"]) in index
    with sqlite3.connect(reviewed.run_dir / "audit.sqlite") as connection:
        (plan,) = connection.execute("select config from runs where event = 'plan'").fetchone()
    assert json.loads(plan)["plan_sha256"] in index  # the plan committed before the data
    stop = reviewed.results["stop_reason"].removeprefix("stop:").strip()
    assert f"Sweep ended: {html.escape(stop)}</p>" in index and "stop: stop" not in index


@pytest.mark.slow
def test_why_lists_the_functions_tried_and_the_chosen_one(reviewed: ReviewedRun) -> None:
    top = reviewed.results["excesses"][0]
    done = run_cli("audit", str(reviewed.run_dir), "--why", top["spectrum"], f"{top['xsec_pb']:g}")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    with sqlite3.connect(reviewed.run_dir / "audit.sqlite") as connection:
        logged = connection.execute(
            "select options, chosen from decisions where spectrum = ? and point_pb = ? and "
            "kind like 'background%' order by seq",
            (top["spectrum"], top["xsec_pb"]),
        ).fetchall()
    assert logged
    tried_lines = [line for line in text.splitlines() if "functions tried:" in line]
    assert len(tried_lines) == len(logged)
    for line, (options, _) in zip(tried_lines, logged, strict=True):
        for candidate in json.loads(options):
            assert candidate["function"] in line
    assert f"chosen function: {top['function']}" in text
    assert f"local Z {number_text(top['local_z'])}" in text
    assert "goodness_of_fit" in text
    bad = run_cli("audit", str(reviewed.run_dir), "--why", "T9/xx", "1")
    assert bad.returncode == 2 and "T9/xx" in bad.stderr and "Traceback" not in bad.stderr
    off_grid = run_cli("audit", str(reviewed.run_dir), "--why", top["spectrum"], "77")
    assert off_grid.returncode == 2 and "points" in off_grid.stderr


@pytest.mark.slow
@pytest.mark.tampers_audit
def test_annotation_is_chained_and_shown(reviewed: ReviewedRun, tmp_path: Path) -> None:
    run_dir = reviewed.run_dir
    assert _decision_rows(run_dir) == reviewed.decisions_before
    verified = run_cli("audit", "verify", str(run_dir))
    assert verified.returncode == 0, verified.stdout
    index = (run_dir / "report" / "index.html").read_text()
    assert NOTE in index and f'data-decision="{reviewed.annotated_seq}"' in index
    top = reviewed.results["excesses"][0]
    page = (
        run_dir
        / "report"
        / "spectra"
        / (
            spectrum_slug(top["spectrum"], reviewed.results["points_pb"].index(top["xsec_pb"]))
            + ".html"
        )
    )
    assert NOTE in page.read_text()

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report", "events", "data"))
    with sqlite3.connect(copy / "audit.sqlite") as connection:
        connection.execute("update annotations set verdict = 'reject'")
    tampered = run_cli("audit", "verify", str(copy))
    assert tampered.returncode == 1 and "annotations row" in tampered.stdout

    missing = run_cli(
        "audit", "annotate", str(run_dir), "999999", "--verdict", "agree", "--by", "x"
    )
    assert missing.returncode == 2 and "no decision with seq 999999" in missing.stderr


@pytest.mark.slow
def test_hepdata_export_is_a_valid_submission(reviewed: ReviewedRun, tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "hepdata"
    done = run_cli("export", str(reviewed.run_dir), "--hepdata", str(out))
    assert done.returncode == 0, done.stderr
    validation = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-c",
            "import sys; from hepdata_validator.full_submission_validator import "
            "FullSubmissionValidator as V; v = V(); ok = v.validate(directory=sys.argv[1]); "
            "[print(f, m.message) for f, ms in v.get_messages().items() for m in ms]; "
            "sys.exit(0 if ok else 1)",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert validation.returncode == 0, validation.stdout + validation.stderr
    assert (tmp_path / "hepdata.tar.gz").is_file()
    assert not (ROOT / "submission.tar.gz").exists()
    relative = subprocess.run(
        [sys.executable, "-m", "agent.cli", "export", str(reviewed.run_dir), "--hepdata", "rel"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=300,
        check=False,
    )
    assert relative.returncode == 0, relative.stderr
    assert (tmp_path / "rel.tar.gz").is_file(), "the archive of a relative DIR was lost"
    documents = list(yaml.safe_load_all((out / "submission.yaml").read_text()))
    names = [d["name"] for d in documents if "name" in d]
    assert "significance map" in names
    flagged = flagged_excesses(load_run(reviewed.run_dir))
    assert len(names) == len(flagged) + 1
    top = flagged[0]
    index = reviewed.results["points_pb"].index(top["xsec_pb"])
    entry = next(d for d in documents if d.get("name") == spectrum_slug(top["spectrum"], index))
    table = yaml.safe_load((out / entry["data_file"]).read_text())
    summary = json.loads((reviewed.run_dir / "points" / f"point-{index:03d}.json").read_text())
    bins = next(s for s in summary["spectra"] if s["spectrum"] == top["spectrum"])["bins"]
    with np.load(reviewed.run_dir / "points" / f"point-{index:03d}.npz") as arrays:
        k = SPECTRUM_NAMES.index(top["spectrum"])
        counts = arrays["counts"][k][bins[0] : bins[1]]
        background = arrays["background"][k][bins[0] : bins[1]]
        band = arrays["background_error"][k][bins[0] : bins[1]]
    observed, expected = table["dependent_variables"]
    assert [v["value"] for v in observed["values"]] == counts.tolist()
    assert [v["value"] for v in expected["values"]] == pytest.approx(background.tolist(), rel=1e-11)
    errors = [v["errors"][0]["symerror"] for v in expected["values"]]
    assert errors == pytest.approx(band.tolist(), rel=1e-11)
    assert any(e > 0 for e in errors)
    assert len(table["independent_variables"][0]["values"]) == counts.size


def test_datasette_metadata_describes_every_audit_column(tmp_path: Path) -> None:
    metadata_path = ROOT / "agent" / "datasette_metadata.json"
    metadata = json.loads(metadata_path.read_text())
    tables = metadata["databases"]["audit"]["tables"]
    assert set(tables) == set(TABLE_COLUMNS)
    for table, columns in TABLE_COLUMNS.items():
        assert tables[table]["description"]
        described = tables[table]["columns"]
        assert set(described) == set(columns) | set(CHAIN_COLUMNS), table
        assert all(text.strip() for text in described.values())
    log = AuditLog(tmp_path / "audit.sqlite")
    log.add("runs", "run:start:0", run_id="r", event="start", seed=1)
    log.close()
    datasette = shutil.which("datasette") or str(Path(sys.executable).with_name("datasette"))
    done = subprocess.run(
        [
            datasette,
            str(tmp_path / "audit.sqlite"),
            "--metadata",
            str(metadata_path),
            "--get",
            "/-/metadata.json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)
    assert served["databases"]["audit"]["tables"]["decisions"]["columns"]["gate"]
    rows = subprocess.run(
        [datasette, str(tmp_path / "audit.sqlite"), "--get", "/audit/runs.json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rows.returncode == 0 and '"run:start:0"' in rows.stdout


@pytest.mark.parametrize(
    ("style", "label"),
    [("Simulation", "anomscan Simulation"), ("ATLAS", "ATLAS"), ("CMS", "CMS")],
)
def test_figures_carry_an_experiments_label_only_when_asked(style: str, label: str) -> None:
    """Synthetic or open data are never labelled as an experiment's (the default is neutral)."""
    figure = plots.loss_curves([1.0, 0.5], [1.1, 0.6], 1, style)  # type: ignore[arg-type]
    texts = " ".join(text.get_text() for ax in figure.axes for text in ax.texts)
    plots.encode(figure, "png")
    assert label in texts
    for other in {"ATLAS", "CMS"} - {style}:
        assert other not in texts


@pytest.mark.parametrize(("style", "fmt"), [("ATLAS", "png"), ("CMS", "svg")])
def test_spectrum_plot_in_both_styles_and_formats(style: str, fmt: str) -> None:
    edges = np.geomspace(100.0, 2000.0, 31)
    rng = np.random.default_rng(1)
    background = 1e4 * (edges[:-1] / 100.0) ** -4
    counts = rng.poisson(background).astype(float)
    figure = plots.spectrum_plot(
        edges,
        counts,
        background[2:],
        (2, 30),
        (500.0, 600.0),
        None,
        "T1/jj",
        style,  # type: ignore[arg-type]
    )
    data = plots.encode(figure, fmt)  # type: ignore[arg-type]
    if fmt == "png":
        assert data.startswith(b"\x89PNG")
    else:
        assert b"<svg" in data[:2000] and b"http://www.w3.org/2000/svg" in data
        assert b"<image" not in data  # text as paths, no external reference


def _band_patch(figure: Any) -> Any:
    top = figure.axes[0]
    return next(p for p in top.patches if p.get_label() == "fit uncertainty (1 sigma)")


def test_spectrum_plot_draws_the_background_band_and_refuses_bad_errors() -> None:
    edges = np.geomspace(100.0, 2000.0, 31)
    background = 1e4 * (edges[:-1] / 100.0) ** -4
    counts = np.random.default_rng(2).poisson(background).astype(float)
    error = 0.05 * background[2:]
    figure = plots.spectrum_plot(
        edges, counts, background[2:], (2, 30), None, None, "T1/jj", "ATLAS", background_error=error
    )
    band = _band_patch(figure).get_data()
    np.testing.assert_allclose(band.values, background[2:] + error)
    np.testing.assert_allclose(band.baseline, background[2:] - error)
    np.testing.assert_allclose(band.edges, edges[2:])
    residual = figure.axes[1].patches[-1].get_data()
    np.testing.assert_allclose(residual.values, error / np.sqrt(background[2:]))
    plain = plots.spectrum_plot(
        edges, counts, background[2:], (2, 30), None, None, "T1/jj", "ATLAS"
    )
    assert not any(p.get_label() == "fit uncertainty (1 sigma)" for p in plain.axes[0].patches)
    with pytest.raises(InvalidInputError, match="background_error"):
        plots.spectrum_plot(
            edges, counts, background[2:], (2, 30), None, None, "x", "ATLAS",
            background_error=error[:-1],
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match="non-finite"):
        plots.spectrum_plot(
            edges, counts, background[2:], (2, 30), None, None, "x", "ATLAS",
            background_error=np.full(error.size, np.nan),
        )  # fmt: skip


@pytest.mark.slow
def test_spectrum_page_draws_the_band_from_the_run_folder(
    reviewed: ReviewedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top excess's page gets the run folder's propagated errors, non-zero, and draws them."""
    top = reviewed.results["excesses"][0]
    index = reviewed.results["points_pb"].index(top["xsec_pb"])
    summary = json.loads((reviewed.run_dir / "points" / f"point-{index:03d}.json").read_text())
    bins = next(s for s in summary["spectra"] if s["spectrum"] == top["spectrum"])["bins"]
    k = SPECTRUM_NAMES.index(top["spectrum"])
    with np.load(reviewed.run_dir / "points" / f"point-{index:03d}.npz") as arrays:
        background = arrays["background"][k][bins[0] : bins[1]]
        error = arrays["background_error"][k][bins[0] : bins[1]]
    assert np.all(np.isfinite(error))
    assert np.all(error[background > 1e-3] > 0)
    # the fit pools the bins: each bin's band is narrower than its Poisson error
    assert np.all(error[background > 1] < np.sqrt(background[background > 1]))
    drawn: list[Any] = []
    original = plots.spectrum_plot

    def spy(*args: Any, **kwargs: Any) -> Any:
        figure = original(*args, **kwargs)
        drawn.append((kwargs.get("background_error"), figure))
        return figure

    monkeypatch.setattr(plots, "spectrum_plot", spy)
    run = load_run(reviewed.run_dir)
    figures = Figures(tmp_path, "png", "embedded")
    page = spectrum_page(run, top["spectrum"], index, figures, "ATLAS")
    assert "shaded band" in page
    ((given, figure),) = drawn
    np.testing.assert_array_equal(given, error)
    np.testing.assert_allclose(_band_patch(figure).get_data().values, background + error)


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    done = run_cli("report", str(tmp_path))
    assert done.returncode == 2
    assert "no results.json" in done.stderr and "Traceback" not in done.stderr
    export = run_cli("export", str(tmp_path), "--hepdata", str(tmp_path / "h"))
    assert export.returncode == 2 and "no results.json" in export.stderr


def test_plots_beside_the_page_are_files_with_relative_links(tmp_path: Path) -> None:
    figures = Figures(tmp_path, "svg", "beside")
    figure = plots.loss_curves([1.0, 0.5, 0.4], [1.1, 0.6, 0.5], 2, "CMS")
    tag = figures.img(figure, "loss", "loss curves", prefix="../")
    assert 'src="../plots/loss.svg"' in tag
    assert figures.written == [tmp_path / "plots" / "loss.svg"]
    assert b"<svg" in figures.written[0].read_bytes()[:2000]
    embedded = Figures(tmp_path, "png", "embedded")
    tag = embedded.img(plots.loss_curves([1.0], [], 0, "ATLAS"), "loss", "loss")
    assert 'src="data:image/png;base64,' in tag and not embedded.written
