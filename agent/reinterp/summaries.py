"""Per injected cross-section: the toys' recoveries summarised, and whether the top excess is ours.

For each strength: per spectrum and AR point the mean and spread of the injected, expected
and fitted yields and of the three recoveries' pulls (agent/reinterp/recovery.py); the
fraction of the toys whose largest bump among the injected spectra overlaps the injected
+-2 sigma window, and is larger than every other excess of the scan; with background toys,
the same on the run's data ("observed"); and one line of text for the terminal and audit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.reinterp.recovery import RULE_NOT_RERUN
from agent.reinterp.request import InjectionRequest
from core.anomaly import point_text
from tools.reinterp import RunInputs

OBSERVED_KEYS = (
    "spectrum",
    "point_pb",
    "status",
    "expected_yield",
    "injected_yield",
    "signal_yield",
    "signal_yield_error",
    "local_z",
    "bump_local_z",
    "run_function_yield",
    "fixed_shape_yield",
)
"""The numbers of each spectrum kept in a strength's summary of the observed realisation."""


def _summary(values: list[float]) -> dict[str, float | None]:
    """Mean, standard deviation (None for one value) and count of the toys' values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
    }


def _window_overlaps(window: Sequence[float], mass: float, sigma: float) -> bool:
    """Whether a bump window overlaps the injected mass +- 2 sigma."""
    return bool(window[0] < mass + 2 * sigma and window[1] > mass - 2 * sigma)


def _spectrum_summary(group: list[dict[str, Any]]) -> dict[str, Any]:
    """The toys of one spectrum and point: yields, pulls of the three recoveries."""
    fitted = [f for f in group if "signal_yield" in f]
    ruled = [f for f in group if f["status"] != RULE_NOT_RERUN]

    def values(key: str) -> list[float]:
        return [float(f[key]) for f in group if key in f]

    return {
        "spectrum": group[0]["spectrum"],
        "point_pb": group[0]["point_pb"],
        "whole_stream": group[0]["whole_stream"],
        "n_toys": len(group),
        "n_rule_toys": len(ruled),
        "n_fitted": len(fitted),
        "accepted_fraction": len(fitted) / len(ruled) if ruled else None,
        "n_background_drawn": sum(f["background"] == "fit" for f in group),
        "backgrounds": sorted({f["background"] for f in group}),
        "injected_yield": _summary(values("injected_yield")),
        "expected_yield": _summary(values("expected_yield")),
        "fitted_yield": _summary(values("signal_yield")),
        "bias": _summary(values("bias")),
        "pull": _summary(values("pull")),
        "local_z": _summary(values("local_z")),
        "n_fixed_shape": sum("fixed_shape_yield" in f for f in group),
        "fixed_shape_yield": _summary(values("fixed_shape_yield")),
        "fixed_shape_pull": _summary(values("fixed_shape_pull")),
        "fixed_shape_bias": _summary(values("fixed_shape_bias")),
        "n_run_function": sum("run_function_yield" in f for f in group),
        "run_function_yield": _summary(values("run_function_yield")),
        "run_function_pull": _summary(values("run_function_pull")),
        "run_function_bias": _summary(values("run_function_bias")),
        "statuses": sorted({f["status"] for f in group}),
    }


def _top_is_injected(
    rows: list[dict[str, Any]], mass: float, sigma: float, best_other: float
) -> tuple[bool, bool]:
    """Whether the largest bump of these spectra is the injected one, and tops the scan."""
    candidates = [f for f in rows if "bump_local_z" in f]
    if not candidates:
        return False, False
    top = max(candidates, key=lambda f: f["bump_local_z"])
    hit = _window_overlaps(top["window_gev"], mass, sigma)
    return hit, hit and top["bump_local_z"] > best_other


def _observed_summary(
    seen: list[dict[str, Any]], mass: float, sigma: float, best_other: float
) -> dict[str, Any] | None:
    """The observed realisation of one strength: top excess and each spectrum's numbers."""
    if not seen:
        return None
    hit, scan = _top_is_injected(seen, mass, sigma, best_other)
    return {
        "top_is_injected": hit,
        "top_of_scan_is_injected": scan,
        "spectra": [{key: f.get(key) for key in OBSERVED_KEYS} for f in seen],
    }


