"""Limits of a finished scan: `anomscan limits RUN` and the scan's optional last node.

Reads the accepted spectra of every AR point from the run folder (points/point-NNN.json:
spectra with status "excess"; points/point-NNN.npz: data, the final background and its
1-sigma fit uncertainty per bin), writes them to RUN/limits/points-STEP.npz, calls the
`set_limits` tool through the scan's executor (logged in `tool_calls`, replayable: the
NPZ is an artifact), and writes RUN/limits.json, RUN/limits.csv and one plot per AR point
RUN/plots/limits-point-NNN.png, each logged in `artifacts`, with a `limits` decision.

The luminosity of the spectra is the search luminosity (1 - f) L (PHYSICS.md 4): f the
fraction of the event table the autoencoder trained on (the scan's own `core.regions`
rule), L the run's luminosity.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.figures.plots import encode, limit_curves_plot
from agent.scan.blinding import SEALED_DIR, SEALED_KIND, blinded_limits, is_blinded
from agent.scan.config import RESULTS_JSON, ScanConfig, read_config
from agent.scan.context import ScanContext, cli_step
from core.anomaly import luminosity_after_training
from core.autoencoder import read_model_card, training_selection
from core.errors import InvalidInputError
from core.files import write_bytes, write_json, write_text
from core.limits import DEFAULT_WIDTHS, LOW_COUNT_BACKGROUND
from core.masses import SPECTRUM_NAMES
from core.table import iter_table_columns

LIMITS_JSON = "limits.json"
LIMITS_CSV = "limits.csv"
LIMITS_INPUT = "limits/points-{step_id}.npz"
"""The set_limits input of one step (kept per step, so that replay finds every one)."""
CSV_COLUMNS = (
    "spectrum",
    "point_pb",
    "width",
    "mass_gev",
    "sigma_gev",
    "observed_pb",
    "expected_m2_pb",
    "expected_m1_pb",
    "expected_pb",
    "expected_p1_pb",
    "expected_p2_pb",
    "observed_events",
    "expected_events",
    "window_background",
    "counting",
)
BAND_KEYS = ("-2", "-1", "0", "+1", "+2")


def parse_widths(text: str) -> list[float]:
    """`--widths 0,5,10,15` (percent of the mass) as fractions; InvalidInputError otherwise."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InvalidInputError(
                f"--widths {text!r}: {part!r} is not a number; give percents of the mass, "
                "e.g. 0,5,10,15"
            ) from None
        if not (math.isfinite(value) and 0.0 <= value <= 50.0):
            raise InvalidInputError(
                f"--widths {text!r}: {part!r} is outside 0..50 (percent of the mass; 0 = the "
                "detector resolution)"
            )
        values.append(value / 100.0)
    if len(set(values)) != len(values):
        raise InvalidInputError(f"--widths {text!r}: a width is given twice")
    return values


@dataclass(frozen=True)
class AcceptedSpectrum:
    """One accepted spectrum at one AR point, over its fit range (arrays as lists)."""

    spectrum: str
    point_pb: float
    point_index: int
    edges: np.ndarray
    counts: np.ndarray
    background: np.ndarray
    background_error: np.ndarray


def accepted_spectra(run_dir: Path, spectrum: str | None = None) -> list[AcceptedSpectrum]:
    """Every accepted (spectrum, AR point) of a finished scan; InvalidInputError when none."""
    if spectrum is not None and spectrum not in SPECTRUM_NAMES:
        raise InvalidInputError(
            f"--spectrum {spectrum!r} is not a spectrum; spectra are STREAM/PAIR, e.g. T2/jm "
            f"(streams T1..T7, pairs jj jb bb je be jm bm jg bg)"
        )
    if not (run_dir / RESULTS_JSON).is_file():
        raise InvalidInputError(
            f"{run_dir} holds no finished scan ({RESULTS_JSON} is missing); give the folder "
            "of a scan that ran to the end"
        )
    found: list[AcceptedSpectrum] = []
    for path in sorted((run_dir / "points").glob("point-[0-9][0-9][0-9].json")):
        record = json.loads(path.read_text())
        index = int(path.stem.split("-")[1])
        entries = [
            s
            for s in record["spectra"]
            if s["status"] == "excess" and (spectrum is None or s["spectrum"] == spectrum)
        ]
        if not entries:
            continue
        with np.load(path.with_name(record["arrays"])) as data:
            edges = np.asarray(data["edges"], dtype=np.float64)
            counts = np.asarray(data["counts"], dtype=np.float64)
            background = np.asarray(data["background"], dtype=np.float64)
            errors = np.asarray(data["background_error"], dtype=np.float64)
        for entry in entries:
            k = SPECTRUM_NAMES.index(entry["spectrum"])
            first, stop = (int(v) for v in entry["bins"])
            found.append(
                AcceptedSpectrum(
                    entry["spectrum"],
                    float(record["point_pb"]),
                    index,
                    edges[first : stop + 1],
                    counts[k, first:stop],
                    background[k, first:stop],
                    errors[k, first:stop],
                )
            )
    if not found:
        which = f"spectrum {spectrum}" if spectrum else "any spectrum"
        raise InvalidInputError(
            f"{run_dir}: {which} has no accepted background at any AR point, so no limit can "
            "be set; see `anomscan audit` for why the backgrounds failed"
        )
    return found


