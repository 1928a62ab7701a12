"""The scan as a LangGraph StateGraph: nodes call tools through the executor, edges ask the policy.

prepare -> plan -> [build_spectra -> choose_backgrounds -> hunt_bumps -> assess]* ->
look_elsewhere -> summarise. `assess` loops back while AR points are pending (the planned
grid, then the policy's refinements) and goes on when the policy stops or a budget is spent.

Every node runs inside one audit transaction keyed by its step id (`NNNN-node`, from the
state's step counter), so a node killed half-way leaves nothing in the log and its re-run
after `--resume` writes each row exactly once. Arrays never enter the state: they go to
NPZ files in the run folder, the state keeps paths and SHA-256.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from langgraph.graph import END, START, StateGraph

from agent.policy.gates import background_gate, fallback_gate, points_gate
from agent.policy.protocol import (
    BackgroundProposal,
    Candidate,
    CheckSummary,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
    SpectrumOutcome,
)
from agent.scan.runner import (
    BUILTIN_EVENTS,
    ScanConfig,
    ScanContext,
    folder_sha256,
    write_atomic,
    write_results,
)
from agent.scan.state import PointRecord, ScanState
from core.anomaly import point_text
from core.errors import AnomscanError, InvalidInputError, ModelError
from core.events import non_finite_note
from core.masses import PAIRS, STREAM_FIT_FROM_GEV, STREAMS

NodeBody = Callable[[ScanState, str], dict[str, Any]]


def scan_checks(config: ScanConfig) -> dict[str, Any]:
    """Robustness-check settings of a scan (a `CheckSettings`): defaults, GOF toys from config.

    The goodness of fit is asymptotic where the bins are well filled and otherwise from
    `gof_toys` toys refitted to first order (`core.robustness.goodness_of_fit`, method
    auto): the count the config records is the count the checks report.
    """
    return {"n_linear_toys": config.gof_toys}


SPECTRUM_NAMES = tuple(f"{stream}/{pair}" for stream in STREAMS for pair in PAIRS)


def _record_decision(
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
    _record_policy_rows(ctx, step_id)
    ctx.audit.add(
        "decisions",
        f"{step_id}:{kind}:{spectrum or '-'}",
        step_id=step_id,
        kind=kind,
        spectrum=spectrum,
        point_pb=point_pb,
        chosen=chosen,
        options=options,
        policy=policy or _decided_by(ctx),
        rationale=rationale,
        numbers=numbers,
        gate=gate,
    )


def _record_policy_rows(ctx: ScanContext, step_id: str) -> None:
    """Write the rows a policy queued (the LLM's messages, refusals, fallbacks) in this step."""
    for row in ctx.policy.take_rows():
        ctx.audit.add(row.table, f"{step_id}:{row.key}", step_id=step_id, **row.content)


def _decided_by(ctx: ScanContext) -> str:
    """The policy that took the last decision: `rules` when the LLM policy fell back."""
    return ctx.policy.decided_by()


def _node(ctx: ScanContext, name: str, body: NodeBody) -> Callable[[ScanState], dict[str, Any]]:
    """Wrap a node body: one audit transaction, a `steps` row, the step counter advanced."""

    def run(state: ScanState) -> dict[str, Any]:
        step = int(state.get("step", 0))
        step_id = f"{step:04d}-{name}"
        ctx.step_id = step_id
        ctx.progress.update(stage=name)
        started = time.time()
        with ctx.audit.transaction():
            update = body(state, step_id)
            ended = time.time()
            current = update.get("current", state.get("current"))
            ctx.audit.add(
                "steps",
                step_id,
                step_id=step_id,
                node=name,
                point_pb=None if not current else current.get("point_pb"),
                started_at=round(started, 3),
                ended_at=round(ended, 3),
                seconds=round(ended - started, 3),
                summary=update.get("stage", name),
            )
        return {**update, "step": step + 1}

    return run


# ---------------------------------------------------------------- prepare


def _prepare(ctx: ScanContext) -> NodeBody:
    from agent.runtime.eventpass import PassSpec, event_pass
    from agent.scan.runner import resolve_inputs

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        config = ctx.config
        run_dir = ctx.run_dir
        inputs = resolve_inputs(config)
        if inputs is None:
            from core.synth import DEMO_SIGNALS

            (generated,) = ctx.call_tools(
                step_id,
                "generate_sample",
                [
                    (
                        "built-in sample",
                        {
                            "output_dir": str(run_dir / "data"),
                            "n_events": config.events or BUILTIN_EVENTS,
                            "seed": config.seed,
                            "signals": [
                                {
                                    "pair": s.pair,
                                    "mass": s.mass,
                                    "width": s.width,
                                    "n_events": s.n_events,
                                    "extra": dict(s.extra),
                                }
                                for s in DEMO_SIGNALS
                            ],
                        },
                    )
                ],
            )
            if generated.output is None:
                raise AnomscanError(f"generating the built-in sample failed: {generated.error}")
            files = list(generated.output["files"])
            lumi = float(generated.output["lumi_pb"])
            schema = "nanoaod"
            source = "built-in synthetic sample"
        else:
            files, lumi, schema, source = (
                list(inputs.files),
                inputs.lumi_pb,
                inputs.schema,
                inputs.source,
            )
        hashes = {}
        for file in files:
            path = Path(file)
            hashes[file] = ctx.artifact(path, "input") if path.is_file() else "remote"
        _record_decision(
            ctx,
            step_id,
            "inputs",
            chosen={"files": len(files), "lumi_pb": lumi, "schema": schema},
            options={"source": source},
            policy="config",
            rationale=f"{len(files)} file(s) from {source}; luminosity {lumi:g} pb^-1",
        )

        model_path, model_source = _model(ctx, step_id, files, schema)
        from core.autoencoder import read_model_card

        card = read_model_card(model_path)
        model_hash = ctx.artifact(model_path, "model")
        ctx.progress.update(stage="event pass")
        if ctx.fan_out.kind in ("ray", "auto"):
            ctx.fan_out.start_ray()  # one session for the event pass and the fits
        executor = (
            "ray"
            if ctx.fan_out.kind == "ray"
            else ("auto" if ctx.fan_out.kind == "auto" else "serial")
        )
        summary = event_pass(
            files,
            run_dir / "events",
            PassSpec(schema=schema, model=str(model_path)),
            executor=executor,  # type: ignore[arg-type]
        )
        table_hash = folder_sha256(run_dir / "events")
        for part in sorted((run_dir / "events").glob("*.parquet")):
            ctx.artifact(part, "event table part")
        note = non_finite_note(summary.non_finite, summary.dropped_non_finite)
        _record_decision(
            ctx,
            step_id,
            "event_pass",
            chosen={
                "n_events": summary.n_events,
                "stream_counts": summary.stream_counts,
                "non_finite": summary.non_finite,
                "dropped_non_finite": summary.dropped_non_finite,
            },
            options={"executor": summary.executor, "model": model_source},
            policy="config",
            rationale=(
                f"{summary.n_events} events scored with the autoencoder ({model_source}, card "
                f"seed {card.seed}, trained on {card.fraction:.0%}) in {summary.seconds:.1f} s "
                f"({summary.executor})" + (f"; {note}" if note else "")
            ),
        )
        return {
            "stage": "prepared",
            "n_events": summary.n_events,
            "input_notes": [note] if note else [],
            "lumi_pb": lumi,
            "inputs": hashes,
            "model": ctx.relative(model_path),
            "model_sha256": model_hash,
            "table": ctx.relative(run_dir / "events"),
            "table_sha256": table_hash,
        }

    return body


def _model(ctx: ScanContext, step_id: str, files: list[str], schema: str) -> tuple[Path, str]:
    """The autoencoder: loaded from --model (checked) or trained on 1 % of the events."""
    from core.autoencoder import load_scorer, read_model_card

    config = ctx.config
    if config.model is not None:
        path = Path(config.model)
        if not path.is_file():
            raise InvalidInputError(f"model {path} does not exist; give an .onnx from a scan")
        try:
            read_model_card(path)
            load_scorer(path)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(
                f"the autoencoder {path} failed to load ({type(error).__name__}: {error}); "
                "give a model exported by anomscan, or leave out --model to train one"
            ) from error
        return path, f"loaded {path}"
    output = ctx.run_dir / "model" / "autoencoder.onnx"
    output.parent.mkdir(exist_ok=True)
    ctx.progress.update(stage="training the autoencoder")
    (trained,) = ctx.call_tools(
        step_id,
        "train_autoencoder",
        [
            (
                "autoencoder",
                {
                    "inputs": files,
                    "schema": schema,
                    "output": str(output),
                    "seed": config.seed,
                    "fraction": 0.01,
                    "max_epochs": config.epochs,
                },
            )
        ],
    )
    if trained.output is None:
        raise ModelError(f"training the autoencoder failed: {trained.error}")
    return output, f"trained on {trained.output['n_training_events']} events"


# ---------------------------------------------------------------- planning


def _plan(ctx: ScanContext) -> NodeBody:
    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        config = ctx.config
        proposal = ctx.policy.initial_points(config.xsec_range, config.points_per_decade)
        accepted, refused = points_gate(proposal, [], config.xsec_range, config.point_budget())
        if refused and ctx.policy is not ctx.rules:
            rules = ctx.rules.initial_points(config.xsec_range, config.points_per_decade)
            accepted, _ = points_gate(rules, [], config.xsec_range, config.point_budget())
        _record_decision(
            ctx,
            step_id,
            "ar_points",
            chosen=accepted,
            options={"xsec_range_pb": list(config.xsec_range), "budget": config.point_budget()},
            rationale=proposal.rationale,
            gate="passed" if not refused else "refused: " + "; ".join(refused),
        )
        return {"stage": "planned", "pending_pb": accepted, "points": [], "current": None}

    return body


# ---------------------------------------------------------------- spectra


def _build_spectra(ctx: ScanContext) -> NodeBody:
    from core.anomaly import stream_regions
    from core.autoencoder import read_model_card, training_selection
    from core.masses import histogram
    from core.table import read_event_table

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
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
        table = ctx.cached("table", lambda: read_event_table(ctx.at(state["table"])))
        card = read_model_card(ctx.at(state["model"]))
        exclude = ctx.cached(
            "exclude", lambda: training_selection(table.keys(), card.fraction, card.seed)
        )
        masks, whole = stream_regions(table, point, state["lumi_pb"], exclude)
        counts = []
        skipped: dict[str, str] = {}
        edges = None
        for k, stream in enumerate(STREAMS):
            for pair in PAIRS:
                values, edges = histogram(
                    table.masses, table.stream_bits, stream, pair, masks[:, k]
                )
                counts.append(values.astype(float))
                name = f"{stream}/{pair}"
                fit_from = STREAM_FIT_FROM_GEV[stream]
                n_in_range = int(values[edges[:-1] >= fit_from].sum())
                if n_in_range < ctx.config.min_events:
                    skipped[name] = (
                        f"too few events: {n_in_range} above the fit start {fit_from:g} GeV "
                        f"(< {ctx.config.min_events})"
                    )
        assert edges is not None
        ctx.progress.update(spectra_total=len(SPECTRUM_NAMES) - len(skipped))
        folder = ctx.run_dir / "spectra"
        folder.mkdir(exist_ok=True)
        path = folder / f"point-{index:03d}.npz"
        temporary = path.with_name(f".{path.stem}.partial.npz")
        np.savez(temporary, edges=edges, counts=np.array(counts), names=np.array(SPECTRUM_NAMES))
        temporary.replace(path)
        digest = ctx.artifact(path, "spectra")
        for name, reason in skipped.items():
            _record_decision(
                ctx,
                step_id,
                "skip",
                spectrum=name,
                point_pb=point,
                chosen="skipped",
                policy="rules",
                rationale=reason,
            )
        _record_decision(
            ctx,
            step_id,
            "anomaly_region",
            point_pb=point,
            chosen={"whole_stream": dict(zip(STREAMS, whole, strict=True))},
            numbers=_region_numbers(table.score, masks),
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
                "whole_stream": {
                    stream: bool(flag) for stream, flag in zip(STREAMS, whole, strict=True)
                },
            },
        }

    return body