def strength_summaries(
    run: RunInputs,
    request: InjectionRequest,
    fits: list[dict[str, Any]],
    observed: list[dict[str, Any]],
    sigma: float,
) -> list[dict[str, Any]]:
    """Per injected cross-section: yields and pulls per spectrum/point, the top excess."""
    others = [
        e
        for e in run.results.get("excesses", [])
        if not (e["spectrum"].endswith("/" + request.pair) and e["spectrum"] in _affected(fits))
    ]
    best_other = max((e["local_z"] for e in others), default=-math.inf)
    summaries = []
    for xsec in request.xsec_pb:
        rows = [f for f in fits if f["xsec_pb"] == xsec]
        per_spectrum = [
            _spectrum_summary([f for f in rows if f["spectrum"] == name and f["point_pb"] == point])
            for name, point in dict.fromkeys((f["spectrum"], f["point_pb"]) for f in rows)
        ]
        n_ruled = request.toys if request.rule_toys is None else request.rule_toys
        tops = [
            _top_is_injected([f for f in rows if f["toy"] == toy], request.mass, sigma, best_other)
            for toy in range(n_ruled)
        ]
        top_injected = [hit for hit, _ in tops]
        top_scan = [scan for _, scan in tops]
        observed_summary = _observed_summary(
            [f for f in observed if f["xsec_pb"] == xsec], request.mass, sigma, best_other
        )
        reference = max(
            (s for s in per_spectrum if s["n_run_function"] or s["n_fitted"]),
            key=lambda s: s["expected_yield"]["mean"] or 0.0,
            default=None,
        )
        summaries.append(
            {
                "xsec_pb": xsec,
                "spectra": per_spectrum,
                "reference_spectrum": None if reference is None else reference["spectrum"],
                "reference_point_pb": None if reference is None else reference["point_pb"],
                "n_rule_toys": n_ruled,
                "top_is_injected_fraction": sum(top_injected) / n_ruled if n_ruled else None,
                "top_of_scan_is_injected_fraction": sum(top_scan) / n_ruled if n_ruled else None,
                "largest_other_local_z": None if not math.isfinite(best_other) else best_other,
                "observed": observed_summary,
                "text": _strength_text(
                    xsec, reference, request.toys, top_injected, top_scan, observed_summary
                ),
            }
        )
    return summaries


def _pull_text(summary: dict[str, Any], key: str) -> str:
    pull = summary[key]
    if pull["mean"] is None:
        return "-"
    spread = "" if pull["std"] is None else f", width {pull['std']:.2f}"
    return f"{pull['mean']:+.2f}{spread}"


def _strength_text(
    xsec: float,
    reference: dict[str, Any] | None,
    toys: int,
    top_injected: list[bool],
    top_scan: list[bool],
    observed: dict[str, Any] | None,
) -> str:
    if reference is None:
        return f"{xsec:g} pb: no spectrum of the injected pair"
    fitted = reference["fitted_yield"]["mean"]
    ruled = len(top_injected)
    text = (
        f"{xsec:g} pb: {reference['spectrum']} at {point_text(reference['point_pb'])} pb: injected "
        f"{reference['injected_yield']['mean']:.1f} (expected "
        f"{reference['expected_yield']['mean']:.1f}) over {toys} toy(s); mean pull: rule rerun "
        f"{_pull_text(reference, 'pull')} (accepted in {reference['n_fitted']}/{ruled} toys"
        + ("" if fitted is None else f", fitted {fitted:.1f}")
        + f"), run's function {_pull_text(reference, 'run_function_pull')}, run's background "
        f"fixed {_pull_text(reference, 'fixed_shape_pull')}"
    )
    if ruled:
        text += (
            f"; top excess of the injected spectra is the injected one in "
            f"{sum(top_injected)}/{ruled} toys, of the scan in {sum(top_scan)}/{ruled}"
        )
    if observed is not None:
        row = next(
            (
                r
                for r in observed["spectra"]
                if r["spectrum"] == reference["spectrum"] and r["point_pb"] == reference["point_pb"]
            ),
            None,
        )
        z = None if row is None else row.get("local_z")
        text += (
            "; on the run's data: "
            + ("no accepted background" if z is None else f"local Z {z:.2f}")
            + (", the top excess of the scan" if observed["top_of_scan_is_injected"] else "")
        )
    return text


def _affected(fits: list[dict[str, Any]]) -> set[str]:
    """The spectra the injection analysed again."""
    return {f["spectrum"] for f in fits}
