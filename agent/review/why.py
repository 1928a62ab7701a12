"""`anomscan audit RUN --why SPECTRUM POINT`: one spectrum's story, from the log alone.

`spectrum_story` gathers everything the run folder holds about one spectrum at one AR point
in the order it happened (its input, decisions with the functions tried and their checks,
fits, searches, bump, result); `why_text` writes it for the terminal, and the spectrum
pages of the report show it too. `number_text` is how the review writes a logged number.
"""

from __future__ import annotations

from typing import Any

from agent.review.run import RunRecord, same_value
from core.anomaly import point_text
from core.errors import InvalidInputError
from core.masses import SPECTRUM_NAMES

BACKGROUND_KINDS = ("background", "background_fallback", "background_masked")
"""The decision kinds that choose a spectrum's background (with candidates and tests)."""


def check_spectrum(spectrum: str) -> None:
    """InvalidInputError unless `spectrum` is one of the 63 STREAM/PAIR names."""
    if spectrum not in SPECTRUM_NAMES:
        raise InvalidInputError(
            f"spectrum {spectrum!r}: expected STREAM/PAIR such as T2/jm ({SPECTRUM_NAMES[0]} .. "
            f"{SPECTRUM_NAMES[-1]})"
        )


def _story_decisions(run: RunRecord, spectrum: str, point_pb: float) -> list[dict[str, Any]]:
    """The spectrum's decisions at the point; background ones with their tool call's output."""
    decisions = []
    for row in run.decisions:
        if row["spectrum"] != spectrum or not same_value(row["point_pb"], point_pb):
            continue
        entry = dict(row)
        if row["kind"] in BACKGROUND_KINDS:
            key = f"{row['step_id']}:choose_background:{spectrum}"
            call = run.tool_call(key)
            output = call["output"] if call and isinstance(call["output"], dict) else {}
            entry["candidates"] = row["options"] if isinstance(row["options"], list) else []
            entry["tests"] = output.get("tests", [])
            entry["fallback"] = output.get("fallback")
            entry["tool_call_seq"] = None if call is None else call["seq"]
            entry["tool_chosen"] = output.get("chosen")
            entry["tool_candidates"] = output.get("candidates") or []
        entry["annotations"] = run.annotations_of(int(row["seq"]))
        decisions.append(entry)
    return decisions


def spectrum_story(run: RunRecord, spectrum: str, index: int) -> dict[str, Any]:
    """Everything the log holds about one spectrum at one AR point, in the order it happened.

    Keys: spectrum, point_pb, index, status, reason, result (points/point-NNN.json entry),
    decisions (rows, background ones with `candidates`, `tests`, `fallback` and the tool
    call key), fits (fits rows of this point), bump (bumps row), excess (results.json row).
    """
    check_spectrum(spectrum)
    point = run.points[index]
    point_pb = point["point_pb"]
    summary = point["summary"] or {"spectra": []}
    result = next((s for s in summary["spectra"] if s["spectrum"] == spectrum), None)
    decisions = _story_decisions(run, spectrum, point_pb)
    searches = [
        call
        for call in run.tool_calls
        if call["tool"] == "search_spectrum"
        and call["key"].endswith(f":search_spectrum:{spectrum}")
        and any(
            same_value(step["point_pb"], point_pb) and step["step_id"] == call["step_id"]
            for step in run.steps
        )
    ]
    step_ids = {
        step["step_id"]
        for step in run.steps
        if same_value(step["point_pb"], point_pb) and step["node"] == "choose_backgrounds"
    }
    fits = [f for f in run.fits if f["spectrum"] == spectrum and f["step_id"] in step_ids]
    bump = next(
        (b for b in run.bumps if b["spectrum"] == spectrum and same_value(b["point_pb"], point_pb)),
        None,
    )
    excess = next(
        (
            e
            for e in run.results["excesses"]
            if e["spectrum"] == spectrum
            and any(same_value(p, point_pb) for p in [e["xsec_pb"], *e.get("repeated_at_pb", [])])
        ),
        None,
    )
    spectra_file = f"spectra/point-{index:03d}.npz"
    artifact = next((a for a in run.artifacts if a["path"] == spectra_file), None)
    k = SPECTRUM_NAMES.index(spectrum)
    inputs = {
        "spectra_file": spectra_file,
        "sha256": None if artifact is None else artifact["sha256"],
        "n_events": None if "counts" not in point else float(point["counts"][k].sum()),
    }
    return {
        "inputs": inputs,
        "spectrum": spectrum,
        "index": index,
        "point_pb": point_pb,
        "status": None if result is None else result["status"],
        "reason": None if result is None else result.get("reason"),
        "result": result,
        "decisions": decisions,
        "fits": fits,
        "bump": bump,
        "excess": excess,
        "searches": searches,
    }