def _region_numbers(score: np.ndarray | None, masks: np.ndarray) -> dict[str, Any]:
    """Per stream: events in the anomaly region and the lowest score among them.

    The report draws the lowest score as the AR cut on the score distribution.
    """
    lowest: dict[str, float | None] = {}
    for k, stream in enumerate(STREAMS):
        selected = masks[:, k]
        lowest[stream] = (
            None if score is None or not selected.any() else float(score[selected].min())
        )
    return {
        "n_in_region": {s: int(masks[:, k].sum()) for k, s in enumerate(STREAMS)},
        "lowest_score_in_region": lowest,
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
        "seed": _spectrum_seed(ctx.config.seed, index, name),
        "checks": checks,
        "use_fallback": False,
    }


def _spectrum_seed(config_seed: int, index: int, name: str) -> int:
    return config_seed * 100_003 + 1000 * index + SPECTRUM_NAMES.index(name)


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
    step_id: str,
    name: str,
    point: float,
    candidates: list[Candidate],
    kind: str = "background",
) -> BackgroundProposal:
    """Ask the policy, gate the answer, fall back to rules when refused; log it all."""
    proposal = ctx.policy.accept_background(name, point, candidates)
    gate = background_gate(proposal, candidates, set(SPECTRUM_NAMES))
    gate_text = f"passed: {gate.reason}"
    if not gate.passed:
        refused = proposal
        proposal = ctx.rules.accept_background(name, point, candidates)
        gate_text = f"refused {refused.function!r} ({gate.reason}); rules: {proposal.function!r}"
    _record_decision(
        ctx,
        step_id,
        kind,
        spectrum=name,
        point_pb=point,
        chosen=proposal.function,
        options=[c.model_dump() for c in candidates],
        policy=_decided_by(ctx) if gate.passed else "rules",
        rationale=proposal.rationale,
        gate=gate_text,
    )
    return proposal


