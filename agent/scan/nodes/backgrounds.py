"""The `choose_backgrounds` node: the background of every spectrum, by the rule of core.spectrum.

1. `choose_background` unmasked, accepted through the policy and the gates; 2. where none
passed, the masked choice: the hunt against the provisional (the F-test's, rejected)
function flags a window, which is masked and the background chosen again (unless it sits
on a knee of the spectrum: `core.spectrum.knee_refusal`); 3. where still
none passed, the symbolic fallback when the policy asks for it (the rules:
`core.spectrum.fallback_applies`) and the scan's budget allows (at most `fallback_budget`
per scan). A refused proposal is replaced by the rules' answer, never by nothing; every
step is a decision row and every accepted fit a `fits` row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.policy.gates import background_gate, fallback_gate
from agent.policy.protocol import BackgroundProposal, Candidate, CheckSummary, FallbackProposal
from agent.scan.context import ScanContext, ToolResult
from agent.scan.nodes.common import (
    events_in_fit_range,
    read_point_spectra,
    record_decision,
    scan_checks,
    scan_fallback_settings,
    search_calls,
    spectrum_seed,
)
from agent.scan.state import ScanState
from core.anomaly import point_text
from core.exclusion import EXCLUSION_TRIGGER_P
from core.files import write_text
from core.masses import SPECTRUM_NAMES, STREAM_FIT_FROM_GEV
from core.significance import format_p
from core.spectrum import PROBE_MAX_TOYS, knee_refusal

__all__ = ["choose_backgrounds_node"]

Backgrounds = dict[str, dict[str, Any]]
"""Spectrum -> its background entry: status "accepted", "provisional" or "no background"."""


@dataclass(frozen=True)
class _Point:
    """The AR point whose backgrounds are chosen: step, cross section (pb), index, spectra."""

    step_id: str
    point_pb: float
    index: int
    edges: np.ndarray
    counts: np.ndarray


def choose_backgrounds_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Choose every spectrum's background (steps 1-3) and write points/point-NNN-backgrounds."""
    current = dict(state["current"] or {})
    at = _Point(
        step_id,
        float(current["point_pb"]),
        int(current["index"]),
        *read_point_spectra(ctx, current),
    )
    names = [n for n in SPECTRUM_NAMES if n not in current["skipped"]]
    backgrounds, unmasked = _choose_unmasked(ctx, at, names)
    _choose_masked(ctx, at, backgrounds)
    fallbacks_used = _choose_fallbacks(
        ctx, at, backgrounds, unmasked, int(state.get("fallbacks_used", 0))
    )
    for entry in backgrounds.values():
        if entry["status"] == "provisional":
            entry["status"] = "no background"
            entry["reason"] += "; " + entry.pop("rescue", "no window to mask")
    path = ctx.run_dir / "points" / f"point-{at.index:03d}-backgrounds.json"
    path.parent.mkdir(exist_ok=True)
    write_text(
        path, json.dumps({"point_pb": at.point_pb, "backgrounds": backgrounds}), what="backgrounds"
    )
    current["backgrounds_file"] = ctx.relative(path)
    current["backgrounds_sha256"] = ctx.artifact(path, "backgrounds")
    ctx.progress.update(spectra_done=ctx.progress.spectra_done + len(names))
    return {
        "stage": f"backgrounds at {point_text(at.point_pb)} pb",
        "current": current,
        "fallbacks_used": fallbacks_used,
    }


def _choice_input(
    ctx: ScanContext,
    edges: np.ndarray,
    counts: np.ndarray,
    index: int,
    name: str,
    window: list[float] | None = None,
) -> dict[str, Any]:
    """The `choose_background` input of `name` at AR point `index`, without the fallback.

    The histogram inline, the stream's fit start, the spectrum's seed and the scan's checks,
    with `window` (GeV) masked when given.
    """
    stream = name.split("/", maxsplit=1)[0]
    checks = scan_checks(ctx.config) | ({} if window is None else {"window": window})
    return {
        "histogram": {
            "edges": edges.tolist(),
            "counts": counts[SPECTRUM_NAMES.index(name)].tolist(),
        },
        "stream_start_gev": STREAM_FIT_FROM_GEV[stream],
        "seed": spectrum_seed(ctx.config.seed, index, name),
        "checks": checks,
        "use_fallback": False,
    }


# ---------------------------------------------------------------- step 1: unmasked