def run_search_luminosity(run_dir: Path, config: ScanConfig, lumi_pb: float) -> float:
    """(1 - f) L: the luminosity of the events in the run's spectra (pb^-1)."""
    model = Path(config.model) if config.model else run_dir / "model" / "autoencoder.onnx"
    table_path = run_dir / "events"
    if not model.is_file() or not table_path.is_dir():
        raise InvalidInputError(
            f"{run_dir}: the model {model} or the event table {table_path} is missing; the "
            "search luminosity (1 - f) L needs both"
        )
    card = read_model_card(model)
    n_events = n_excluded = 0
    for batch in iter_table_columns(table_path, ["key"]):
        n_events += batch["key"].size
        n_excluded += int(
            np.count_nonzero(training_selection(batch["key"], card.fraction, card.seed))
        )
    fraction = n_excluded / n_events if n_events else 0.0
    return float(luminosity_after_training(lumi_pb, fraction))


def write_points(path: Path, spectra: Sequence[AcceptedSpectrum]) -> None:
    """The tool's input NPZ (spectrum, point_pb, edges_i, counts_i, background(_error)_i)."""
    arrays: dict[str, Any] = {
        "spectrum": np.array([s.spectrum for s in spectra]),
        "point_pb": np.array([s.point_pb for s in spectra], dtype=float),
    }
    for i, item in enumerate(spectra):
        arrays[f"edges_{i}"] = item.edges
        arrays[f"counts_{i}"] = item.counts
        arrays[f"background_{i}"] = item.background
        arrays[f"background_error_{i}"] = item.background_error
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue(), what="limits input")