def _fallback(
    ctx: ScanContext,
    step_id: str,
    name: str,
    point: float,
    candidates: list[Candidate],
    n_in_range: int,
    fallbacks_left: int,
) -> FallbackProposal:
    proposal = ctx.policy.fallback(name, point, candidates, n_in_range, fallbacks_left)
    gate = fallback_gate(proposal, candidates)
    if not gate.passed or (proposal.use_fallback and fallbacks_left <= 0):
        proposal = ctx.rules.fallback(name, point, candidates, n_in_range, fallbacks_left)
    _record_decision(
        ctx,
        step_id,
        "fallback",
        spectrum=name,
        point_pb=point,
        chosen=proposal.use_fallback,
        options={"n_in_range": n_in_range, "fallbacks_left": fallbacks_left},
        rationale=proposal.rationale,
        gate=gate.reason,
    )
    return proposal


def scan_fallback_settings(config: ScanConfig) -> dict[str, Any]:
    """Symbolic-fallback settings of a scan (a `FallbackSettings`)."""
    return {"time_budget_s": config.fallback_time_s, "n_seeds": 2}


def _fallback_settings(ctx: ScanContext) -> dict[str, Any]:
    return scan_fallback_settings(ctx.config)


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
    step_id: str,
    name: str,
    point: float,
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
        f"{step_id}:{name}:{function}",
        step_id=step_id,
        spectrum=name,
        point_pb=point,
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


def _search_calls(
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
                _spectrum_seed(ctx.config.seed, index, name),
            ),
        )
        for name in names
    ]


