"""Who decides: the `Policy` protocol, the deterministic rules, the gates, and the LLM policy."""

from agent.policy.gates import GateResult, background_gate, fallback_gate, points_gate
from agent.policy.protocol import (
    AuditRow,
    BackgroundProposal,
    Candidate,
    CheckSummary,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
    Policy,
    Proposal,
    SpectrumOutcome,
)
from agent.policy.rules import FALLBACK_MIN_EVENTS, RulesPolicy

__all__ = [
    "FALLBACK_MIN_EVENTS",
    "AuditRow",
    "BackgroundProposal",
    "Candidate",
    "CheckSummary",
    "FallbackProposal",
    "GateResult",
    "PointOutcome",
    "PointsProposal",
    "Policy",
    "Proposal",
    "RulesPolicy",
    "SpectrumOutcome",
    "background_gate",
    "fallback_gate",
    "points_gate",
]
