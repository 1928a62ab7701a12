"""The `look_elsewhere` node: `scan_significance` over every accepted (spectrum, AR point).

Each point enters with its own fit range and window set (those of its bump hunt), its fit's
jacobian (the pseudo-scans are refitted) and Poisson-bootstrap replicas of its counts (the
spectra's correlation), from one NPZ of points in RUN/lee (an artifact, so the tool call
replays). The scan-global p counts
every test the scan made, refinements included; the pseudo-scans run on the spectra in
parallel when the executor is not serial (the result does not depend on it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from agent.scan.context import ScanContext
from agent.scan.nodes.common import (
    record_decision,
    search_exclusion,
    stream_ranking,
    write_npz,
)
from agent.scan.state import ScanState
from core.bootstrap import replica_key
from core.bumphunt import MIN_WINDOW_COUNT
from core.errors import AnomscanError
from core.masses import SPECTRUM_NAMES
from core.regions import ReplicaRequest, points_bootstrap

__all__ = ["look_elsewhere_node"]

_FIT_ARRAYS = ("jacobian", "covariance", "fitted")
"""Per-spectrum fit arrays of a point NPZ that the look-elsewhere input carries along."""

N_BOOTSTRAP_REPLICAS = 200
"""Replicas for the spectra's correlation (its normal-score estimate has error ~ 0.07)."""

_BOOTSTRAP_STREAM = 0x1EE
"""Mixed into the scan's seed for the bootstrap weights (one stream for every AR point)."""

_LEE_KEYS = (
    "local_p",
    "local_z",
    "global_p",
    "global_z",
    "global_z_is_lower_limit",
    "effective_trials",
    "n_tests",
    "n_pseudo_scans",
    "method",
    "global_p_method",
)


def look_elsewhere_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """The scan-wide significance of the largest excess, from pseudo-scans of every point."""
    ctx.progress.update(
        stage=f"look-elsewhere over {len(state['points'])} AR points (pseudo-scans)",
        point="",
        spectra_total=0,
        points_done=len(state["points"]),
        points_planned=len(state["points"]),
    )
    names, columns = _accepted_points(ctx, state)
    columns.update(_bootstrap_replicas(ctx, state, columns))
    if not names:
        record_decision(
            ctx,
            step_id,
            "look_elsewhere",
            chosen=None,
            policy="rules",
            rationale="no spectrum has an accepted background at any point: no scan-wide test",
        )
        return {"stage": "no look-elsewhere", "lee": None}
    folder = ctx.run_dir / "lee"
    folder.mkdir(exist_ok=True)
    path = write_npz(folder / "points.npz", "look-elsewhere input", **columns)
    ctx.artifact(path, "look-elsewhere input")
    out = _scan_significance(ctx, step_id, path)
    lee = {key: out[key] for key in _LEE_KEYS}
    lee["best"] = {
        "spectrum": out["best"]["spectrum"],
        "cross_section_pb": out["best"]["cross_section_pb"],
        "window": out["best"]["window"],
        "local_z": out["best"]["local_z"],
    }
    record_decision(
        ctx,
        step_id,
        "look_elsewhere",
        chosen=lee["best"],
        policy="rules",
        rationale=(
            f"largest excess {lee['best']['spectrum']} at {lee['best']['cross_section_pb']:g} "
            f"pb: local Z {out['local_z']:.2f}, scan-global Z {out['global_z']:.2f}"
            f"{' (lower limit)' if out['global_z_is_lower_limit'] else ''} from "
            f"{out['n_pseudo_scans']} pseudo-scans over {len(set(names))} spectra"
        ),
        numbers={"global_p": out["global_p"], "n_tests": out["n_tests"]},
    )
    return {"stage": "look-elsewhere done", "lee": lee}