def _choose_masked(
    ctx: ScanContext,
    step_id: str,
    point: float,
    index: int,
    edges: np.ndarray,
    counts: np.ndarray,
    backgrounds: dict[str, dict[str, Any]],
) -> None:
    """Rule step 2 (core.spectrum) for spectra whose every unmasked fit failed its checks.

    The hunt against the provisional (the F-test's rejected) function, `search_spectrum`
    as the library's `flagged_window` runs it, flags a window when its global p is below
    EXCLUSION_TRIGGER_P; the window exclusion's signal-width mask is then left out of every
    fit of `choose_background`, and a function that passes every check is accepted through
    the policy and the gates, to be searched with that mask. Both fits and the decision are
    decision rows (`provisional`, `background_masked`).
    """
    from core.exclusion import EXCLUSION_TRIGGER_P

    provisional = [
        n for n in SPECTRUM_NAMES if backgrounds.get(n, {}).get("status") == "provisional"
    ]
    if not provisional:
        return
    ctx.progress.update(stage=f"flagged windows ({len(provisional)} spectra)")
    probes = ctx.call_tools(
        step_id,
        "search_spectrum",
        _search_calls(ctx, edges, counts, backgrounds, index, provisional),
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
            entry["rescue"] = (
                f"no window to mask: global p {bump['global_p']:.3g} >= {EXCLUSION_TRIGGER_P} "
                f"against the provisional {entry['name']}"
            )
            continue
        window = [float(v) for v in exclusion["window_gev"]]
        entry["window"] = window
        _record_decision(
            ctx,
            step_id,
            "provisional",
            spectrum=name,
            point_pb=point,
            chosen={"mask_gev": window},
            policy="rules",
            rationale=(
                f"no function passed its checks; against the F-test's {entry['name']} (fit p "
                f"{entry['fit_p_value']:.3g}, failed {', '.join(entry['failed_checks'])}; kept "
                f"only to find a window) the best window {bump['window'][0]:.0f}-"
                f"{bump['window'][1]:.0f} GeV has global p {bump['global_p']:.3g} < "
                f"{EXCLUSION_TRIGGER_P}: masked and the background chosen again"
            ),
            numbers={
                "unmasked_function": entry["name"],
                "unmasked_fit_p_value": entry["fit_p_value"],
                "unmasked_failed_checks": entry["failed_checks"],
                "trigger_global_p": bump["global_p"],
                "window_gev": window,
            },
        )
        masked_calls.append((name, _choice_input(ctx, edges, counts, index, name, window)))
    if not masked_calls:
        return
    ctx.progress.update(stage=f"masked choice ({len(masked_calls)} spectra)")
    for (name, _), result in zip(
        masked_calls, ctx.call_tools(step_id, "choose_background", masked_calls), strict=True
    ):
        entry = backgrounds[name]
        low, high = entry["window"]
        if result.output is None or not result.output["candidates"]:
            entry["rescue"] = f"the fits with {low:.0f}-{high:.0f} GeV masked failed"
            continue
        proposal = _accept(
            ctx, step_id, name, point, _candidates(result.output), kind="background_masked"
        )
        if proposal.function is None:
            entry["rescue"] = f"no function passed every check with {low:.0f}-{high:.0f} GeV masked"
            continue
        accepted = _accepted(
            ctx,
            step_id,
            name,
            point,
            result.output,
            proposal.function,
            "masked",
            [low, high],
        )
        accepted["unmasked"] = {key: entry[key] for key in ("name", "fit_p_value", "failed_checks")}
        backgrounds[name] = accepted


def _choose_backgrounds(ctx: ScanContext) -> NodeBody:
    """The background of every spectrum by the rule of core.spectrum (steps 1-3).

    1. `choose_background` unmasked, accepted through the policy and the gates; 2. where
    none passed, the masked choice (`_choose_masked`); 3. where still none passed, the
    symbolic fallback when the policy asks for it (the rules: `core.spectrum.
    fallback_applies`) and the scan's budget allows (at most `fallback_budget` per scan).
    """

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        current = dict(state["current"] or {})
        point = float(current["point_pb"])
        index = int(current["index"])
        with np.load(ctx.at(current["spectra_file"])) as data:
            edges, counts = data["edges"], data["counts"]
        names = [n for n in SPECTRUM_NAMES if n not in current["skipped"]]
        calls = [(name, _choice_input(ctx, edges, counts, index, name)) for name in names]
        results = ctx.call_tools(step_id, "choose_background", calls)
        backgrounds: dict[str, dict[str, Any]] = {}
        unmasked: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for (name, payload), result in zip(calls, results, strict=True):
            if result.output is None or not result.output["candidates"]:
                why = result.error if result.output is None else "no function could be fitted"
                failures = "" if result.output is None else f" {result.output['failures']}"
                backgrounds[name] = {"status": "no background", "reason": f"fit failed: {why}"}
                _record_decision(
                    ctx,
                    step_id,
                    "background",
                    spectrum=name,
                    point_pb=point,
                    chosen=None,
                    policy="rules",
                    rationale=f"every fit failed: {why}{failures}",
                    gate="no candidate",
                )
                continue
            proposal = _accept(ctx, step_id, name, point, _candidates(result.output))
            if proposal.function is not None:
                backgrounds[name] = _accepted(
                    ctx, step_id, name, point, result.output, proposal.function, "unmasked"
                )
                continue
            backgrounds[name] = _provisional(result.output, proposal.rationale)
            unmasked[name] = (payload, result.output)
        _choose_masked(ctx, step_id, point, index, edges, counts, backgrounds)
        fallback_calls = []
        fallbacks_used = int(state.get("fallbacks_used", 0))
        for name, (payload, output) in unmasked.items():
            if backgrounds[name]["status"] == "accepted":
                continue
            values = counts[SPECTRUM_NAMES.index(name)]
            stream = name.split("/", maxsplit=1)[0]
            n_in_range = int(values[edges[:-1] >= STREAM_FIT_FROM_GEV[stream]].sum())
            decision = _fallback(
                ctx,
                step_id,
                name,
                point,
                _candidates(output),
                n_in_range,
                ctx.config.fallback_budget - fallbacks_used,
            )
            if decision.use_fallback:
                fallbacks_used += 1
                fallback_calls.append(
                    (
                        name,
                        payload
                        | {"use_fallback": True, "fallback_search": _fallback_settings(ctx)},
                    )
                )
        if fallback_calls:
            ctx.progress.update(stage=f"symbolic fallback ({len(fallback_calls)} spectra)")
            for (name, _), result in zip(
                fallback_calls,
                ctx.call_tools(step_id, "choose_background", fallback_calls),
                strict=True,
            ):
                if result.output is None:
                    backgrounds[name]["rescue"] = (
                        backgrounds[name].get("rescue", "no window to mask")
                        + f"; the fallback failed: {result.error}"
                    )
                    continue
                proposal = _accept(
                    ctx,
                    step_id,
                    name,
                    point,
                    _candidates(result.output),
                    kind="background_fallback",
                )
                if proposal.function is not None:
                    backgrounds[name] = _accepted(
                        ctx, step_id, name, point, result.output, proposal.function, "fallback"
                    )
                else:
                    backgrounds[name]["rescue"] = (
                        backgrounds[name].get("rescue", "no window to mask")
                        + "; the symbolic fallback did not pass either"
                    )
        for entry in backgrounds.values():
            if entry["status"] == "provisional":
                entry["status"] = "no background"
                entry["reason"] += "; " + entry.pop("rescue", "no window to mask")
        path = ctx.run_dir / "points" / f"point-{index:03d}-backgrounds.json"
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps({"point_pb": point, "backgrounds": backgrounds}))
        current["backgrounds_file"] = ctx.relative(path)
        current["backgrounds_sha256"] = ctx.artifact(path, "backgrounds")
        ctx.progress.update(spectra_done=ctx.progress.spectra_done + len(names))
        return {
            "stage": f"backgrounds at {point_text(point)} pb",
            "current": current,
            "fallbacks_used": fallbacks_used,
        }

    return body


