"""The deterministic checks every proposal must pass, whatever policy made it.

A refused proposal is replaced by the `rules` policy's proposal, and both are logged
(agent/scan/nodes/). The gates never look at the policy that proposed: a background is
accepted only if it is a candidate that passed every robustness check of its spectrum;
AR points only inside the scan range, positive, not already scanned or proposed, and
within the point budget; a fallback only where no candidate passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.policy.protocol import BackgroundProposal, Candidate, FallbackProposal, PointsProposal
from core.anomaly import point_text

DUPLICATE_TOLERANCE = 1e-6
"""Two AR points within this relative difference are the same point."""


@dataclass(frozen=True)
class GateResult:
    """Whether a proposal passed, and why not."""

    passed: bool
    reason: str


def background_gate(
    proposal: BackgroundProposal, candidates: Sequence[Candidate], known_spectra: set[str]
) -> GateResult:
    """The accepted function must be a candidate of this spectrum that passed every check."""
    if proposal.spectrum not in known_spectra:
        return GateResult(False, f"spectrum {proposal.spectrum!r} does not exist in this scan")
    if proposal.function is None:
        return GateResult(True, "no background accepted")
    matches = [c for c in candidates if c.function == proposal.function]
    if not matches:
        names = [c.function for c in candidates]
        return GateResult(False, f"{proposal.function!r} is not a candidate (tried: {names})")
    candidate = matches[0]
    failed = [check.name for check in candidate.checks if not check.passed]
    if not candidate.passed or failed or not candidate.checks:
        return GateResult(
            False,
            f"{proposal.function} did not pass every check (failed: {failed or 'not checked'})",
        )
    return GateResult(True, f"{proposal.function} passed all {len(candidate.checks)} checks")


def fallback_gate(proposal: FallbackProposal, candidates: Sequence[Candidate]) -> GateResult:
    """A fallback search only where no candidate passed."""
    if proposal.use_fallback and any(c.passed for c in candidates):
        return GateResult(False, "a candidate passed every check: no fallback needed")
    return GateResult(True, "fallback allowed" if proposal.use_fallback else "no fallback")


def points_gate(
    proposal: PointsProposal,
    scanned: Sequence[float],
    xsec_range: tuple[float, float],
    remaining: int,
) -> tuple[list[float], list[str]]:
    """The proposed points that may be scanned, and why each other one was refused."""
    accepted: list[float] = []
    refused: list[str] = []
    low, high = xsec_range
    for point in proposal.points_pb:
        known = list(scanned) + accepted
        if not point > 0:
            refused.append(f"{point!r} pb: not a positive cross-section")
        elif point < low * (1 - DUPLICATE_TOLERANCE) or point > high * (1 + DUPLICATE_TOLERANCE):
            refused.append(f"{point_text(point)} pb: outside the scan range {low:g}..{high:g} pb")
        elif any(abs(point / other - 1.0) <= DUPLICATE_TOLERANCE for other in known):
            refused.append(f"{point_text(point)} pb: already scanned or proposed")
        elif len(accepted) >= remaining:
            refused.append(f"{point_text(point)} pb: the point budget is spent")
        else:
            accepted.append(point)
    return accepted, refused
