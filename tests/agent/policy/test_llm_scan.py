"""`anomscan scan --policy llm` end to end against the scripted chat server.

Four tiny scans of the built-in sample with the same seed: `rules`; a scripted model that
decides sensibly (same top excess as rules); a scripted model that proposes only invalid
decisions (every one refused, the rules decide, the results equal rules', every refusal and
fallback in the audit); an endpoint that never answers with a usable completion (every failure
of `endpoint_failures`, garbage tool calls between them: the scan ends, as rules, saying why).
The invalid run uses a recognisable fake API key: it must not appear in any file of the run
folder nor in the captured output.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.anomaly import log_uniform_xsec_grid
from tests.agent.chatserver import (
    Reply,
    chat_server,
    endpoint_failures,
    garbage_calls,
    request_data,
    text,
    tool_call,
)
from tests.agent.conftest import run_cli

REPO = Path(__file__).resolve().parents[3]
FAKE_KEY = "sk-anomscan-FAKE-KEY-31415926535"
SCAN_ARGS = [
    "--events",
    "4000",
    "--epochs",
    "2",
    "--points-per-decade",
    "1",
    "--xsec-range",
    "0.3",
    "3",
    "--max-points",
    "2",
    "--executor",
    "serial",
    "--seed",
    "5",
    "--quiet",
]

pytestmark = pytest.mark.slow


def sensible_model(body: dict[str, Any]) -> Reply:
    """A scripted model that decides as a careful physicist would (and as rules do)."""
    tool = body["tools"][0]["function"]["name"]
    data = request_data(body)
    if tool == "propose_points":
        if "scanned" in data:
            return tool_call(
                "propose_points", {"points_pb": [], "stop": True, "rationale": "nothing grows"}
            )
        low, high = data["xsec_range_pb"]
        grid = sorted(
            (float(p) for p in log_uniform_xsec_grid(data["points_per_decade"], low, high)),
            reverse=True,
        )
        return tool_call(
            "propose_points",
            {"points_pb": grid, "stop": False, "rationale": "log-uniform, loosest first"},
        )
    passed = [c for c in data["candidates"] if c["passed"]]
    if tool == "accept_background":
        return tool_call(
            "accept_background",
            {
                "spectrum": data["spectrum"],
                "point_pb": data["point_pb"],
                "function": passed[0]["function"] if passed else None,
                "rationale": "the simplest candidate that passed every check",
            },
        )
    nested = [c for c in data["candidates"] if c["source"] == "nested"]
    gof_failed = bool(nested) and all(
        any(k["name"] == "goodness_of_fit" and not k["passed"] for k in c["checks"]) for c in nested
    )
    use = (
        not passed
        and gof_failed
        and data["n_in_range"] >= data["min_events"]
        and data["fallbacks_left"] > 0
    )
    return tool_call(
        "decide_fallback",
        {
            "spectrum": data["spectrum"],
            "point_pb": data["point_pb"],
            "use_fallback": use,
            "rationale": "shape not described" if use else "not needed",
        },
    )


def invalid_model(body: dict[str, Any]) -> Reply:
    """A scripted model whose every proposal breaks a gate (or is not a tool call)."""
    tool = body["tools"][0]["function"]["name"]
    data = request_data(body)
    if tool == "propose_points":
        return tool_call(
            "propose_points", {"points_pb": [1e6], "stop": False, "rationale": "go big"}
        )
    if tool == "accept_background":
        failed = [c["function"] for c in data["candidates"] if not c["passed"]]
        return tool_call(
            "accept_background",
            {
                "spectrum": data["spectrum"],
                "point_pb": data["point_pb"],
                "function": failed[0] if failed else "p9",
                "rationale": "looks fine to me",
            },
        )
    return text("I would rather not decide that.")


def _scan(tmp_path: Path, name: str, *extra: str, key: str | None = None) -> tuple[Path, str]:
    run = tmp_path / name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANOMSCAN_LLM"))}
    env["PYTHONPATH"] = str(REPO)
    if key is not None:
        env["OPENAI_API_KEY"] = key
    completed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "scan", "--out", str(run), *SCAN_ARGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return run, output


def _results(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "results.json").read_text())
    return data


def _table(run: Path, sql: str) -> list[dict[str, Any]]:
    connection = sqlite3.connect(run / "audit.sqlite")
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(sql)]
    finally:
        connection.close()


def _top(results: dict[str, Any]) -> tuple[Any, ...]:
    top = results["excesses"][0]
    return (top["spectrum"], top["xsec_pb"], tuple(top["window_gev"]), top["function"])


@pytest.fixture(scope="module")
def rules_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, _ = _scan(tmp_path_factory.mktemp("rules"), "rules")
    return run


def test_sensible_model_reaches_the_rules_top_excess(tmp_path: Path, rules_run: Path) -> None:
    with chat_server(responder=sensible_model) as server:
        run, _output = _scan(
            tmp_path,
            "llm",
            "--policy",
            "llm",
            "--llm-base-url",
            server.url,
            "--llm-model",
            "scripted-sensible",
            key="sk-local",
        )
    rules, llm = _results(rules_run), _results(run)
    assert llm["excesses"], "the scan found no excess at all"
    assert _top(llm) == _top(rules)
    assert llm["excesses"][0]["local_z"] == pytest.approx(rules["excesses"][0]["local_z"])
    decisions = _table(run, "select * from decisions")
    by_llm = [d for d in decisions if d["policy"] == "llm" and d["kind"] == "background"]
    assert by_llm, "no background was accepted by the LLM policy"
    assert not [d for d in decisions if str(d["kind"]).endswith((":rejected", ":fallback"))]
    messages = _table(run, "select * from llm_messages where role = 'assistant'")
    assert len(messages) == len(server.requests)
    assert all(m["model"] == "scripted-sensible" for m in messages)
    assert all(m["tokens"] == 120 and m["latency_s"] is not None for m in messages)
    runs = _table(run, "select * from runs")
    prompts = json.loads(runs[0]["prompts"])
    assert set(prompts) >= {"system", "accept_background"}
    assert all(len(digest) == 64 for digest in prompts.values())
    verify = run_cli("audit", "verify", str(run))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_invalid_model_ends_in_the_rules_result_and_leaks_no_key(
    tmp_path: Path, rules_run: Path
) -> None:
    with chat_server(responder=invalid_model) as server:
        run, output = _scan(
            tmp_path,
            "llm-invalid",
            "--policy",
            "llm",
            "--llm-base-url",
            server.url,
            "--llm-model",
            "scripted-invalid",
            "--llm-max-rejections",
            "1",
            key=FAKE_KEY,
        )
    # the key was really used ...
    assert all(h["authorization"] == f"Bearer {FAKE_KEY}" for h in server.headers)
    # ... and is nowhere in the run folder or the output
    assert FAKE_KEY not in output
    leaks = [p for p in run.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert len(list(run.rglob("*"))) > 5

    rules, llm = _results(rules_run), _results(run)
    # the event table's bytes carry its run folder in their provenance: not a result
    strip = ("run_id", "seconds", "run_dir", "timings", "table_sha256")
    assert {k: v for k, v in llm.items() if k not in strip} == {
        k: v for k, v in rules.items() if k not in strip
    }
    decisions = _table(run, "select * from decisions order by seq")
    fallbacks = [d for d in decisions if str(d["kind"]).endswith(":fallback")]
    rejected = [d for d in decisions if str(d["kind"]).endswith(":rejected")]
    asked = [d for d in decisions if str(d["kind"]).endswith(":proposal")]
    assert asked == []
    assert fallbacks
    assert len(rejected) == 2 * len(fallbacks)  # 1 + max_rejections refusals each
    kinds = {str(d["kind"]).split(":")[0] for d in fallbacks}
    assert {"initial_points", "accept_background"} <= kinds
    assert all("proposals refused (limit 1)" in d["rationale"] for d in fallbacks)
    reasons = " | ".join(str(d["rationale"]) for d in rejected)
    assert "outside the scan range" in reasons
    assert "did not pass every check" in reasons or "is not a candidate" in reasons
    final = [d for d in decisions if d["kind"] == "background"]
    assert final
    assert all(d["policy"] == "rules" for d in final)
    listing = subprocess.run(
        [sys.executable, "-m", "agent.cli", "audit", str(run), "--policy", "llm"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"},
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "rejected" in listing.stdout
    assert "fallback" in listing.stdout


class BrokenEndpoint:
    """Every endpoint failure in turn, a garbage tool call between two (issue 21).

    The garbage calls are well-formed completions, so the errors are never three in a row and
    the policy keeps asking: every failure is met within the first 2 x 22 requests.
    """

    def __init__(self) -> None:
        self.failures = list(endpoint_failures())
        self.garbage = list(garbage_calls())
        self.served: list[tuple[str, str]] = []  # (name, what the audit must say)

    def __call__(self, body: dict[str, Any]) -> Reply:
        tool = body["tools"][0]["function"]["name"]
        turn = len(self.served)
        if turn % 2:
            name = self.garbage[turn // 2 % len(self.garbage)]
            reply, reason = garbage_calls(tool)[name]
        else:
            name = self.failures[turn // 2 % len(self.failures)]
            reply, reason = endpoint_failures(tool)[name]
        self.served.append((name, reason))
        return reply


def test_a_broken_endpoint_ends_in_the_rules_result_saying_why(
    tmp_path: Path, rules_run: Path
) -> None:
    endpoint = BrokenEndpoint()
    with chat_server(responder=endpoint) as server:
        run, _output = _scan(
            tmp_path,
            "llm-broken",
            "--policy",
            "llm",
            "--llm-base-url",
            server.url,
            "--llm-model",
            "scripted-broken",
            "--llm-timeout",
            "5",
            "--llm-max-rejections",
            "1",
            key="sk-local",
        )
    served = {name for name, _reason in endpoint.served}
    assert served == set(endpoint.failures) | set(endpoint.garbage), "scan too short to meet all"

    rules, llm = _results(rules_run), _results(run)
    assert [_excess(e) for e in llm["excesses"]] == [_excess(e) for e in rules["excesses"]]
    strip = ("run_id", "seconds", "run_dir", "timings", "table_sha256")
    assert {k: v for k, v in llm.items() if k not in strip} == {
        k: v for k, v in rules.items() if k not in strip
    }

    decisions = _table(run, "select * from decisions order by seq")
    assert not [d for d in decisions if str(d["kind"]).endswith(":proposal")]
    assert all(d["policy"] == "rules" for d in decisions if d["kind"] == "background")
    said = [str(d["rationale"]) for d in decisions if str(d["kind"]).endswith(":fallback")]
    refused = [str(d["rationale"]) for d in decisions if str(d["kind"]).endswith(":rejected")]
    errors = [str(m["content"]) for m in _table(run, "select * from llm_messages")]
    for name, reason in endpoint.served:
        if name in endpoint.garbage:
            assert any(reason in r for r in refused), f"{name}: {reason!r} not among refusals"
        else:
            assert any(reason in r for r in said), f"{name}: {reason!r} not among fallbacks"
            assert any(reason in e for e in errors), f"{name}: {reason!r} not among messages"
    assert max(len(e) for e in errors) < 100_000  # a 20 MB reply leaves a short row
    verify = run_cli("audit", "verify", str(run))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _excess(excess: dict[str, Any]) -> tuple[Any, ...]:
    return (excess["spectrum"], tuple(excess["window_gev"]), excess["function"])