# ---------------------------------------------------------------- bump hunt


def _used_background(entry: dict[str, Any], out: dict[str, Any]) -> tuple[bool, str]:
    """Whether the background the hunt used is the one that passed its checks, and why not.

    The hunt must use the accepted function with the mask it was chosen with; a background
    that passed unmasked may be replaced by its masked refit only through the window
    exclusion's agreement test (`mask_from` "exclusion").
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
    if chosen_mask is None and out.get("mask_from") == "choice":
        return False, f"the hunt masked {used_mask} though {entry['name']} was chosen unmasked"
    return True, ""


def _hunt_bumps(ctx: ScanContext) -> NodeBody:
    """`search_spectrum` against every accepted background (rule step 4 of core.spectrum).

    A background chosen with a mask is searched with it (no second exclusion); one chosen
    unmasked goes through the window exclusion. Each spectrum's row in the point's results
    file records the background the hunt used: function, final fit p, its checks, mask.
    """

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        current = dict(state["current"] or {})
        point = float(current["point_pb"])
        index = int(current["index"])
        with np.load(ctx.at(current["spectra_file"])) as data:
            edges, counts = data["edges"], data["counts"]
        backgrounds = json.loads(ctx.at(current["backgrounds_file"]).read_text())["backgrounds"]
        accepted = [n for n in SPECTRUM_NAMES if backgrounds.get(n, {}).get("status") == "accepted"]
        calls = _search_calls(ctx, edges, counts, backgrounds, index, accepted)
        searches = {r.label: r for r in ctx.call_tools(step_id, "search_spectrum", calls)}
        spectra: list[dict[str, Any]] = []
        background_rows = np.zeros_like(counts)
        background_error_rows = np.zeros_like(counts)
        outcomes: dict[str, dict[str, Any]] = {}

        def whole(name: str) -> bool:
            return bool(current.get("whole_stream", {}).get(name.split("/", maxsplit=1)[0]))

        def no_background(name: str, reason: str) -> None:
            outcomes[name] = {
                "status": "no background",
                "local_z": None,
                "whole_stream": whole(name),
            }
            spectra.append({"spectrum": name, "status": "no background", "reason": reason})

        for k, name in enumerate(SPECTRUM_NAMES):
            if name in current["skipped"]:
                outcomes[name] = {"status": "skipped", "local_z": None, "whole_stream": whole(name)}
                spectra.append(
                    {"spectrum": name, "status": "skipped", "reason": current["skipped"][name]}
                )
                continue
            entry = backgrounds.get(name, {"status": "no background", "reason": "not fitted"})
            search = searches.get(name)
            if entry["status"] != "accepted":
                no_background(name, entry.get("reason") or "no accepted background")
                continue
            if search is None or search.output is None:
                no_background(name, f"bump hunt failed: {search.error if search else ''}")
                continue
            out = search.output
            passed, why = _used_background(entry, out)
            if not passed:
                no_background(name, f"no accepted background: {why}")
                continue
            exclusion = out["window_exclusion"]
            if exclusion is not None:
                _record_decision(
                    ctx,
                    step_id,
                    "window_exclusion",
                    spectrum=name,
                    point_pb=point,
                    chosen="masked background" if exclusion["accepted"] else "unmasked kept",
                    policy="rules",
                    rationale=exclusion["reason"],
                    numbers={
                        key: exclusion[key]
                        for key in (
                            "trigger_global_p",
                            "window_gev",
                            "background_unmasked",
                            "background_masked",
                            "agreement_sigma",
                            "unmasked_p_value",
                            "masked_p_value",
                        )
                    },
                )
            if out["mask_from"] == "choice":
                unmasked = entry.get("unmasked", {})
                _record_decision(
                    ctx,
                    step_id,
                    "masked_background",
                    spectrum=name,
                    point_pb=point,
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
            first, stop = out["first_bin"], out["stop_bin"]
            background_rows[k, first:stop] = out["background"]
            background_error_rows[k, first:stop] = out["background_error"]
            bump = out["bump"]
            outcomes[name] = {
                "status": "excess",
                "local_z": bump["local_z"],
                "whole_stream": whole(name),
            }
            spectra.append(
                {
                    "spectrum": name,
                    "status": "excess",
                    "function": entry["name"],
                    "bins": [first, stop],
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
                    "hunt": {
                        key: bump[key]
                        for key in ("width_min", "width_max", "min_window_background")
                    },
                    "masked_window_gev": out["masked_window_gev"],
                    "mask_from": out["mask_from"],
                }
            )
            ctx.audit.add(
                "bumps",
                f"{step_id}:{name}",
                step_id=step_id,
                spectrum=name,
                point_pb=point,
                window_lo=bump["window"][0],
                window_hi=bump["window"][1],
                data=bump["data"],
                background=bump["background"],
                local_p=bump["local_p"],
                local_z=bump["local_z"],
                global_p=bump["global_p"],
                global_z=bump["global_z"],
            )
        folder = ctx.run_dir / "points"
        arrays = folder / f"point-{index:03d}.npz"
        temporary = arrays.with_name(f".{arrays.stem}.partial.npz")
        np.savez(
            temporary,
            edges=edges,
            counts=counts,
            background=background_rows,
            background_error=background_error_rows,
        )
        temporary.replace(arrays)
        results_path = folder / f"point-{index:03d}.json"
        write_atomic(
            results_path,
            json.dumps({"point_pb": point, "arrays": arrays.name, "spectra": spectra}),
        )
        ctx.artifact(arrays, "point arrays")
        record: PointRecord = {
            "index": index,
            "point_pb": point,
            "spectra_file": current["spectra_file"],
            "spectra_sha256": current["spectra_sha256"],
            "results_file": ctx.relative(results_path),
            "results_sha256": ctx.artifact(results_path, "point results"),
            "outcomes": outcomes,
        }
        ctx.progress.update(points_done=index + 1, spectra_done=ctx.progress.spectra_total)
        return {
            "stage": f"bumps at {point_text(point)} pb",
            "points": [*state["points"], record],
            "current": None,
        }

    return body


# ---------------------------------------------------------------- assess and refine


def _running_minutes(ctx: ScanContext) -> float:
    """Minutes the scan's processes have spent in graph nodes: the sum of the `steps` rows.

    Not the wall time since the start: a scan stopped (killed, or failed on a full disk)
    and resumed later does not count the time it was stopped against --budget-minutes. The
    part of a killed node that ran before the kill is not counted either.
    """
    rows = ctx.audit.db.query("select coalesce(sum(seconds), 0) as total from steps")
    return float(next(iter(rows))["total"]) / 60.0


def _assess(ctx: ScanContext) -> NodeBody:
    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        config = ctx.config
        pending = list(state["pending_pb"])
        scanned = [p["point_pb"] for p in state["points"]]
        elapsed_min = _running_minutes(ctx)
        if config.budget_minutes is not None and elapsed_min > config.budget_minutes:
            _record_decision(
                ctx,
                step_id,
                "stop",
                chosen="stop",
                policy="gates",
                rationale=(
                    f"time budget {config.budget_minutes:g} min spent ({elapsed_min:.1f} min); "
                    f"{len(pending)} planned point(s) not scanned: {pending}"
                ),
            )
            return {"stage": "stopped: time budget", "pending_pb": [], "stop_reason": "time budget"}
        if pending:
            return {"stage": f"{len(pending)} point(s) pending"}
        remaining = config.point_budget() - len(scanned)
        outcomes = [
            PointOutcome(
                point_pb=p["point_pb"],
                spectra={n: SpectrumOutcome.model_validate(o) for n, o in p["outcomes"].items()},
            )
            for p in state["points"]
        ]
        proposal: PointsProposal = ctx.policy.next_points(outcomes, config.xsec_range, remaining)
        accepted, refused = points_gate(proposal, scanned, config.xsec_range, remaining)
        gate = "passed" if not refused else "refused: " + "; ".join(refused)
        _record_decision(
            ctx,
            step_id,
            "refine",
            chosen=accepted,
            options={"scanned_pb": scanned, "remaining": remaining},
            rationale=proposal.rationale,
            gate=gate,
        )
        rounds = int(state.get("refinement_rounds", 0))
        if not accepted:
            return {"stage": "sweep complete", "stop_reason": proposal.rationale}
        return {
            "stage": f"refining: {accepted}",
            "pending_pb": accepted,
            "refinement_rounds": rounds + 1,
        }

    return body


def _after_assess(state: ScanState) -> str:
    return "build_spectra" if state.get("pending_pb") else "look_elsewhere"


# ---------------------------------------------------------------- look-elsewhere and summary


def _look_elsewhere(ctx: ScanContext) -> NodeBody:
    """`scan_significance` over every accepted (spectrum, AR point).

    Each point enters with its own fit range and window set (those of its bump hunt), from
    one NPZ of points in RUN/lee.
    """

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        ctx.progress.update(
            stage=f"look-elsewhere over {len(state['points'])} AR points (pseudo-scans)",
            point="",
            spectra_total=0,
            points_done=len(state["points"]),
            points_planned=len(state["points"]),
        )
        arrays: dict[str, Any] = {}
        names: list[str] = []
        rows: dict[str, list[float]] = {
            "cross_section_pb": [],
            "first_bin": [],
            "width_min": [],
            "width_max": [],
            "min_window_background": [],
        }
        for record in state["points"]:
            results = json.loads(ctx.at(record["results_file"]).read_text())
            with np.load(ctx.at(record["results_file"]).with_name(results["arrays"])) as data:
                edges, counts, background = data["edges"], data["counts"], data["background"]
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
                arrays[f"edges_{i}"] = edges[first : stop + 1]
                arrays[f"counts_{i}"] = counts[k, first:stop]
                arrays[f"background_{i}"] = background[k, first:stop]
        if not names:
            _record_decision(
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
        path = folder / "points.npz"
        temporary = path.with_name(".points.partial.npz")
        np.savez(
            temporary,
            spectrum=np.array(names),
            cross_section_pb=np.array(rows["cross_section_pb"], dtype=float),
            first_bin=np.array(rows["first_bin"], dtype=np.int64),
            width_min=np.array(rows["width_min"], dtype=np.int64),
            width_max=np.array(rows["width_max"], dtype=np.int64),
            min_window_background=np.array(rows["min_window_background"], dtype=float),
            **arrays,
        )
        temporary.replace(path)
        ctx.artifact(path, "look-elsewhere input")
        inputs = sorted(set(names))
        (result,) = ctx.call_tools(
            step_id,
            "scan_significance",
            [
                (
                    "scan",
                    {
                        "points_path": str(path.relative_to(ctx.run_dir)),
                        "seed": ctx.config.seed,
                        "n_pseudo_scans": ctx.config.n_pseudo_scans,
                        "max_pseudo_scans": ctx.config.max_pseudo_scans,
                        "top": 20,
                        # spectra's pseudo-scans in parallel; the result does not depend on it
                        "workers": 1 if ctx.config.executor == "serial" else os.cpu_count() or 1,
                    },
                )
            ],
        )
        if result.output is None:
            raise AnomscanError(f"the scan-wide look-elsewhere failed: {result.error}")
        out = result.output
        lee = {
            key: out[key]
            for key in (
                "local_p",
                "local_z",
                "global_p",
                "global_z",
                "global_z_is_lower_limit",
                "effective_trials",
                "n_tests",
                "n_pseudo_scans",
                "method",
            )
        }
        lee["best"] = {
            "spectrum": out["best"]["spectrum"],
            "cross_section_pb": out["best"]["cross_section_pb"],
            "window": out["best"]["window"],
            "local_z": out["best"]["local_z"],
        }
        _record_decision(
            ctx,
            step_id,
            "look_elsewhere",
            chosen=lee["best"],
            policy="rules",
            rationale=(
                f"largest excess {lee['best']['spectrum']} at {lee['best']['cross_section_pb']:g} "
                f"pb: local Z {out['local_z']:.2f}, scan-global Z {out['global_z']:.2f}"
                f"{' (lower limit)' if out['global_z_is_lower_limit'] else ''} from "
                f"{out['n_pseudo_scans']} pseudo-scans over {len(inputs)} spectra"
            ),
            numbers={"global_p": out["global_p"], "n_tests": out["n_tests"]},
        )
        return {"stage": "look-elsewhere done", "lee": lee}

    return body


def _same_excess(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["window_gev"] == b["window_gev"]
        and a["data"] == b["data"]
        and a["function"] == b["function"]
        and math.isclose(a["background"], b["background"], rel_tol=1e-9)
    )


def _merge_whole_stream_repeats(excesses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per repeated whole-stream result, as the scan-wide test counts it.

    At every AR point whose region is a spectrum's whole stream the spectrum holds the
    same events, so the fit and the bump are the same: the loosest such point is listed
    and the tighter ones that repeat it go to its `repeated_at_pb` (every point stays in
    `points_pb`). The loosest is the one core.lookelsewhere keeps, so `scan_global_z`
    sits on the listed row.
    """
    kept: list[dict[str, Any]] = []
    for excess in sorted(excesses, key=lambda e: (e["spectrum"], -e["xsec_pb"])):
        twin = next(
            (
                k
                for k in kept
                if excess["whole_stream"]
                and k["whole_stream"]
                and k["spectrum"] == excess["spectrum"]
                and _same_excess(k, excess)
            ),
            None,
        )
        if twin is None:
            kept.append(excess)
        else:
            twin["repeated_at_pb"].append(excess["xsec_pb"])
    return kept


