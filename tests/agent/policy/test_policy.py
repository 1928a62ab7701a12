"""The rules policy and the gates: proposals are plain validated data, and no proposal can
accept a background that failed a check, scan a point outside the range or twice."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.policy import (
    BackgroundProposal,
    Candidate,
    CheckSummary,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
    RulesPolicy,
    SpectrumOutcome,
)
from agent.policy.gates import background_gate, fallback_gate, points_gate

RULES = RulesPolicy()
NAMES = {"T2/jm", "T1/jj"}


def _candidate(function: str, failed: tuple[str, ...] = (), source: str = "nested") -> Candidate:
    checks = [
        CheckSummary(name=name, passed=name not in failed)
        for name in ("goodness_of_fit", "fit_start_stability", "spurious_signal")
    ]
    return Candidate(function=function, passed=not failed, checks=checks, source=source)  # type: ignore[arg-type]


def test_initial_grid_is_log_uniform_with_21_points_by_default() -> None:
    proposal = RULES.initial_points((0.001, 100.0), 4)
    assert len(proposal.points_pb) == 21
    assert proposal.points_pb[0] == pytest.approx(100.0)
    assert proposal.points_pb[-1] == pytest.approx(0.001)
    assert {0.1, 1.0, 10.0} <= {round(p, 12) for p in proposal.points_pb}
    assert proposal.rationale


def test_rules_accept_the_first_passing_candidate_and_the_gate_agrees() -> None:
    candidates = [_candidate("p3", ("spurious_signal",)), _candidate("p4"), _candidate("p5")]
    proposal = RULES.accept_background("T2/jm", 1.0, candidates)
    assert proposal.function == "p4"
    assert background_gate(proposal, candidates, NAMES).passed


def test_gate_refuses_a_failed_candidate_an_unknown_function_and_spectrum() -> None:
    candidates = [_candidate("p3", ("goodness_of_fit",)), _candidate("p4")]
    failed = BackgroundProposal(spectrum="T2/jm", point_pb=1.0, function="p3", rationale="llm")
    result = background_gate(failed, candidates, NAMES)
    assert not result.passed and "goodness_of_fit" in result.reason
    unknown = BackgroundProposal(spectrum="T2/jm", point_pb=1.0, function="p6", rationale="x")
    assert not background_gate(unknown, candidates, NAMES).passed
    elsewhere = BackgroundProposal(spectrum="T9/zz", point_pb=1.0, function="p4", rationale="x")
    assert not background_gate(elsewhere, candidates, NAMES).passed
    # a candidate claiming `passed` with a failing check is still refused
    liar = Candidate(
        function="p5", passed=True, checks=[CheckSummary(name="spurious_signal", passed=False)]
    )
    claim = BackgroundProposal(spectrum="T2/jm", point_pb=1.0, function="p5", rationale="x")
    assert not background_gate(claim, [liar], NAMES).passed


def test_proposals_validate_from_tool_call_json_and_refuse_extra_fields() -> None:
    text = '{"spectrum": "T2/jm", "point_pb": 1.0, "function": "p4", "rationale": "passes"}'
    assert BackgroundProposal.model_validate_json(text).function == "p4"
    with pytest.raises(ValidationError):
        BackgroundProposal.model_validate_json(text[:-1] + ', "force": true}')
    with pytest.raises(ValidationError):
        PointsProposal.model_validate({"points_pb": [1.0], "stop": False, "rationale": ""})


def test_fallback_only_for_a_shape_problem_in_a_full_spectrum_within_budget() -> None:
    shape = [_candidate(f"p{n}", ("goodness_of_fit",)) for n in range(2, 7)]
    sparse = [_candidate(f"p{n}", ("spurious_signal",)) for n in range(2, 7)]
    assert RULES.fallback("T2/jm", 1.0, shape, 5000, 3).use_fallback
    assert not RULES.fallback("T2/jm", 1.0, shape, 200, 3).use_fallback
    assert not RULES.fallback("T2/jm", 1.0, shape, 5000, 0).use_fallback
    assert not RULES.fallback("T2/jm", 1.0, sparse, 5000, 3).use_fallback
    forced = FallbackProposal(spectrum="T2/jm", point_pb=1.0, use_fallback=True, rationale="x")
    assert not fallback_gate(forced, [_candidate("p4")]).passed
    assert fallback_gate(forced, shape).passed


def _outcomes(z_by_point: dict[float, float | None]) -> list[PointOutcome]:
    return [
        PointOutcome(
            point_pb=point,
            spectra={
                "T2/jm": SpectrumOutcome(
                    status="excess" if z is not None else "no background", local_z=z
                )
            },
        )
        for point, z in z_by_point.items()
    ]


def test_refinement_splits_around_a_growing_excess() -> None:
    outcomes = _outcomes({0.1: 1.0, 1.0: 4.0, 10.0: 2.0, 100.0: 1.0})
    proposal = RULES.next_points(outcomes, (0.001, 100.0), remaining=5)
    assert not proposal.stop
    assert sorted(proposal.points_pb) == [0.3162, 3.162]
    assert "T2/jm" in proposal.rationale


def test_refinement_where_a_check_failed_and_stop_when_nothing_grows() -> None:
    outcomes = _outcomes({0.1: None, 1.0: 1.0, 10.0: 1.2})
    proposal = RULES.next_points(outcomes, (0.001, 100.0), remaining=5)
    assert proposal.points_pb == [0.3162]
    quiet = RULES.next_points(_outcomes({1.0: 1.0, 10.0: 1.1}), (0.001, 100.0), remaining=5)
    assert quiet.stop and quiet.points_pb == []
    spent = RULES.next_points(outcomes, (0.001, 100.0), remaining=0)
    assert spent.stop


def test_points_gate_refuses_outside_duplicate_and_over_budget() -> None:
    proposal = PointsProposal(
        points_pb=[1.0, 1.0000000001, 200.0, -1.0, 0.5, 0.2, 0.3], stop=False, rationale="x"
    )
    accepted, refused = points_gate(proposal, [1.0], (0.001, 100.0), remaining=2)
    assert accepted == [0.5, 0.2]
    reasons = " ".join(refused)
    assert "already scanned" in reasons
    assert "outside the scan range" in reasons
    assert "not a positive" in reasons
    assert "budget is spent" in reasons


def test_no_refinement_between_two_whole_stream_regions() -> None:
    """Regions that are both the whole stream hold the same events: nothing to split."""
    outcomes = [
        PointOutcome(
            point_pb=point,
            spectra={
                "T2/jm": SpectrumOutcome(status="excess", local_z=z, whole_stream=point >= 10.0)
            },
        )
        for point, z in ((1.0, 3.0), (10.0, 4.0), (100.0, 4.1))
    ]
    proposal = RULES.next_points(outcomes, (0.001, 100.0), remaining=5)
    assert proposal.points_pb == []  # the best (100 pb) and its neighbour (10 pb) are both whole
    assert proposal.stop