def _choose_unmasked(
    ctx: ScanContext, at: _Point, names: list[str]
) -> tuple[Backgrounds, dict[str, tuple[dict[str, Any], dict[str, Any]]]]:
    """Step 1 for `names`: the backgrounds, and the (input, output) of those none passed."""
    calls = [(name, _choice_input(ctx, at.edges, at.counts, at.index, name)) for name in names]
    results = ctx.call_tools(at.step_id, "choose_background", calls)
    backgrounds: Backgrounds = {}
    unmasked: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for (name, payload), result in zip(calls, results, strict=True):
        if result.output is None or not result.output["candidates"]:
            backgrounds[name] = _no_fit(ctx, at, name, result)
            continue
        proposal = _accept(ctx, at, name, _candidates(result.output))
        if proposal.function is not None:
            backgrounds[name] = _accepted(
                ctx, at, name, result.output, proposal.function, "unmasked"
            )
            continue
        backgrounds[name] = _provisional(result.output, proposal.rationale)
        unmasked[name] = (payload, result.output)
    return backgrounds, unmasked


def _no_fit(ctx: ScanContext, at: _Point, name: str, result: ToolResult) -> dict[str, Any]:
    """No function could be fitted to `name` at all: its entry, with a decision row."""
    why = result.error if result.output is None else "no function could be fitted"
    failures = "" if result.output is None else f" {result.output['failures']}"
    record_decision(
        ctx,
        at.step_id,
        "background",
        spectrum=name,
        point_pb=at.point_pb,
        chosen=None,
        policy="rules",
        rationale=f"every fit failed: {why}{failures}",
        gate="no candidate",
    )
    return {"status": "no background", "reason": f"fit failed: {why}"}


def _candidates(output: dict[str, Any]) -> list[Candidate]:
    """The candidates a `choose_background` output tried, in order, with their checks."""
    return [
        Candidate(
            function=row["function"],
            passed=bool(row["passed"]) and bool(row["checked"]),
            checks=[
                CheckSummary(name=c["name"], passed=c["passed"], numbers=c["numbers"])
                for c in row["checks"]
            ],
            source=row["source"],
        )
        for row in output["candidates"]
    ]


def _accept(
    ctx: ScanContext,
    at: _Point,
    name: str,
    candidates: list[Candidate],
    kind: str = "background",
) -> BackgroundProposal:
    """Ask the policy, gate the answer, fall back to rules when refused; log it all."""
    proposal = ctx.policy.accept_background(name, at.point_pb, candidates)
    gate = background_gate(proposal, candidates, set(SPECTRUM_NAMES))
    gate_text = f"passed: {gate.reason}"
    if not gate.passed:
        refused = proposal
        proposal = ctx.rules.accept_background(name, at.point_pb, candidates)
        gate_text = f"refused {refused.function!r} ({gate.reason}); rules: {proposal.function!r}"
    record_decision(
        ctx,
        at.step_id,
        kind,
        spectrum=name,
        point_pb=at.point_pb,
        chosen=proposal.function,
        options=[c.model_dump() for c in candidates],
        policy=ctx.policy.decided_by() if gate.passed else "rules",
        rationale=proposal.rationale,
        gate=gate_text,
    )
    return proposal


