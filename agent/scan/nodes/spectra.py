"""The `build_spectra` node: the 63 spectra of the next AR point's anomaly regions.

Per stream the anomaly region holds the N = sigma x L_search highest-score events (the
autoencoder's training events are left out). The table is never read whole: one pass ranks
each stream's best events (`core.regions`), and one more fills the spectra of every pending
point at once (the planned grid, then each round of refinements), kept until their node
runs. The spectra go to RUN/spectra/point-NNN.npz (an artifact): arrays never enter the
state. A spectrum with fewer than `min_events` events above its stream's fit start is
skipped with a decision row; nothing is fitted on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.scan.context import ScanContext
from agent.scan.nodes.common import (
    events_in_fit_range,
    record_decision,
    search_exclusion,
    stream_ranking,
    write_npz,
)
from agent.scan.state import ScanState
from core.anomaly import point_text
from core.masses import SPECTRUM_NAMES, STREAM_FIT_FROM_GEV, STREAMS, mass_bin_edges
from core.regions import PointRegions, points_spectra

__all__ = ["build_spectra_node"]


def build_spectra_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Take the next pending AR point, fill its spectra and skip the sparse ones."""
    pending = list(state["pending_pb"])
    point = pending.pop(0)
    index = len(state["points"])
    planned = index + 1 + len(pending)
    ctx.progress.update(
        point=f"AR point {index + 1} of {planned} ({point_text(point)} pb)",
        points_done=index,
        points_planned=planned,
        spectra_done=0,
        spectra_total=0,
    )
    region, counts = _point_spectra(ctx, state, point, pending)
    edges = mass_bin_edges()
    skipped = _sparse_spectra(edges, counts, ctx.config.min_events)
    ctx.progress.update(spectra_total=len(SPECTRUM_NAMES) - len(skipped))
    folder = ctx.run_dir / "spectra"
    folder.mkdir(exist_ok=True)
    path = write_npz(
        folder / f"point-{index:03d}.npz",
        "spectra",
        edges=edges,
        counts=counts.astype(float),
        names=np.array(SPECTRUM_NAMES),
    )
    digest = ctx.artifact(path, "spectra")
    for name, reason in skipped.items():
        record_decision(
            ctx,
            step_id,
            "skip",
            spectrum=name,
            point_pb=point,
            chosen="skipped",
            policy="rules",
            rationale=reason,
        )
    record_decision(
        ctx,
        step_id,
        "anomaly_region",
        point_pb=point,
        chosen={"whole_stream": dict(zip(STREAMS, region.whole_stream, strict=True))},
        numbers={
            "n_in_region": dict(zip(STREAMS, region.n_pass, strict=True)),
            "lowest_score_in_region": dict(zip(STREAMS, region.lowest_score, strict=True)),
        },
        policy="rules",
        rationale=(
            f"per stream the N = sigma L = {point * state['lumi_pb']:.0f} highest-score "
            f"events; {len(skipped)} of {len(SPECTRUM_NAMES)} spectra too sparse to fit"
        ),
    )
    return {
        "stage": f"spectra at {point_text(point)} pb",
        "pending_pb": pending,
        "current": {
            "index": index,
            "point_pb": point,
            "spectra_file": ctx.relative(path),
            "spectra_sha256": digest,
            "skipped": skipped,
            "whole_stream": dict(zip(STREAMS, region.whole_stream, strict=True)),
        },
    }


def _sparse_spectra(edges: np.ndarray, counts: np.ndarray, min_events: int) -> dict[str, str]:
    """Spectrum -> why it is skipped, for those with < `min_events` above the fit start."""
    skipped = {}
    for name, values in zip(SPECTRUM_NAMES, counts, strict=True):
        n_in_range = events_in_fit_range(values, edges, name)
        if n_in_range < min_events:
            fit_from = STREAM_FIT_FROM_GEV[name.split("/", maxsplit=1)[0]]
            skipped[name] = (
                f"too few events: {n_in_range} above the fit start {fit_from:g} GeV "
                f"(< {min_events})"
            )
    return skipped


def _point_spectra(
    ctx: ScanContext, state: ScanState, point: float, pending: list[float]
) -> tuple[PointRegions, np.ndarray]:
    """The regions and spectra (63, n_bins) of `point`, filled with those of `pending`.

    One pass over the table fills every point not filled yet; each is handed out once.
    """
    filled: dict[float, tuple[PointRegions, np.ndarray]] = ctx.cached("point_spectra", dict)
    if point not in filled:
        ranking = stream_ranking(ctx, state)
        wanted = [point, *(p for p in pending if p not in filled and p != point)]
        regions = [ranking.regions(p, state["lumi_pb"]) for p in wanted]
        counts = points_spectra(
            ctx.at(state["table"]), ranking, regions, search_exclusion(ctx, state)
        )
        filled.update(zip(wanted, zip(regions, counts, strict=True), strict=True))
    return filled.pop(point)
