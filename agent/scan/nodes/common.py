"""What several nodes share: decision rows, per-spectrum seeds, check settings, spectra files.

Every decision a node takes is one `decisions` row, written after the rows the policy
queued for it (the LLM's messages, refusals, fallbacks), so the audit reads in the order
things happened. The seed of a spectrum's fits and toys is a function of the scan's seed,
the AR point's index and the spectrum alone: any spectrum's result can be recomputed on
its own (replay, injection) and does not depend on which other spectra ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from agent.policy.gates import DUPLICATE_TOLERANCE
from agent.scan.config import ScanConfig
from agent.scan.context import ScanContext
from agent.scan.state import ScanState
from core.anomaly import requested_count
from core.autoencoder import read_model_card, training_selection
from core.files import atomic_path
from core.masses import SPECTRUM_NAMES, STREAM_FIT_FROM_GEV
from core.regions import StreamRanking, rank_streams

__all__ = [
    "NodeBody",
    "events_in_fit_range",
    "read_point_spectra",
    "record_decision",
    "scan_checks",
    "scan_fallback_settings",
    "search_calls",
    "search_exclusion",
    "spectrum_seed",
    "stream_ranking",
    "write_npz",
]

NodeBody = Callable[[ScanContext, ScanState, str], dict[str, Any]]
"""A node: (context, state, step id) -> the state update; `agent.scan.graph` audits the step."""


def scan_checks(config: ScanConfig) -> dict[str, Any]:
    """Robustness-check settings of a scan (a `CheckSettings`): defaults, GOF toys from config.

    The goodness of fit is asymptotic where the bins are well filled and otherwise from
    `gof_toys` toys refitted to first order (`core.robustness.goodness_of_fit`, method
    auto): the count the config records is the count the checks report.
    """
    return {"n_linear_toys": config.gof_toys}


def scan_fallback_settings(config: ScanConfig) -> dict[str, Any]:
    """Symbolic-fallback settings of a scan (a `FallbackSettings`)."""
    return {"time_budget_s": config.fallback_time_s, "n_seeds": 2}


def spectrum_seed(config_seed: int, index: int, name: str) -> int:
    """The seed of spectrum `name` at the AR point `index` of a scan seeded `config_seed`."""
    return config_seed * 100_003 + 1000 * index + SPECTRUM_NAMES.index(name)


def events_in_fit_range(values: np.ndarray, edges: np.ndarray, name: str) -> int:
    """Events of spectrum `name` in the bins from its stream's fit start on."""
    stream = name.split("/", maxsplit=1)[0]
    return int(values[edges[:-1] >= STREAM_FIT_FROM_GEV[stream]].sum())


def record_decision(
    ctx: ScanContext,
    step_id: str,
    kind: str,
    *,
    spectrum: str | None = None,
    point_pb: float | None = None,
    chosen: Any = None,
    options: Any = None,
    policy: str | None = None,
    rationale: str = "",
    numbers: Any = None,
    gate: str = "",
) -> None:
    """One `decisions` row, after the rows the policy queued in this step.

    `policy` defaults to the policy that took the last decision (`rules` when the LLM
    policy fell back).
    """
    for row in ctx.policy.take_rows():
        ctx.audit.add(row.table, f"{step_id}:{row.key}", step_id=step_id, **row.content)
    ctx.audit.add(
        "decisions",
        f"{step_id}:{kind}:{spectrum or '-'}",
        step_id=step_id,
        kind=kind,
        spectrum=spectrum,
        point_pb=point_pb,
        chosen=chosen,
        options=options,
        policy=policy or ctx.policy.decided_by(),
        rationale=rationale,
        numbers=numbers,
        gate=gate,
    )


def write_npz(path: Path, what: str, **arrays: Any) -> Path:
    """Write `arrays` to the NPZ file `path` atomically (`core.files.atomic_path`)."""
    with atomic_path(path, what=what) as temporary:
        np.savez(temporary, **arrays)
    return path


def read_point_spectra(ctx: ScanContext, current: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The current AR point's spectra: bin edges (GeV) and counts (63, n_bins)."""
    with np.load(ctx.at(current["spectra_file"])) as data:
        return data["edges"], data["counts"]


def _search_input(
    edges: np.ndarray, values: np.ndarray, entry: dict[str, Any], seed: int
) -> dict[str, Any]:
    """A `search_spectrum` input: the background as chosen, with its mask when it had one."""
    return {
        "histogram": {"edges": edges.tolist(), "counts": values.tolist()},
        "fit_range": entry["fit_range"],
        "function": entry["function"],
        "parameters": entry["parameters"],
        "masked_window_gev": entry.get("masked_window_gev"),
        "seed": seed,
    }


def search_calls(
    ctx: ScanContext,
    edges: np.ndarray,
    counts: np.ndarray,
    backgrounds: dict[str, dict[str, Any]],
    index: int,
    names: list[str],
) -> list[tuple[str, dict[str, Any]]]:
    """The labelled `search_spectrum` inputs of `names` at the AR point `index`."""
    return [
        (
            name,
            _search_input(
                edges,
                counts[SPECTRUM_NAMES.index(name)],
                backgrounds[name],
                spectrum_seed(ctx.config.seed, index, name),
            ),
        )
        for name in names
    ]


def stream_ranking(ctx: ScanContext, state: ScanState) -> StreamRanking:
    """The event table's ranking per stream (one pass, cached): deep enough for every point.

    Its depth is N = sigma L at the top of the scan's cross-section range (with the points
    gate's tolerance), which no AR point, refinements included, exceeds. The autoencoder's
    training events are left out (as in every region of the scan).
    """
    return cast(
        StreamRanking,
        ctx.cached(
            "ranking",
            lambda: rank_streams(
                ctx.at(state["table"]),
                requested_count(
                    max(ctx.config.xsec_range) * (1 + DUPLICATE_TOLERANCE), state["lumi_pb"]
                ),
                search_exclusion(ctx, state),
            ),
        ),
    )


def search_exclusion(ctx: ScanContext, state: ScanState) -> Callable[[np.ndarray], np.ndarray]:
    """Event keys -> the autoencoder's training events, by the model card's selection."""
    card = read_model_card(ctx.at(state["model"]))
    return lambda keys: training_selection(keys, card.fraction, card.seed)
