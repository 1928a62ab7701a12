"""The `hunt_bumps` node: `search_spectrum` against every accepted background (rule step 4).

A background chosen with a mask is searched with it (no second exclusion); one chosen
unmasked goes through the window exclusion. The hunt's result counts only when it used
the background that passed its checks, with the mask it was chosen with: anything else is
"no background", never an excess. Each spectrum's row in points/point-NNN.json records the
background the hunt used (function, final fit p, its checks, mask); the arrays (data, the
final background and its 1-sigma error per bin; per spectrum k with an excess row, its fit's
`jacobian_k` (bins in range x parameters), `covariance_k` and `fitted_k`, the bins its
likelihood used, for the refitted pseudo-scans of the look-elsewhere test) go to
points/point-NNN.npz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.scan.context import ScanContext, ToolResult
from agent.scan.nodes.common import read_point_spectra, record_decision, search_calls, write_npz
from agent.scan.state import PointRecord, ScanState
from core.anomaly import point_text
from core.bumphunt import bonferroni_bound
from core.files import write_text
from core.masses import SPECTRUM_NAMES
from core.spectrum import RESCUE_BOUND, rescue_refusal

__all__ = ["hunt_bumps_node"]

_EXCLUSION_NUMBERS = (
    "trigger_global_p",
    "window_gev",
    "background_unmasked",
    "background_masked",
    "agreement_sigma",
    "unmasked_p_value",
    "masked_p_value",
)


_HUNT_KEYS = ("width_min", "width_max", "min_window_background", "min_window_count")
"""The hunt's window set, recorded per spectrum for the scan-wide test."""


@dataclass
class _PointHunt:
    """What the hunt of one AR point found: per-spectrum rows, outcomes, final backgrounds."""

    step_id: str
    point_pb: float
    whole_stream: dict[str, bool]
    background: np.ndarray
    background_error: np.ndarray
    fits: dict[str, np.ndarray] = field(default_factory=dict)
    spectra: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def whole(self, name: str) -> bool:
        """Whether the anomaly region of `name`'s stream is the whole stream."""
        return bool(self.whole_stream.get(name.split("/", maxsplit=1)[0]))

    def without_excess(self, name: str, status: str, reason: str) -> None:
        """`name` was skipped or has no background: no local Z, and why."""
        self.outcomes[name] = {"status": status, "local_z": None, "whole_stream": self.whole(name)}
        self.spectra.append({"spectrum": name, "status": status, "reason": reason})


def hunt_bumps_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Hunt every accepted spectrum of the current AR point and write the point's results."""
    current = dict(state["current"] or {})
    point = float(current["point_pb"])
    index = int(current["index"])
    edges, counts = read_point_spectra(ctx, current)
    backgrounds = json.loads(ctx.at(current["backgrounds_file"]).read_text())["backgrounds"]
    accepted = [n for n in SPECTRUM_NAMES if backgrounds.get(n, {}).get("status") == "accepted"]
    calls = search_calls(ctx, edges, counts, backgrounds, index, accepted)
    searches = {r.label: r for r in ctx.call_tools(step_id, "search_spectrum", calls)}
    hunt = _PointHunt(
        step_id,
        point,
        current.get("whole_stream", {}),
        np.zeros_like(counts),
        np.zeros_like(counts),
    )
    for k, name in enumerate(SPECTRUM_NAMES):
        if name in current["skipped"]:
            hunt.without_excess(name, "skipped", current["skipped"][name])
            continue
        entry = backgrounds.get(name, {"status": "no background", "reason": "not fitted"})
        _hunt_spectrum(ctx, hunt, k, name, entry, searches.get(name))
    folder = ctx.run_dir / "points"
    arrays = write_npz(
        folder / f"point-{index:03d}.npz",
        "point arrays",
        edges=edges,
        counts=counts,
        background=hunt.background,
        background_error=hunt.background_error,
        **hunt.fits,
    )
    results_path = write_text(
        folder / f"point-{index:03d}.json",
        json.dumps({"point_pb": point, "arrays": arrays.name, "spectra": hunt.spectra}),
        what="point results",
    )
    ctx.artifact(arrays, "point arrays")
    record: PointRecord = {
        "index": index,
        "point_pb": point,
        "spectra_file": current["spectra_file"],
        "spectra_sha256": current["spectra_sha256"],
        "results_file": ctx.relative(results_path),
        "results_sha256": ctx.artifact(results_path, "point results"),
        "outcomes": hunt.outcomes,
    }
    ctx.progress.update(points_done=index + 1, spectra_done=ctx.progress.spectra_total)
    return {
        "stage": f"bumps at {point_text(point)} pb",
        "points": [*state["points"], record],
        "current": None,
    }