def _accepted_points(ctx: ScanContext, state: ScanState) -> tuple[list[str], dict[str, Any]]:
    """The spectrum of every accepted (spectrum, AR point) and the columns of RUN/lee/points.npz.

    Per point i: its cross section, first bin, the hunt's window widths, least window
    background and least window count, and `edges_i`, `counts_i`, `background_i` over its
    fit range; where the point NPZ has them, the fit's `jacobian_i`, `covariance_i` and
    `fitted_i` (the windows then fold the fit uncertainty as the hunt did, and the
    pseudo-scans are refitted, `core.pseudodata`).
    """
    arrays: dict[str, Any] = {}
    names: list[str] = []
    rows: dict[str, list[float]] = {
        "cross_section_pb": [],
        "first_bin": [],
        "width_min": [],
        "width_max": [],
        "min_window_background": [],
        "min_window_count": [],
    }
    for record in state["points"]:
        results = json.loads(ctx.at(record["results_file"]).read_text())
        with np.load(ctx.at(record["results_file"]).with_name(results["arrays"])) as data:
            edges, counts, background = data["edges"], data["counts"], data["background"]
            fits = {key: data[key] for key in data.files if key.split("_")[0] in _FIT_ARRAYS}
        for spectrum in results["spectra"]:
            if spectrum["status"] != "excess":
                continue
            k = SPECTRUM_NAMES.index(spectrum["spectrum"])
            first, stop = spectrum["bins"]
            i = len(names)
            names.append(spectrum["spectrum"])
            rows["cross_section_pb"].append(record["point_pb"])
            rows["first_bin"].append(first)
            rows["width_min"].append(spectrum["hunt"]["width_min"])
            rows["width_max"].append(spectrum["hunt"]["width_max"] or 0)
            rows["min_window_background"].append(spectrum["hunt"]["min_window_background"])
            rows["min_window_count"].append(
                spectrum["hunt"].get("min_window_count", MIN_WINDOW_COUNT)
            )
            arrays[f"edges_{i}"] = edges[first : stop + 1]
            arrays[f"counts_{i}"] = counts[k, first:stop]
            arrays[f"background_{i}"] = background[k, first:stop]
            for what in _FIT_ARRAYS:
                if f"{what}_{k}" in fits:
                    arrays[f"{what}_{i}"] = fits[f"{what}_{k}"]
    columns = {
        "spectrum": np.array(names),
        "cross_section_pb": np.array(rows["cross_section_pb"], dtype=float),
        "first_bin": np.array(rows["first_bin"], dtype=np.int64),
        "width_min": np.array(rows["width_min"], dtype=np.int64),
        "width_max": np.array(rows["width_max"], dtype=np.int64),
        "min_window_background": np.array(rows["min_window_background"], dtype=float),
        "min_window_count": np.array(rows["min_window_count"], dtype=np.int64),
        **arrays,
    }
    return names, columns


def _bootstrap_replicas(
    ctx: ScanContext, state: ScanState, columns: dict[str, Any]
) -> dict[str, np.ndarray]:
    """`replicas_i` of every accepted point: Poisson-bootstrap replicas of its counts.

    Every event gets the same Poisson(1) weight per replica at every AR point and in every
    spectrum (one key from the seed, events by table row: `core.bootstrap`), so the replicas
    carry the spectra's shared events into the scan-wide test's correlation. One pass over
    the table fills them all (`core.regions.points_bootstrap`).
    """
    if not columns["spectrum"].size:
        return {}
    ranking = stream_ranking(ctx, state)
    requests = [
        ReplicaRequest(
            str(name),
            ranking.regions(float(sigma), state["lumi_pb"]),
            int(first),
            int(first) + columns[f"counts_{i}"].size,
        )
        for i, (name, sigma, first) in enumerate(
            zip(columns["spectrum"], columns["cross_section_pb"], columns["first_bin"], strict=True)
        )
    ]
    replicas = points_bootstrap(
        ctx.at(state["table"]),
        ranking,
        requests,
        search_exclusion(ctx, state),
        N_BOOTSTRAP_REPLICAS,
        replica_key(ctx.config.seed, _BOOTSTRAP_STREAM),
    )
    return {f"replicas_{i}": values for i, values in enumerate(replicas)}


def _scan_significance(ctx: ScanContext, step_id: str, path: Path) -> dict[str, Any]:
    """The `scan_significance` tool's output on the points of `path`."""
    payload = {
        "points_path": str(path.relative_to(ctx.run_dir)),
        "seed": ctx.config.seed,
        "n_pseudo_scans": ctx.config.n_pseudo_scans,
        "max_pseudo_scans": ctx.config.max_pseudo_scans,
        "top": 20,
        # spectra's pseudo-scans in parallel; the result does not depend on it
        "workers": 1 if ctx.config.executor == "serial" else os.cpu_count() or 1,
    }
    (result,) = ctx.call_tools(step_id, "scan_significance", [("scan", payload)])
    if result.output is None:
        raise AnomscanError(f"the scan-wide look-elsewhere failed: {result.error}")
    return dict(result.output)
