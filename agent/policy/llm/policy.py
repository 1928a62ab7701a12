"""`LLMPolicy`: the scan's decisions proposed by a chat model through tool calls, under the gates.

The model may propose anything; only what passes the checks of a question is taken. Those are
the gates the graph applies to every policy (agent/policy/gates.py) plus two the model needs
and the rules never do: the spectrum and point must be the ones asked about, and a points
proposal must give either points or stop. Whenever the model gives no acceptable answer, the
decision is the rules' one (agent/policy/rules.py), so a scan with the LLM policy is never
worse defined than one with the rules, and `decided_by` says which policy took each decision.

Safety: only the listed tools exist for the model; their arguments are validated and every
path is confined to the run folder and the declared inputs (agent/runtime/safety.py); nothing
the model says is executed; scan data travels inside <data> as JSON, declared as data in the
prompt; the API key is redacted from every audit row.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import openai

from agent.policy.gates import GateResult, background_gate, fallback_gate, points_gate
from agent.policy.llm.client import ChatClient, LLMSettings
from agent.policy.llm.conversation import Conversation, Question
from agent.policy.llm.prompts import Prompts, load_prompts
from agent.policy.llm.records import DecisionTrace, PolicyRecords
from agent.policy.llm.tools import ACCEPT_BACKGROUND, DECIDE_FALLBACK, PROPOSE_POINTS, Workspace
from agent.policy.protocol import (
    AuditRow,
    BackgroundProposal,
    Candidate,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
    ProposalT,
)
from agent.policy.rules import FALLBACK_MIN_EVENTS, RulesPolicy


def _points_check(
    proposal: PointsProposal,
    scanned: Sequence[float],
    xsec_range: tuple[float, float],
    remaining: int,
    *,
    need_points: bool,
) -> GateResult:
    """Either points or stop (never stop on the first sweep), and every point past the gate."""
    if proposal.stop and proposal.points_pb:
        return GateResult(False, "stop = true with points: give either points or stop")
    if not proposal.stop and not proposal.points_pb:
        return GateResult(False, "no points and stop = false: give points or stop")
    if need_points and proposal.stop:
        return GateResult(False, "the first sweep needs points; stop is not allowed")
    _accepted, refused = points_gate(proposal, scanned, xsec_range, remaining)
    if refused:
        return GateResult(False, "; ".join(refused))
    return GateResult(True, f"{len(proposal.points_pb)} points inside the range")


def _same_question(
    spectrum: str, point_pb: float, asked_spectrum: str, asked_point: float
) -> GateResult:
    """The proposal answers for the spectrum and point asked about (relative 1e-6)."""
    if spectrum != asked_spectrum:
        return GateResult(
            False, f"spectrum {spectrum!r} is not the one asked about ({asked_spectrum!r})"
        )
    if abs(point_pb / asked_point - 1.0) > 1e-6 if asked_point else point_pb != asked_point:
        return GateResult(
            False, f"point {point_pb:g} pb is not the one asked about ({asked_point:g} pb)"
        )
    return GateResult(True, "same spectrum and point")


def _background_check(
    proposal: BackgroundProposal, spectrum: str, point_pb: float, candidates: list[Candidate]
) -> GateResult:
    same = _same_question(proposal.spectrum, proposal.point_pb, spectrum, point_pb)
    if not same.passed:
        return same
    return background_gate(proposal, candidates, {spectrum})


def _fallback_check(
    proposal: FallbackProposal,
    spectrum: str,
    point_pb: float,
    candidates: list[Candidate],
    fallbacks_left: int,
) -> GateResult:
    same = _same_question(proposal.spectrum, proposal.point_pb, spectrum, point_pb)
    if not same.passed:
        return same
    if proposal.use_fallback and fallbacks_left <= 0:
        return GateResult(False, "the scan's fallback budget is spent")
    return fallback_gate(proposal, candidates)


class LLMPolicy:
    """A Policy whose decisions a chat model proposes and the gates dispose (module docstring)."""

    name = "llm"

    def __init__(
        self,
        settings: LLMSettings,
        run_dir: Path,
        declared_inputs: Sequence[str] = (),
        prompts: Prompts | None = None,
        client: openai.OpenAI | None = None,
        point_budget: int | None = None,
    ) -> None:
        self.settings = settings
        self.point_budget = point_budget
        self.prompts = prompts or load_prompts()
        self.rules = RulesPolicy()
        self.records = PolicyRecords(settings.model, settings.api_key)
        self.client = ChatClient(settings, self.records, client)
        workspace = Workspace(run_dir, tuple(declared_inputs))
        self.conversation = Conversation(
            self.client, self.records, self.prompts, workspace, settings.max_rejections
        )
        self.last: DecisionTrace | None = None
        self._lock = threading.RLock()

    def _decide(self, question: Question[ProposalT]) -> ProposalT:
        """One decision at a time: its audit rows stay together, `last` says how it was taken."""
        with self._lock:
            self.last = DecisionTrace(question.kind)
            return self.conversation.decide(question, self.last)

    def initial_points(
        self, xsec_range: tuple[float, float], points_per_decade: int
    ) -> PointsProposal:
        """The first sweep's AR points: at most the scan's point budget (else the rules grid)."""
        reference = self.rules.initial_points(xsec_range, points_per_decade)
        budget = len(reference.points_pb) if self.point_budget is None else self.point_budget
        data = {
            "xsec_range_pb": list(xsec_range),
            "points_per_decade": points_per_decade,
            "point_budget": budget,
        }
        check = partial(
            _points_check, scanned=[], xsec_range=xsec_range, remaining=budget, need_points=True
        )
        return self._decide(
            Question("initial_points", PROPOSE_POINTS, data, check, lambda: reference)
        )

    def next_points(
        self, outcomes: list[PointOutcome], xsec_range: tuple[float, float], remaining: int
    ) -> PointsProposal:
        """Refinement points between scanned ones, or stop."""
        data = {
            "xsec_range_pb": list(xsec_range),
            "remaining": remaining,
            "scanned": [outcome.model_dump(mode="json") for outcome in outcomes],
        }
        scanned = [outcome.point_pb for outcome in outcomes]
        check = partial(
            _points_check,
            scanned=scanned,
            xsec_range=xsec_range,
            remaining=remaining,
            need_points=False,
        )
        rules = partial(self.rules.next_points, outcomes, xsec_range, remaining)
        return self._decide(Question("next_points", PROPOSE_POINTS, data, check, rules))

    def accept_background(
        self, spectrum: str, point_pb: float, candidates: list[Candidate]
    ) -> BackgroundProposal:
        """The candidate to accept; the gates refuse one that did not pass every check."""
        data = {
            "spectrum": spectrum,
            "point_pb": point_pb,
            "candidates": [candidate.model_dump(mode="json") for candidate in candidates],
        }
        check = partial(
            _background_check, spectrum=spectrum, point_pb=point_pb, candidates=candidates
        )
        rules = partial(self.rules.accept_background, spectrum, point_pb, candidates)
        question = Question(
            "accept_background", ACCEPT_BACKGROUND, data, check, rules, spectrum, point_pb
        )
        return self._decide(question)

    def fallback(
        self,
        spectrum: str,
        point_pb: float,
        candidates: list[Candidate],
        n_in_range: int,
        fallbacks_left: int,
    ) -> FallbackProposal:
        """Whether to run the symbolic fallback; never when a candidate passed or none is left."""
        data = {
            "spectrum": spectrum,
            "point_pb": point_pb,
            "n_in_range": n_in_range,
            "min_events": FALLBACK_MIN_EVENTS,
            "fallbacks_left": fallbacks_left,
            "candidates": [candidate.model_dump(mode="json") for candidate in candidates],
        }
        check = partial(
            _fallback_check,
            spectrum=spectrum,
            point_pb=point_pb,
            candidates=candidates,
            fallbacks_left=fallbacks_left,
        )
        rules = partial(
            self.rules.fallback, spectrum, point_pb, candidates, n_in_range, fallbacks_left
        )
        question = Question("fallback", DECIDE_FALLBACK, data, check, rules, spectrum, point_pb)
        return self._decide(question)

    def take_rows(self) -> list[AuditRow]:
        """The audit rows queued since the last call (LLM messages, refusals, fallbacks)."""
        with self._lock:
            return self.records.take()

    def decided_by(self) -> str:
        """`llm`, or `rules` when the last decision fell back to the rules."""
        return self.last.policy if self.last is not None else self.name

    def prompts_sha256(self) -> dict[str, str]:
        """SHA-256 of each prompt file's text (recorded in the run)."""
        return self.prompts.sha256