def _used_background(entry: dict[str, Any], out: dict[str, Any]) -> tuple[bool, str]:
    """Whether the background the hunt used is the one that passed its checks, and why not.

    The hunt must use the accepted function with the mask it was chosen with, and a
    background that passed unmasked stays unmasked (the window exclusion is a diagnostic).
    """
    chosen_mask = entry.get("masked_window_gev")
    used_mask = out.get("masked_window_gev")
    if not entry.get("checks_passed"):
        return False, f"the accepted {entry['name']} did not pass its checks"
    if chosen_mask is not None and (
        out.get("mask_from") != "choice"
        or used_mask is None
        or not np.allclose(used_mask, chosen_mask, rtol=1e-9)
    ):
        return False, (
            f"{entry['name']} was chosen with {chosen_mask[0]:.0f}-{chosen_mask[1]:.0f} GeV "
            f"masked but the hunt used the mask {used_mask}"
        )
    if chosen_mask is None and used_mask is not None:
        return False, f"the hunt masked {used_mask} though {entry['name']} was chosen unmasked"
    return True, ""


def _rescue_refused(
    ctx: ScanContext, hunt: _PointHunt, name: str, entry: dict[str, Any], bump: dict[str, Any]
) -> bool:
    """Whether the rescue of rule step 2 does not stand (`core.spectrum.rescue_refusal`).

    A refused rescue is a `rescue_refused` decision row and leaves the spectrum without a
    background, as the library's rule does.
    """
    refusal = rescue_refusal(bump["statistic"], bump["n_windows"], entry["name"])
    if refusal is None:
        return False
    record_decision(
        ctx,
        hunt.step_id,
        "rescue_refused",
        spectrum=name,
        point_pb=hunt.point_pb,
        chosen=None,
        policy="rules",
        rationale=refusal,
        numbers={
            "local_z": bump["local_z"],
            "n_windows": bump["n_windows"],
            "bonferroni_bound": bonferroni_bound(bump["statistic"], bump["n_windows"]),
            "rescue_bound": RESCUE_BOUND,
        },
    )
    hunt.without_excess(name, "no background", f"no accepted background: {refusal}")
    return True