def collect_results(state: ScanState, at: Callable[[str], Path]) -> dict[str, Any]:
    """results.json from the state and the per-point files (never from truth.json).

    `at` finds a path recorded in the state in the run folder as it is now. Each excess
    carries what its point's file recorded of the background the hunt used (function, final
    fit p, checks, GOF p, mask); an "excess" whose recorded checks did not pass is listed as
    skipped, never ranked.
    """
    lee = state.get("lee")
    excesses = []
    skipped = []
    for record in state["points"]:
        results = json.loads(at(record["results_file"]).read_text())
        for spectrum in results["spectra"]:
            if spectrum["status"] != "excess" or spectrum.get("checks_passed") is not True:
                skipped.append(
                    {
                        "spectrum": spectrum["spectrum"],
                        "point_pb": record["point_pb"],
                        "reason": spectrum["reason"]
                        if spectrum["status"] != "excess"
                        else "no accepted background: the background the hunt used did not "
                        "pass its checks",
                    }
                )
                continue
            is_best = (
                lee is not None
                and lee["best"]["spectrum"] == spectrum["spectrum"]
                and math.isclose(lee["best"]["cross_section_pb"], record["point_pb"], rel_tol=1e-9)
            )
            excesses.append(
                {
                    "spectrum": spectrum["spectrum"],
                    "xsec_pb": record["point_pb"],
                    "window_gev": spectrum["window_gev"],
                    "data": spectrum["data"],
                    "background": spectrum["background"],
                    "local_p": spectrum["local_p"],
                    "local_z": spectrum["local_z"],
                    "global_z": spectrum["global_z"],
                    "global_z_is_lower_limit": spectrum["global_z_is_lower_limit"],
                    "scan_global_z": lee["global_z"] if is_best and lee else None,
                    "function": spectrum["function"],
                    "checks_passed": spectrum["checks_passed"],
                    "fit_p_value": spectrum["fit_p_value"],
                    "checks": spectrum.get("checks"),
                    "gof_p_value": spectrum.get("gof_p_value"),
                    "background_choice": spectrum.get("background_choice"),
                    "masked_window_gev": spectrum["masked_window_gev"],
                    "mask_from": spectrum.get("mask_from"),
                    "whole_stream": bool(
                        record["outcomes"].get(spectrum["spectrum"], {}).get("whole_stream")
                    ),
                    "repeated_at_pb": [],
                }
            )
    excesses = _merge_whole_stream_repeats(excesses)
    excesses.sort(key=lambda e: (-e["local_z"], e["spectrum"], -e["xsec_pb"]))
    return {
        "run_id": state["run_id"],
        "luminosity_pb": state["lumi_pb"],
        "points_pb": [p["point_pb"] for p in state["points"]],
        "scan_global_p": None if lee is None else lee["global_p"],
        "scan_global_z": None if lee is None else lee["global_z"],
        "scan_global_z_is_lower_limit": None if lee is None else lee["global_z_is_lower_limit"],
        "look_elsewhere": lee,
        "stop_reason": state.get("stop_reason", ""),
        "model_sha256": state.get("model_sha256"),
        "table_sha256": state.get("table_sha256"),
        "n_events": state.get("n_events"),
        "input_notes": state.get("input_notes", []),
        "excesses": excesses,
        "skipped": skipped,
    }