def number_text(value: Any, digits: int = 4) -> str:
    """A logged number as the review writes it: `digits` significant digits, yes/no, - for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _check_text(check: dict[str, Any]) -> str:
    """One robustness check: name, verdict (FAIL in capitals) and its numbers."""
    numbers = ", ".join(
        f"{k} {number_text(v)}" for k, v in sorted(check.get("numbers", {}).items())
    )
    verdict = check.get("status") or ("pass" if check.get("passed") else "fail")
    verdict = "FAIL" if verdict == "fail" else verdict
    return f"{check['name']}: {verdict} ({numbers})"


def _deciding_gof(checks: list[dict[str, Any]]) -> str:
    """The goodness-of-fit p that decided the check (toys where bins are sparse)."""
    gof = next((c for c in checks if c.get("name") == "goodness_of_fit"), None)
    if gof is None:
        return ""
    numbers = gof.get("numbers", {})
    toys = numbers.get("n_toys")
    source = f"{number_text(toys)} toys" if toys else "asymptotic"
    return f"; goodness-of-fit p {number_text(numbers.get('p_value'))} ({source}) decides"


def _background_lines(row: dict[str, Any]) -> list[str]:
    """A background decision: the functions tried, the tests, each candidate's checks."""
    tried = list(
        dict.fromkeys(
            [name for t in row["tests"] for name in (t["lower"], t["higher"])]
            + [c["function"] for c in row["candidates"]]
        )
    )
    lines = [f"  functions tried: {', '.join(tried) if tried else 'none'}"]
    for test in row["tests"]:
        lines.append(
            f"  {test.get('method', 'test')} {test['lower']} vs {test['higher']}: "
            f"statistic {number_text(test.get('test_statistic'))}, p "
            f"{number_text(test.get('p_value'))}, significant "
            f"{number_text(test.get('significant'))}"
        )
    fits_by_function = {c["function"]: c for c in row["tool_candidates"]}
    for candidate in row["candidates"]:
        verdict = "passed" if candidate["passed"] else "failed"
        fit = fits_by_function.get(candidate["function"])
        quality = (
            ""
            if fit is None
            else f", deviance {number_text(fit['deviance'])} / ndf {fit['ndf']}, asymptotic "
            f"p {number_text(fit['p_value'])}"
        )
        quality += _deciding_gof(candidate["checks"])
        lines.append(f"  {candidate['function']} ({candidate['source']}): {verdict}{quality}")
        lines.extend(f"    {_check_text(check)}" for check in candidate["checks"])
    if row.get("fallback"):
        fallback = row["fallback"]
        lines.append(f"  symbolic fallback: {fallback.get('expression', fallback)}")
    lines.append(f"  chosen function: {row['chosen']}")
    return lines


def _decision_lines(row: dict[str, Any]) -> list[str]:
    """One decision: who chose what and why, the gate, and its annotations."""
    lines = [
        f"[decision seq {row['seq']}, {row['step_id']}, {row['kind']}, policy "
        f"{row['policy']}] chosen: {row['chosen']}"
    ]
    if row.get("rationale"):
        lines.append(f"  why: {row['rationale']}")
    if row.get("gate"):
        lines.append(f"  gate: {row['gate']}")
    if row["kind"] in BACKGROUND_KINDS:
        lines.extend(_background_lines(row))
    lines.extend(
        f"  annotation by {a['by']}: {a['verdict']} - {a['note']}" for a in row["annotations"]
    )
    return lines


def _search_line(call: dict[str, Any]) -> str:
    """One `search_spectrum` call: function, fit p, window exclusion, mask."""
    output = call["output"] if isinstance(call["output"], dict) else {}
    exclusion = output.get("window_exclusion")
    return (
        f"search_spectrum (tool call seq {call['seq']}): {output.get('function')} fit p "
        f"{number_text(output.get('p_value'))}"
        + (
            ""
            if not exclusion
            else f"; window exclusion {exclusion.get('window_gev')} GeV, masked refit agrees "
            f"{number_text(exclusion.get('agrees', exclusion.get('accepted')))}"
        )
        + (
            ""
            if not output.get("masked_window_gev")
            else f"; fitted with {output['masked_window_gev']} GeV masked (mask from "
            f"{output.get('mask_from')})"
        )
    )


def why_text(story: dict[str, Any]) -> str:
    """The `anomscan audit RUN --why SPECTRUM POINT` explanation, from the log alone."""
    lines = [
        f"{story['spectrum']} at AR point {point_text(story['point_pb'])} pb (#{story['index']})"
    ]
    inputs = story["inputs"]
    lines.append(
        f"input: {inputs['spectra_file']} (sha256 {inputs['sha256'] or 'not logged'}), "
        f"{number_text(inputs['n_events'])} events in the spectrum"
    )
    lines.append(
        f"status: {story['status']}" + (f" ({story['reason']})" if story["reason"] else "")
    )
    for row in story["decisions"]:
        lines.extend(_decision_lines(row))
    for fit in story["fits"]:
        lines.append(
            f"fit: {fit['function']} chi2 {number_text(fit['chi2'])} / ndf {fit['ndf']}, p "
            f"{number_text(fit['p_value'])}, range {fit['fit_range']} GeV, passed "
            f"{number_text(bool(fit['passed']))}"
        )
    lines.extend(_search_line(call) for call in story["searches"])
    bump = story["bump"]
    if bump is not None:
        lines.append(
            f"bump: window {bump['window_lo']:.1f}-{bump['window_hi']:.1f} GeV, data "
            f"{number_text(bump['data'])}, background {number_text(bump['background'])}, local p "
            f"{number_text(bump['local_p'])} (Z {number_text(bump['local_z'])}), spectrum-global "
            f"Z {number_text(bump['global_z'])}"
        )
    excess = story["excess"]
    if excess is not None:
        lines.append(
            f"result: local Z {number_text(excess['local_z'])}, spectrum-global Z "
            f"{number_text(excess['global_z'])}"
            + ("" if not excess["global_z_is_lower_limit"] else " (lower limit)")
            + f", scan-global Z {number_text(excess['scan_global_z'])}"
        )
    return "\n".join(lines)
