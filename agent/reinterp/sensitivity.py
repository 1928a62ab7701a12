"""The sensitivity gain of the anomaly cut: expected Z with and without it (PHYSICS.md 6).

Per injection, spectrum of the injected pair, AR point and injected cross-section: the
expected Z in the +-2 sigma window around the injected mass with the AR cut (the run's
accepted background there) and on the whole stream (the run's whole-stream point, or the
scan's rule fitted here on the stream without the training events), and dZ = (Z_AE / Z - 1)
x 100 %. They are in RUN/injection/NAME.json and, for all injections of the run, in
RUN/sensitivity.json and RUN/sensitivity.csv (rebuilt from every RUN/injection/*.json at
each `anomscan inject`, registered as artifacts, shown by the report). They are not added to
results.json: that is the scan's own output (its hash is in the audit and inject leaves
every scan file unchanged).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.reinterp.pool import SignalPool
from agent.reinterp.request import InjectionRequest
from agent.reinterp.rule import ScanRule
from agent.reinterp.run_points import RunPoint
from core.files import json_text, write_text
from core.masses import PAIRS, STREAMS, mass_bin_edges
from core.reinterp import (
    RegionCut,
    ae_gain,
    region_mask,
    signal_sigma_gev,
    window_bins,
    window_expected_z,
)
from tools.reinterp import RunInputs

FloatArray = npt.NDArray[np.float64]

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_CSV = "sensitivity.csv"


def _whole_stream_background(
    run: RunInputs,
    stream: str,
    pair: str,
    rule: ScanRule,
) -> tuple[FloatArray | None, str]:
    """The accepted background of the whole stream (training events left out), fitted here.

    The scan's rule with the seed the scan would give the spectrum at one AR point past its
    last (the whole stream is not one of the run's points here).
    """
    counts, edges = run.search_spectrum(stream, pair), mass_bin_edges()
    name = f"{stream}/{pair}"
    result = rule.analyse(name, edges, counts.astype(float), rule.seed(len(run.points_pb), name))
    if result.status != "accepted" or result.search is None:
        return None, result.status
    background = np.zeros(len(edges) - 1)
    background[result.search.first_bin : result.search.stop_bin] = result.search.background
    return background, "accepted"


def _whole_stream_window_background(
    run: RunInputs,
    cuts: list[RegionCut],
    backgrounds: dict[float, RunPoint],
    stream: str,
    pair: str,
    rule: ScanRule,
) -> tuple[FloatArray | None, str]:
    """The whole stream's accepted background: the run's whole-stream point, else fitted here."""
    name = f"{stream}/{pair}"
    for cut in cuts:
        if cut.stream == stream and cut.whole_stream and cut.point_pb in backgrounds:
            whole_b = backgrounds[cut.point_pb].accepted_background(name)
            if whole_b is not None:
                return whole_b, "run point"
    return _whole_stream_background(run, stream, pair, rule)


def expected_z_rows(
    run: RunInputs,
    cuts: list[RegionCut],
    pool: SignalPool,
    request: InjectionRequest,
    streams: list[str],
    lumi_search: float,
    backgrounds: dict[float, RunPoint],
    rule: ScanRule,
) -> list[dict[str, Any]]:
    """Expected Z with the AR cut and on the whole stream, dZ, per strength, stream and point."""
    sigma = signal_sigma_gev(request.mass, request.width)
    edges = mass_bin_edges()
    first, stop = window_bins(edges, request.mass, sigma)
    column = PAIRS.index(request.pair)
    signal = pool.table
    assert signal.score is not None
    values = signal.masses[:, column]
    in_window = np.isfinite(values) & (values >= edges[first]) & (values < edges[stop])
    n_pool = len(signal)
    rows = []
    for stream in streams:
        name = f"{stream}/{request.pair}"
        k = list(STREAMS).index(stream)
        whole_bits = signal.stream_bits[:, k] & in_window
        whole_fraction = float(np.count_nonzero(whole_bits)) / n_pool
        whole_b, whole_status = _whole_stream_window_background(
            run, cuts, backgrounds, stream, request.pair, rule
        )
        b_whole = None if whole_b is None else float(whole_b[first:stop].sum())
        for cut in cuts:
            if cut.stream != stream:
                continue
            passed = region_mask(signal.score, signal.stream_bits, cut) & in_window
            fraction = float(np.count_nonzero(passed)) / n_pool
            b_ae = None
            status = "not in the run"
            if cut.point_pb in backgrounds:
                status = backgrounds[cut.point_pb].status(name) or "not in the run"
                accepted = backgrounds[cut.point_pb].accepted_background(name)
                if accepted is not None:
                    b_ae = float(accepted[first:stop].sum())
                    status = "accepted"
            for xsec in request.xsec_pb:
                mu = xsec * lumi_search
                z_ae = None if b_ae is None else window_expected_z(mu * fraction, b_ae)
                z_whole = (
                    None if b_whole is None else window_expected_z(mu * whole_fraction, b_whole)
                )
                rows.append(
                    {
                        "spectrum": name,
                        "point_pb": cut.point_pb,
                        "whole_stream": cut.whole_stream,
                        "xsec_pb": xsec,
                        "window_gev": [float(edges[first]), float(edges[stop])],
                        "signal_ae": mu * fraction,
                        "background_ae": b_ae,
                        "background_ae_status": status,
                        "z_ae": z_ae,
                        "signal_whole_stream": mu * whole_fraction,
                        "background_whole_stream": b_whole,
                        "background_whole_stream_status": whole_status,
                        "z_whole_stream": z_whole,
                        "dz_percent": ae_gain(z_ae, z_whole),
                        "dz_note": dz_note(z_ae, z_whole, status, whole_status),
                    }
                )
    return rows


SENSITIVITY_COLUMNS = (
    "injection",
    "pair",
    "mass_gev",
    "width",
    "sigma_gev",
    "spectrum",
    "point_pb",
    "whole_stream",
    "xsec_pb",
    "window_lo_gev",
    "window_hi_gev",
    "signal_ae",
    "background_ae",
    "z_ae",
    "signal_whole_stream",
    "background_whole_stream",
    "z_whole_stream",
    "dz_percent",
    "dz_note",
)
"""RUN/sensitivity.csv columns (sensitivity.json rows hold the same keys and the statuses)."""


def dz_note(z_ae: float | None, z_whole: float | None, status_ae: str, status_whole: str) -> str:
    """Why a sensitivity row has no dZ (empty when it has one): dZ needs both Z, Z > 0."""
    if z_whole is None:
        return f"no dZ: the whole stream has no Z ({status_whole})"
    if z_ae is None:
        return f"no dZ: the AE region has no Z ({status_ae})"
    if not z_whole > 0:
        return "no dZ: Z = 0 without the AE cut"
    return ""


def sensitivity_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every injection's expected-Z rows (RUN/injection/*.json), with what was injected."""
    rows = []
    for path in sorted((run_dir / "injection").glob("*.json")):
        output = json.loads(path.read_text())
        request = output["request"]
        for row in output.get("sensitivity", []):
            window = row["window_gev"]
            rows.append(
                {
                    "injection": output["name"],
                    "pair": request["pair"],
                    "mass_gev": request["mass"],
                    "width": request["width"],
                    "sigma_gev": output["sigma_gev"],
                    **{k: v for k, v in row.items() if k != "window_gev"},
                    "window_lo_gev": window[0],
                    "window_hi_gev": window[1],
                }
            )
    return rows


def write_sensitivity(run_dir: Path) -> tuple[Path, Path]:
    """RUN/sensitivity.json and .csv from all injections of the run (rebuilt each time)."""
    rows = sensitivity_rows(run_dir)
    document = {
        "definition": (
            "expected Z = sqrt(2((s + b) ln(1 + s/b) - s)) in the +-2 sigma window around the "
            "injected mass, s = sigma x L_search x the signal's acceptance into the window, b "
            "the accepted background there: with the AR cut (z_ae) and on the whole stream "
            "(z_whole_stream); dz_percent = (Z_AE / Z - 1) x 100 % (PHYSICS.md 6). One row "
            "per injection, spectrum, AR point and injected cross-section"
        ),
        "sources": sorted(
            str(p.relative_to(run_dir)) for p in (run_dir / "injection").glob("*.json")
        ),
        "rows": rows,
    }
    json_path = write_text(
        run_dir / SENSITIVITY_JSON, json_text(document, indent=1), what="sensitivity"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SENSITIVITY_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in SENSITIVITY_COLUMNS])
    csv_path = write_text(run_dir / SENSITIVITY_CSV, buffer.getvalue(), what="sensitivity table")
    return json_path, csv_path