def _summarise(ctx: ScanContext) -> NodeBody:
    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        results = collect_results(state, ctx.at)
        json_path, csv_path = write_results(ctx.run_dir, results)
        ctx.artifact(json_path, "results")
        ctx.artifact(csv_path, "results")
        top = results["excesses"][0] if results["excesses"] else None
        _record_decision(
            ctx,
            step_id,
            "summary",
            chosen=None
            if top is None
            else {
                "spectrum": top["spectrum"],
                "xsec_pb": top["xsec_pb"],
                "local_z": top["local_z"],
            },
            policy="rules",
            rationale=(
                f"{len(results['points_pb'])} AR points, {len(results['excesses'])} excesses, "
                f"{len(results['skipped'])} skipped; scan-global Z {results['scan_global_z']}"
            ),
        )
        return {"stage": "done", "results_file": str(json_path)}

    return body


def _limits(ctx: ScanContext) -> NodeBody:
    """95 % CL limits on Gaussian signals of every accepted spectrum (agent.scan.limits)."""

    def body(state: ScanState, step_id: str) -> dict[str, Any]:
        from agent.scan.limits import accepted_spectra, set_run_limits

        try:
            accepted_spectra(ctx.run_dir)
        except InvalidInputError as error:
            _record_decision(
                ctx, step_id, "limits", chosen=None, policy="rules", rationale=str(error)
            )
            return {"stage": "no limits: no accepted background"}
        outcome = set_run_limits(ctx, step_id, lumi_pb=float(state["lumi_pb"]))
        return {"stage": f"{outcome.n_limits} limits", "limits_file": str(outcome.json_path)}

    return body