def _check_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What a candidate's checks said: passed overall, each check's status, the GOF p."""
    gof = next((c for c in row["checks"] if c["name"] == "goodness_of_fit"), None)
    return {
        "checks_passed": bool(row["checked"]) and bool(row["passed"]),
        "checks": {c["name"]: c["status"] for c in row["checks"]},
        "gof_p_value": None if gof is None else gof["numbers"].get("p_value"),
        "gof_passed": None if gof is None else bool(gof["passed"]),
    }


def _accepted(
    ctx: ScanContext,
    at: _Point,
    name: str,
    output: dict[str, Any],
    function: str,
    choice: str,
    masked_window_gev: list[float] | None = None,
) -> dict[str, Any]:
    """The accepted candidate's row as the input of its bump hunt; logged in `fits`.

    `choice` is how it was chosen: "unmasked", "masked" (rule step 2, with
    `masked_window_gev` left out of the fit) or "fallback".
    """
    row = next(r for r in output["candidates"] if r["function"] == function)
    summary = _check_summary(row)
    ctx.audit.add(
        "fits",
        f"{at.step_id}:{name}:{function}",
        step_id=at.step_id,
        spectrum=name,
        point_pb=at.point_pb,
        function=function,
        parameters=row["parameters"],
        p_value=row["p_value"],
        chi2=row["deviance"],
        ndf=row["ndf"],
        fit_range=row["fit_range"],
        passed=summary["checks_passed"],
    )
    return {
        "status": "accepted",
        "function": row["expression"] if row["source"] == "fallback" else function,
        "name": function,
        "fit_range": list(row["fit_range"]),
        "parameters": row["parameters"],
        "choice": choice,
        "masked_window_gev": masked_window_gev,
        "fit_p_value": row["p_value"],
        **summary,
    }


def _provisional(output: dict[str, Any], reason: str) -> dict[str, Any]:
    """No candidate passed: the F-test's function is kept only to look for a window to mask.

    A strong signal makes every function fail its checks (the F-test climbs to fit the bump,
    the goodness of fit fails). PHYSICS.md 5 masks the flagged window and chooses again: a
    provisional background never yields an excess itself; only a background chosen again
    with the window masked that passes every check (through the gates) does.
    """
    checked = [row for row in output["candidates"] if row["checks"]]
    if not checked:
        return {"status": "no background", "reason": reason}
    row = checked[0]
    return {
        "status": "provisional",
        "function": row["expression"] if row["source"] == "fallback" else row["function"],
        "name": row["function"],
        "fit_range": list(row["fit_range"]),
        "parameters": row["parameters"],
        "fit_p_value": row["p_value"],
        "failed_checks": [c["name"] for c in row["checks"] if c["status"] == "fail"],
        "reason": reason,
    }


# ---------------------------------------------------------------- step 2: masked


def _choose_masked(ctx: ScanContext, at: _Point, backgrounds: Backgrounds) -> None:
    """Rule step 2 (core.spectrum) for spectra whose every unmasked fit failed its checks.

    The hunt against the provisional (the F-test's rejected) function, `search_spectrum`
    as the library's `flagged_window` runs it, flags a window when its global p is below
    EXCLUSION_TRIGGER_P; the window exclusion's signal-width mask is then left out of every
    fit of `choose_background`, and a function that passes every check is accepted through
    the policy and the gates, to be searched with that mask. Both fits and the decision are
    decision rows (`provisional`, `background_masked`). The rescue stands only if the hunt
    against the masked background is decisive (`core.spectrum.rescue_refusal`, in the
    hunt_bumps node).
    """
    provisional = [
        n for n in SPECTRUM_NAMES if backgrounds.get(n, {}).get("status") == "provisional"
    ]
    if not provisional:
        return
    masked_calls = _flag_windows(ctx, at, backgrounds, provisional)
    if not masked_calls:
        return
    ctx.progress.update(stage=f"masked choice ({len(masked_calls)} spectra)")
    results = ctx.call_tools(at.step_id, "choose_background", masked_calls)
    for (name, _), result in zip(masked_calls, results, strict=True):
        entry = backgrounds[name]
        low, high = entry["window"]
        if result.output is None or not result.output["candidates"]:
            entry["rescue"] = f"the fits with {low:.0f}-{high:.0f} GeV masked failed"
            continue
        proposal = _accept(ctx, at, name, _candidates(result.output), kind="background_masked")
        if proposal.function is None:
            entry["rescue"] = f"no function passed every check with {low:.0f}-{high:.0f} GeV masked"
            continue
        accepted = _accepted(ctx, at, name, result.output, proposal.function, "masked", [low, high])
        accepted["unmasked"] = {key: entry[key] for key in ("name", "fit_p_value", "failed_checks")}
        backgrounds[name] = accepted


def _flag_windows(
    ctx: ScanContext, at: _Point, backgrounds: Backgrounds, provisional: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """Hunt against each provisional background; the masked `choose_background` inputs.

    A spectrum whose hunt flags no window (or fails) gets its `rescue` reason instead. The
    hunts stop at `PROBE_MAX_TOYS` toys, as the library's `flagged_window` does.
    """
    ctx.progress.update(stage=f"flagged windows ({len(provisional)} spectra)")
    probes = ctx.call_tools(
        at.step_id,
        "search_spectrum",
        [
            (name, payload | {"max_toys": PROBE_MAX_TOYS})
            for name, payload in search_calls(
                ctx, at.edges, at.counts, backgrounds, at.index, provisional
            )
        ],
    )
    masked_calls = []
    for name, probe in zip(provisional, probes, strict=True):
        entry = backgrounds[name]
        if probe.output is None:
            entry["rescue"] = f"the provisional bump hunt failed: {probe.error}"
            continue
        bump = probe.output["bump_unmasked"]
        exclusion = probe.output["window_exclusion"]
        if exclusion is None:
            p_text = format_p(bump["global_p"], bump["global_z_is_lower_limit"])
            entry["rescue"] = (
                f"no window to mask: global p {p_text} >= {EXCLUSION_TRIGGER_P} "
                f"against the provisional {entry['name']}"
            )
            continue
        window = [float(v) for v in exclusion["window_gev"]]
        refusal = knee_refusal(
            at.edges,
            at.counts[SPECTRUM_NAMES.index(name)],
            (entry["fit_range"][0], entry["fit_range"][1]),
            (window[0], window[1]),
        )
        if refusal is not None:
            entry["rescue"] = refusal
            _record_provisional(ctx, at, name, entry, bump, None, refusal)
            continue
        entry["window"] = window
        _record_provisional(ctx, at, name, entry, bump, window)
        masked_calls.append((name, _choice_input(ctx, at.edges, at.counts, at.index, name, window)))
    return masked_calls


def _record_provisional(
    ctx: ScanContext,
    at: _Point,
    name: str,
    entry: dict[str, Any],
    bump: dict[str, Any],
    window: list[float] | None,
    refusal: str | None = None,
) -> None:
    """The `provisional` decision on the window flagged against the rejected function.

    Masked (`window`) and the background chosen again; or, when the window sits on a knee
    (`refusal`), no mask and no rescue.
    """
    found = f"{bump['window'][0]:.0f}-{bump['window'][1]:.0f} GeV"
    p_text = format_p(bump["global_p"], bump["global_z_is_lower_limit"])
    if window is None:
        chosen = None
        rationale = (
            f"no function passed its checks; against the F-test's {entry['name']} the best "
            f"window {found} has global p {p_text}, but the {refusal}"
        )
        numbers = {"trigger_global_p": bump["global_p"], "unmasked_function": entry["name"]}
    else:
        chosen = {"mask_gev": window}
        rationale = (
            f"no function passed its checks; against the F-test's {entry['name']} (fit p "
            f"{entry['fit_p_value']:.3g}, failed {', '.join(entry['failed_checks'])}; kept "
            f"only to find a window) the best window {found} has global p "
            f"{p_text} < {EXCLUSION_TRIGGER_P}: masked and the background "
            "chosen again"
        )
        numbers = {
            "unmasked_function": entry["name"],
            "unmasked_fit_p_value": entry["fit_p_value"],
            "unmasked_failed_checks": entry["failed_checks"],
            "trigger_global_p": bump["global_p"],
            "window_gev": window,
        }
    record_decision(
        ctx,
        at.step_id,
        "provisional",
        spectrum=name,
        point_pb=at.point_pb,
        chosen=chosen,
        policy="rules",
        rationale=rationale,
        numbers=numbers,
    )


# ---------------------------------------------------------------- step 3: symbolic fallback


def _choose_fallbacks(
    ctx: ScanContext,
    at: _Point,
    backgrounds: Backgrounds,
    unmasked: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    fallbacks_used: int,
) -> int:
    """Step 3 for the spectra still without a background; the fallbacks used so far."""
    fallback_calls = []
    for name, (payload, output) in unmasked.items():
        if backgrounds[name]["status"] == "accepted":
            continue
        values = at.counts[SPECTRUM_NAMES.index(name)]
        decision = _fallback(
            ctx,
            at,
            name,
            _candidates(output),
            events_in_fit_range(values, at.edges, name),
            ctx.config.fallback_budget - fallbacks_used,
        )
        if decision.use_fallback:
            fallbacks_used += 1
            settings = scan_fallback_settings(ctx.config)
            fallback_calls.append(
                (name, payload | {"use_fallback": True, "fallback_search": settings})
            )
    if fallback_calls:
        ctx.progress.update(stage=f"symbolic fallback ({len(fallback_calls)} spectra)")
        results = ctx.call_tools(at.step_id, "choose_background", fallback_calls)
        for (name, _), result in zip(fallback_calls, results, strict=True):
            _accept_fallback(ctx, at, backgrounds, name, result)
    return fallbacks_used


def _fallback(
    ctx: ScanContext,
    at: _Point,
    name: str,
    candidates: list[Candidate],
    n_in_range: int,
    fallbacks_left: int,
) -> FallbackProposal:
    """Whether to search a symbolic background for `name`: the policy, gated; logged."""
    proposal = ctx.policy.fallback(name, at.point_pb, candidates, n_in_range, fallbacks_left)
    gate = fallback_gate(proposal, candidates)
    if not gate.passed or (proposal.use_fallback and fallbacks_left <= 0):
        proposal = ctx.rules.fallback(name, at.point_pb, candidates, n_in_range, fallbacks_left)
    record_decision(
        ctx,
        at.step_id,
        "fallback",
        spectrum=name,
        point_pb=at.point_pb,
        chosen=proposal.use_fallback,
        options={"n_in_range": n_in_range, "fallbacks_left": fallbacks_left},
        rationale=proposal.rationale,
        gate=gate.reason,
    )
    return proposal


def _accept_fallback(
    ctx: ScanContext, at: _Point, backgrounds: Backgrounds, name: str, result: ToolResult
) -> None:
    """Accept the symbolic fallback's background of `name` when it passes, else say why not."""
    if result.output is None:
        backgrounds[name]["rescue"] = (
            backgrounds[name].get("rescue", "no window to mask")
            + f"; the fallback failed: {result.error}"
        )
        return
    proposal = _accept(ctx, at, name, _candidates(result.output), kind="background_fallback")
    if proposal.function is not None:
        backgrounds[name] = _accepted(ctx, at, name, result.output, proposal.function, "fallback")
    else:
        backgrounds[name]["rescue"] = (
            backgrounds[name].get("rescue", "no window to mask")
            + "; the symbolic fallback did not pass either"
        )