def _hunt_spectrum(
    ctx: ScanContext,
    hunt: _PointHunt,
    k: int,
    name: str,
    entry: dict[str, Any],
    search: ToolResult | None,
) -> None:
    """Add spectrum `name` (row `k`) to the hunt: its excess, or why it has none."""
    if entry["status"] != "accepted":
        hunt.without_excess(name, "no background", entry.get("reason") or "no accepted background")
        return
    if search is None or search.output is None:
        reason = f"bump hunt failed: {search.error if search else ''}"
        hunt.without_excess(name, "no background", reason)
        return
    out = search.output
    passed, why = _used_background(entry, out)
    if not passed:
        hunt.without_excess(name, "no background", f"no accepted background: {why}")
        return
    if out["mask_from"] == "choice" and _rescue_refused(ctx, hunt, name, entry, out["bump"]):
        return
    exclusion = out["window_exclusion"]
    if exclusion is not None:
        record_decision(
            ctx,
            hunt.step_id,
            "window_exclusion",
            spectrum=name,
            point_pb=hunt.point_pb,
            chosen="unmasked kept (masked refit agrees)"
            if exclusion["agrees"]
            else "unmasked kept (masked refit disagrees)",
            policy="rules",
            rationale=exclusion["reason"],
            numbers={key: exclusion[key] for key in _EXCLUSION_NUMBERS},
        )
    if out["mask_from"] == "choice":
        _record_masked_background(ctx, hunt, name, entry, out)
    first, stop = out["first_bin"], out["stop_bin"]
    hunt.background[k, first:stop] = out["background"]
    hunt.background_error[k, first:stop] = out["background_error"]
    if out.get("jacobian"):
        hunt.fits[f"jacobian_{k}"] = np.asarray(out["jacobian"], dtype=float)
        hunt.fits[f"covariance_{k}"] = np.asarray(out["covariance"], dtype=float)
        hunt.fits[f"fitted_{k}"] = np.asarray(out["fitted"], dtype=bool)
    bump = out["bump"]
    hunt.outcomes[name] = {
        "status": "excess",
        "local_z": bump["local_z"],
        "whole_stream": hunt.whole(name),
    }
    hunt.spectra.append(_excess_row(name, entry, out, passed))
    ctx.audit.add(
        "bumps",
        f"{hunt.step_id}:{name}",
        step_id=hunt.step_id,
        spectrum=name,
        point_pb=hunt.point_pb,
        window_lo=bump["window"][0],
        window_hi=bump["window"][1],
        data=bump["data"],
        background=bump["background"],
        local_p=bump["local_p"],
        local_z=bump["local_z"],
        global_p=bump["global_p"],
        global_z=bump["global_z"],
    )


def _record_masked_background(
    ctx: ScanContext, hunt: _PointHunt, name: str, entry: dict[str, Any], out: dict[str, Any]
) -> None:
    """The `masked_background` decision: the hunt uses the background chosen with a mask."""
    unmasked = entry.get("unmasked", {})
    record_decision(
        ctx,
        hunt.step_id,
        "masked_background",
        spectrum=name,
        point_pb=hunt.point_pb,
        chosen="masked background",
        policy="rules",
        rationale=(
            f"every unmasked function failed its checks ({unmasked.get('name')}: fit "
            f"p {unmasked.get('fit_p_value')}); {entry['name']} chosen with "
            f"{out['masked_window_gev'][0]:.0f}-{out['masked_window_gev'][1]:.0f} GeV "
            "masked passed every check: the hunt uses it with that mask, no "
            "agreement test against the failed unmasked fit"
        ),
        numbers={
            "window_gev": out["masked_window_gev"],
            "masked_function": entry["name"],
            "masked_fit_p_value": out["p_value"],
            "masked_gof_p_value": entry.get("gof_p_value"),
            "unmasked_function": unmasked.get("name"),
            "unmasked_fit_p_value": unmasked.get("fit_p_value"),
            "unmasked_failed_checks": unmasked.get("failed_checks"),
        },
    )


def _excess_row(
    name: str, entry: dict[str, Any], out: dict[str, Any], passed: bool
) -> dict[str, Any]:
    """The row of points/point-NNN.json of a spectrum with an accepted background."""
    bump = out["bump"]
    return {
        "spectrum": name,
        "status": "excess",
        "function": entry["name"],
        "bins": [out["first_bin"], out["stop_bin"]],
        "fit_range": list(out["fit_range"]),
        "window_gev": list(bump["window"]),
        "data": bump["data"],
        "background": bump["background"],
        "local_p": bump["local_p"],
        "local_z": bump["local_z"],
        "global_p": bump["global_p"],
        "global_z": bump["global_z"],
        "global_z_is_lower_limit": bump["global_z_is_lower_limit"],
        "fit_p_value": out["p_value"],
        "checks_passed": passed,
        "checks": entry["checks"],
        "gof_p_value": entry["gof_p_value"],
        "gof_passed": entry["gof_passed"],
        "background_choice": entry["choice"],
        "hunt": {key: bump[key] for key in _HUNT_KEYS},
        "masked_window_gev": out["masked_window_gev"],
        "mask_from": out["mask_from"],
    }