# ---------------------------------------------------------------- the graph


def build_graph(ctx: ScanContext) -> StateGraph[ScanState]:
    """The scan's StateGraph (not compiled)."""
    graph: StateGraph[ScanState] = StateGraph(ScanState)
    nodes = {
        "prepare": _prepare(ctx),
        "plan": _plan(ctx),
        "build_spectra": _build_spectra(ctx),
        "choose_backgrounds": _choose_backgrounds(ctx),
        "hunt_bumps": _hunt_bumps(ctx),
        "assess": _assess(ctx),
        "look_elsewhere": _look_elsewhere(ctx),
        "summarise": _summarise(ctx),
    }
    if ctx.config.limits:
        nodes["limits"] = _limits(ctx)
    for name, body in nodes.items():
        graph.add_node(name, _node(ctx, name, body))  # type: ignore[call-overload]
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "plan")
    graph.add_edge("plan", "build_spectra")
    graph.add_edge("build_spectra", "choose_backgrounds")
    graph.add_edge("choose_backgrounds", "hunt_bumps")
    graph.add_edge("hunt_bumps", "assess")
    graph.add_conditional_edges("assess", _after_assess, ["build_spectra", "look_elsewhere"])
    graph.add_edge("look_elsewhere", "summarise")
    if ctx.config.limits:
        graph.add_edge("summarise", "limits")
        graph.add_edge("limits", END)
    else:
        graph.add_edge("summarise", END)
    return graph


def recursion_limit(point_budget: int) -> int:
    """Supersteps the scan may take: 4 per AR point plus the fixed nodes, with margin."""
    return 4 * point_budget + 20
