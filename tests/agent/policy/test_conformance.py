"""The `Policy` contract, run against every policy (as LangGraph runs one suite per checkpointer).

Each test takes the `policy` fixture, which yields a `RulesPolicy` and an `LLMPolicy`. The LLM
one talks through the real `openai` client to the local chat-completions server
(tests/agent/chatserver.py), scripted as a model that answers every question with the tool
call the rules would make, so every decision goes the whole way: prompt, HTTP, tool-call JSON,
validation, the policy's checks. Whatever policy decides, the graph relies on these promises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.policy import (
    AuditRow,
    Candidate,
    CheckSummary,
    PointOutcome,
    Policy,
    Proposal,
    RulesPolicy,
    SpectrumOutcome,
    background_gate,
    fallback_gate,
    points_gate,
)
from agent.policy.gates import DUPLICATE_TOLERANCE
from agent.policy.llm import LLMPolicy, LLMSettings
from core.anomaly import log_uniform_xsec_grid
from tests.agent.chatserver import Reply, chat_server, request_data, tool_call

SPECTRUM = "T2/jm"
POINT = 1.0
RULES = RulesPolicy()


def rules_minded_model(body: dict[str, Any]) -> Reply:
    """A scripted model whose every answer is the tool call the rules would make."""
    tool = body["tools"][0]["function"]["name"]
    data = request_data(body)
    xsec_range = tuple(data.get("xsec_range_pb", (0.0, 0.0)))
    candidates = [Candidate.model_validate(c) for c in data.get("candidates", [])]
    proposal: Proposal
    if tool == "propose_points" and "scanned" in data:
        outcomes = [PointOutcome.model_validate(o) for o in data["scanned"]]
        proposal = RULES.next_points(outcomes, xsec_range, data["remaining"])
    elif tool == "propose_points":
        proposal = RULES.initial_points(xsec_range, data["points_per_decade"])
    elif tool == "accept_background":
        proposal = RULES.accept_background(data["spectrum"], data["point_pb"], candidates)
    else:
        proposal = RULES.fallback(
            data["spectrum"],
            data["point_pb"],
            candidates,
            data["n_in_range"],
            data["fallbacks_left"],
        )
    return tool_call(tool, proposal.model_dump(mode="json"))


@pytest.fixture(params=["rules", "llm"])
def policy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Policy]:
    """Each policy in turn; the LLM one through the real client and a local server."""
    if request.param == "rules":
        yield RulesPolicy()
        return
    with chat_server(responder=rules_minded_model) as server:
        settings = LLMSettings(model="rules-minded", base_url=server.url, timeout_s=10.0)
        yield LLMPolicy(settings, tmp_path)


def _taken(policy: Policy, proposal: Proposal) -> None:
    """Every decision has a rationale and says it was the policy's own."""
    assert proposal.rationale.strip()
    assert policy.decided_by() == policy.name


def _check(name: str, passed: bool) -> CheckSummary:
    return CheckSummary(name=name, passed=passed, numbers={"p_value": 0.4 if passed else 0.001})


def _candidate(function: str, failed: tuple[str, ...] = ()) -> Candidate:
    names = ("goodness_of_fit", "fit_start_stability", "spurious_signal")
    checks = [_check(name, name not in failed) for name in names]
    return Candidate(function=function, passed=not failed, checks=checks)


SHAPE_FAILED = [_candidate(f"p{n}", ("goodness_of_fit",)) for n in range(2, 7)]
ONE_PASSED = [_candidate("p3", ("spurious_signal",)), _candidate("p4"), _candidate("p5")]
CANDIDATE_SETS = {
    "one-passed": ONE_PASSED,
    "none-passed": SHAPE_FAILED,
    "unchecked-then-passed": [Candidate(function="p2", passed=False, checks=[]), _candidate("p3")],
    "none-fitted": [],
}


def _outcomes(z_by_point: dict[float, float | None]) -> list[PointOutcome]:
    return [
        PointOutcome(
            point_pb=point,
            spectra={
                SPECTRUM: SpectrumOutcome(
                    status="excess" if z is not None else "no background", local_z=z
                )
            },
        )
        for point, z in z_by_point.items()
    ]