def csv_text(output: dict[str, Any]) -> str:
    """limits.csv: one row per limit."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for curve in output["curves"]:
        for k, mass in enumerate(curve["masses_gev"]):
            writer.writerow(
                [
                    curve["spectrum"],
                    repr(curve["point_pb"]),
                    repr(curve["width"]),
                    repr(mass),
                    repr(curve["sigma_gev"][k]),
                    _observed(curve["observed_pb"], k),
                    *(repr(curve["expected_pb"][band][k]) for band in BAND_KEYS),
                    _observed(curve["observed_events"], k),
                    repr(curve["expected_events"]["0"][k]),
                    repr(curve["window_background"][k]),
                    str(curve["counting"][k]).lower(),
                ]
            )
    return stream.getvalue()


def _observed(values: list[float] | None, k: int) -> str:
    """An observed column's entry: empty in a blinded run's table."""
    return "" if values is None else repr(values[k])


@dataclass(frozen=True)
class LimitsOutcome:
    """What a limits step wrote."""

    json_path: Path
    csv_path: Path
    plots: tuple[Path, ...]
    n_limits: int
    n_curves: int
    n_low_count: int
    """Limits whose window expects fewer than LOW_COUNT_BACKGROUND events."""
    n_counting: int
    """Limits solved as the exact CL_s of their window count."""


def set_run_limits(
    ctx: ScanContext,
    step_id: str,
    *,
    spectrum: str | None = None,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    method: str = "auto",
    lumi_pb: float | None = None,
) -> LimitsOutcome:
    """The limits step inside an open audit transaction: tool call, files, artifacts, decision."""
    run_dir = ctx.run_dir
    spectra = accepted_spectra(run_dir, spectrum)
    results = json.loads((run_dir / RESULTS_JSON).read_text())
    lumi = float(results["luminosity_pb"]) if lumi_pb is None else lumi_pb
    search_lumi = run_search_luminosity(run_dir, ctx.config, lumi)
    points_path = run_dir / LIMITS_INPUT.format(step_id=step_id)
    write_points(points_path, spectra)
    ctx.artifact(points_path, "limits input")
    payload = {
        "lumi_pb": search_lumi,
        "points_path": str(points_path.relative_to(run_dir)),  # replay survives a move
        "widths": list(widths),
        "method": method,
    }
    (result,) = ctx.call_tools(step_id, "set_limits", [("limits", payload)])
    if result.output is None:
        raise InvalidInputError(f"setting the limits failed: {result.error}")
    output = dict(result.output)
    n_low = sum(
        sum(1 for b in c["window_background"] if b < LOW_COUNT_BACKGROUND) for c in output["curves"]
    )
    n_counting = sum(sum(c["counting"]) for c in output["curves"])
    document = {
        "run_id": run_dir.resolve().name,
        "luminosity_pb": lumi,
        "search_luminosity_pb": search_lumi,
        "widths": list(widths),
        **output,
    }
    if is_blinded(run_dir):
        output = _seal_observed(ctx, document, output)
        document |= output
    json_path = write_json(run_dir / LIMITS_JSON, document, what="limits")
    csv_path = write_text(run_dir / LIMITS_CSV, csv_text(output), what="limits table")
    ctx.artifact(json_path, "limits")
    ctx.artifact(csv_path, "limits")
    plots = _limit_plots(ctx, spectra, output["curves"])
    ctx.audit.add(
        "decisions",
        f"{step_id}:limits:-",
        step_id=step_id,
        kind="limits",
        chosen={"n_limits": output["n_limits"], "n_curves": len(output["curves"])},
        options={"widths": list(widths), "method": method, "spectrum": spectrum},
        policy="config",
        rationale=(
            f"{output['n_limits']} 95 % CL limits ({method} CLs, q~_mu) on "
            f"{len({(s.spectrum, s.point_pb) for s in spectra})} accepted (spectrum, AR point) "
            f"pairs, widths {[round(100 * w, 3) for w in widths]} % of the mass, search "
            f"luminosity {search_lumi:.6g} pb^-1; {len(output['skipped'])} (mass, width) left "
            f"out (window outside the fit range); {low_count_text(n_low, n_counting)}"
        ),
        numbers={
            "search_luminosity_pb": search_lumi,
            "luminosity_pb": lumi,
            "n_low_count": n_low,
            "n_counting": n_counting,
        },
    )
    return LimitsOutcome(
        json_path,
        csv_path,
        tuple(plots),
        output["n_limits"],
        len(output["curves"]),
        n_low,
        n_counting,
    )


def _seal_observed(
    ctx: ScanContext, document: dict[str, Any], output: dict[str, Any]
) -> dict[str, Any]:
    """A blinded run's limits: the whole of them sealed (hashes in the chain), the shown part.

    The shown part keeps every expected band and no observed limit (`blinded_limits`).
    """
    sealed = ctx.run_dir / SEALED_DIR
    sealed.mkdir(exist_ok=True)
    ctx.artifact(write_json(sealed / LIMITS_JSON, document, what="limits"), SEALED_KIND)
    table = write_text(sealed / LIMITS_CSV, csv_text(output), what="limits table")
    ctx.artifact(table, SEALED_KIND)
    return blinded_limits(output)


def _limit_plots(
    ctx: ScanContext, spectra: Sequence[AcceptedSpectrum], curves: list[dict[str, Any]]
) -> list[Path]:
    """RUN/plots/limits-point-NNN.png: the limit curves of each AR point, logged as artifacts."""
    plots = []
    folder = ctx.run_dir / "plots"
    folder.mkdir(exist_ok=True)
    by_point: dict[int, float] = {s.point_index: s.point_pb for s in spectra}
    for index, point in sorted(by_point.items()):
        at_point = [c for c in curves if math.isclose(c["point_pb"], point)]
        if not at_point:
            continue
        figure = limit_curves_plot(at_point, point, "Simulation")
        plot = write_bytes(
            folder / f"limits-point-{index:03d}.png", encode(figure, "png"), what="plot"
        )
        ctx.artifact(plot, "limits plot")
        plots.append(plot)
    return plots


def low_count_text(n_low: int, n_counting: int) -> str:
    """What the limits with little background in their window are (decision, CLI)."""
    if n_low == 0:
        return f"no window has less than {LOW_COUNT_BACKGROUND:g} background events"
    if n_counting >= n_low:
        return (
            f"{n_low} limits have less than {LOW_COUNT_BACKGROUND:g} background events in "
            "their window: there the limit is the exact CL_s of the window count (column "
            "counting), not the asymptotic one"
        )
    return (
        f"{n_low} limits have less than {LOW_COUNT_BACKGROUND:g} background events in their "
        f"window and {n_low - n_counting} of them are asymptotic (this method): optimistic "
        "there (column window_background); the default method counts them exactly"
    )


def run_limits(
    run_dir: Path,
    *,
    spectrum: str | None = None,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    method: str = "auto",
) -> LimitsOutcome:
    """`anomscan limits RUN`: one audited step (limits-NN) appended to the run's log."""
    read_config(run_dir)  # not a run folder: refused before the log is opened
    accepted_spectra(run_dir, spectrum)  # nor bad input
    with cli_step(run_dir, "limits", step_ids="per_node") as step:
        outcome = set_run_limits(
            step.ctx, step.step_id, spectrum=spectrum, widths=widths, method=method
        )
        step.summary = f"{outcome.n_limits} limits"
    return outcome
