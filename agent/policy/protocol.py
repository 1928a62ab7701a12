"""The decisions of a scan behind one interface: the proposals and the `Policy` protocol.

A policy proposes; agent/policy/gates.py disposes; agent/runtime/audit.py records both. Every
proposal is plain, pydantic-validated data with a `rationale`, so a policy that answers in
tool-call JSON (the LLM policy) builds the same objects with `Model.model_validate(json)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class Proposal(BaseModel):
    """Base of every proposal: plain data, unknown fields refused, a rationale required."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rationale: str = Field(min_length=1)


ProposalT = TypeVar("ProposalT", bound=Proposal)
"""Any one kind of proposal (a decision is typed by the proposal it returns)."""


class PointsProposal(Proposal):
    """AR points (pb) to scan next; `stop` = none, the sweep is complete."""

    points_pb: list[float]
    stop: bool


class BackgroundProposal(Proposal):
    """The background function accepted for one spectrum at one point (null = none)."""

    spectrum: str
    point_pb: float
    function: str | None


class FallbackProposal(Proposal):
    """Whether to run the symbolic-regression fallback on one spectrum at one point."""

    spectrum: str
    point_pb: float
    use_fallback: bool


class CheckSummary(BaseModel):
    """One robustness check of a candidate, as the policy sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    passed: bool
    numbers: dict[str, float | None] = Field(default_factory=dict)


class Candidate(BaseModel):
    """One background function that was fitted and checked for a spectrum."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    function: str
    passed: bool
    checks: list[CheckSummary]
    source: Literal["nested", "fallback"] = "nested"


class SpectrumOutcome(BaseModel):
    """What a scanned point gave for one spectrum: the input of the refinement rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    status: Literal["excess", "no background", "skipped"]
    local_z: float | None = None
    whole_stream: bool = False
    """The AR point's region is the whole stream (looser points hold the same events)."""


class PointOutcome(BaseModel):
    """Every spectrum's outcome at one scanned AR point."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    point_pb: float
    spectra: dict[str, SpectrumOutcome]


@dataclass(frozen=True)
class AuditRow:
    """A row a policy queues for the audit (`key` unique in the scan; the graph adds the step)."""

    table: str
    key: str
    content: dict[str, Any]


class Policy(Protocol):
    """The decisions of a scan. Each method returns a proposal the gates then check."""

    name: str

    def initial_points(
        self, xsec_range: tuple[float, float], points_per_decade: int
    ) -> PointsProposal:
        """The AR points of the first sweep."""
        ...

    def next_points(
        self, outcomes: list[PointOutcome], xsec_range: tuple[float, float], remaining: int
    ) -> PointsProposal:
        """AR points to add after the scanned ones (`remaining` = points left in the budget)."""
        ...

    def accept_background(
        self, spectrum: str, point_pb: float, candidates: list[Candidate]
    ) -> BackgroundProposal:
        """The candidate to accept (it must have passed every check), or none."""
        ...

    def fallback(
        self,
        spectrum: str,
        point_pb: float,
        candidates: list[Candidate],
        n_in_range: int,
        fallbacks_left: int,
    ) -> FallbackProposal:
        """Whether to run the symbolic fallback when no candidate passed."""
        ...

    def take_rows(self) -> list[AuditRow]:
        """The audit rows queued since the last call (messages, refusals, fallbacks)."""
        ...

    def decided_by(self) -> str:
        """The policy that took the last decision (`rules` when an LLM policy fell back)."""
        ...

    def prompts_sha256(self) -> dict[str, str] | None:
        """SHA-256 of each prompt the policy sends to a model (recorded in the run), or None."""
        ...