@pytest.mark.parametrize(
    ("xsec_range", "per_decade"), [((0.001, 100.0), 4), ((0.3, 3.0), 1), ((0.1, 10.0), 2)]
)
def test_initial_points_are_the_log_uniform_count_inside_the_range(
    policy: Policy, xsec_range: tuple[float, float], per_decade: int
) -> None:
    proposal = policy.initial_points(xsec_range, per_decade)
    _taken(policy, proposal)
    count = len(log_uniform_xsec_grid(per_decade, *xsec_range))
    assert not proposal.stop
    assert len(proposal.points_pb) == count
    low, high = xsec_range
    tolerance = 1 + DUPLICATE_TOLERANCE
    assert all(low / tolerance <= point <= high * tolerance for point in proposal.points_pb)
    accepted, refused = points_gate(proposal, [], xsec_range, count)
    assert (accepted, refused) == (proposal.points_pb, [])


@pytest.mark.parametrize("remaining", [0, 1, 5])
@pytest.mark.parametrize(
    "z_by_point",
    [
        {0.1: 1.0, 1.0: 4.0, 10.0: 2.0, 100.0: 1.0},
        {0.1: None, 1.0: 1.0, 10.0: 1.2},
        {1.0: 1.0, 10.0: 1.1},
    ],
    ids=["growing-excess", "failed-neighbour", "quiet"],
)
def test_next_points_respect_the_budget_and_never_repeat_a_scanned_point(
    policy: Policy, z_by_point: dict[float, float | None], remaining: int
) -> None:
    outcomes = _outcomes(z_by_point)
    scanned = [outcome.point_pb for outcome in outcomes]
    proposal = policy.next_points(outcomes, (0.001, 100.0), remaining)
    _taken(policy, proposal)
    assert len(proposal.points_pb) <= remaining
    assert proposal.stop == (not proposal.points_pb)
    for point in proposal.points_pb:
        assert all(abs(point / other - 1.0) > DUPLICATE_TOLERANCE for other in scanned)
    accepted, refused = points_gate(proposal, scanned, (0.001, 100.0), remaining)
    assert (accepted, refused) == (proposal.points_pb, [])


@pytest.mark.parametrize("name", list(CANDIDATE_SETS))
def test_accept_background_only_a_candidate_that_passed_every_check(
    policy: Policy, name: str
) -> None:
    candidates = CANDIDATE_SETS[name]
    proposal = policy.accept_background(SPECTRUM, POINT, candidates)
    _taken(policy, proposal)
    assert (proposal.spectrum, proposal.point_pb) == (SPECTRUM, POINT)
    if proposal.function is None:
        assert not any(c.passed for c in candidates)
    else:
        (chosen,) = [c for c in candidates if c.function == proposal.function]
        assert chosen.passed
        assert chosen.checks
        assert all(check.passed for check in chosen.checks)
    assert background_gate(proposal, candidates, {SPECTRUM}).passed


@pytest.mark.parametrize(
    ("candidates", "n_in_range", "fallbacks_left"),
    [
        (SHAPE_FAILED, 50_000, 0),
        (SHAPE_FAILED, 0, 3),
        ([], 0, 3),
        (ONE_PASSED, 50_000, 3),
    ],
    ids=["budget-spent", "no-events", "no-data", "a-candidate-passed"],
)
def test_fallback_never_where_it_can_not_run_or_is_not_needed(
    policy: Policy, candidates: list[Candidate], n_in_range: int, fallbacks_left: int
) -> None:
    proposal = policy.fallback(SPECTRUM, POINT, candidates, n_in_range, fallbacks_left)
    _taken(policy, proposal)
    assert (proposal.spectrum, proposal.point_pb) == (SPECTRUM, POINT)
    assert not proposal.use_fallback
    assert fallback_gate(proposal, candidates).passed


def test_fallback_for_a_shape_no_nested_function_describes(policy: Policy) -> None:
    proposal = policy.fallback(SPECTRUM, POINT, SHAPE_FAILED, 50_000, 3)
    _taken(policy, proposal)
    assert proposal.use_fallback
    assert fallback_gate(proposal, SHAPE_FAILED).passed


def test_take_rows_returns_the_queued_rows_once(policy: Policy) -> None:
    policy.accept_background(SPECTRUM, POINT, ONE_PASSED)
    policy.initial_points((0.3, 3.0), 1)
    rows = policy.take_rows()
    assert isinstance(rows, list)
    assert all(isinstance(row, AuditRow) for row in rows)
    assert len({row.key for row in rows}) == len(rows)
    assert policy.take_rows() == []


def test_decided_by_names_the_policy_before_and_after_a_decision(policy: Policy) -> None:
    assert policy.decided_by() == policy.name
    _taken(policy, policy.accept_background(SPECTRUM, POINT, SHAPE_FAILED))


def test_prompts_sha256_is_none_or_one_digest_per_prompt(policy: Policy) -> None:
    digests = policy.prompts_sha256()
    if digests is not None:
        assert digests
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in digests.values())
