"""One decision of the LLM policy as a conversation: ask, answer each tool call, refuse, fall back.

The model gets the system prompt, then the decision's prompt with the scan's numbers as JSON
inside <data> (declared as data in the system prompt, so nothing in them reads as an
instruction). Each tool call of a reply is answered (agent/policy/llm/tools.py): an inspection
tool's output, or the decision, validated by its model and the question's gates. A refused
proposal goes back to the model with the reason, up to `max_rejections` times, and at most
MAX_INSPECTIONS replies may go to read-only tools, so a decision costs a bounded number of
calls. Past either limit, on any endpoint failure or a spent budget, the decision is the
rules' one, and the audit says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic

from agent.policy.gates import GateResult
from agent.policy.llm.client import ChatClient, Fallback
from agent.policy.llm.prompts import Prompts
from agent.policy.llm.records import MAX_AUDIT_CHARS, DecisionTrace, PolicyRecords, clip
from agent.policy.llm.tools import DecisionTool, Workspace, answer_call
from agent.policy.protocol import ProposalT

MAX_INSPECTIONS = 3
"""Replies per decision spent on read-only tools before the model must decide."""


@dataclass(frozen=True)
class Question(Generic[ProposalT]):
    """One decision to ask the model: its prompt, tool, data, gates and the rules' answer."""

    kind: str
    """The prompt's name, and the decision's kind in the audit."""
    tool: DecisionTool[ProposalT]
    data: Mapping[str, Any]
    check: Callable[[ProposalT], GateResult]
    rules: Callable[[], ProposalT]
    spectrum: str | None = None
    point_pb: float | None = None


def data_block(data: Mapping[str, Any]) -> str:
    """The scan's numbers for the model: JSON inside <data> (declared as data, not orders)."""
    return "<data>\n" + json.dumps(data, indent=1, sort_keys=True, default=str) + "\n</data>"


def assistant_message(content: str | None, calls: list[dict[str, str]]) -> dict[str, Any]:
    """The model's reply as it goes back into the conversation."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls
        ]
    return message


class Conversation:
    """Asks the model one question at a time; see the module docstring."""

    def __init__(
        self,
        client: ChatClient,
        records: PolicyRecords,
        prompts: Prompts,
        workspace: Workspace,
        max_rejections: int,
    ) -> None:
        self.client = client
        self.records = records
        self.prompts = prompts
        self.workspace = workspace
        self.max_rejections = max_rejections

    def decide(self, question: Question[ProposalT], trace: DecisionTrace) -> ProposalT:
        """The model's proposal that passed the gates, or the rules' one (said in `trace`)."""
        self.records.new_decision()
        tools = question.tool.offered()
        user = self.prompts.texts[question.kind] + "\n" + data_block(question.data)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": self.prompts.texts["system"]},
            {"role": "user", "content": user},
        ]
        self.records.message("system", messages[0]["content"], kind=question.kind)
        self.records.message("user", user, kind=question.kind)
        try:
            return self._converse(question, messages, tools, trace)
        except Fallback as fallback:
            return self._fall_back(question, trace, fallback)

    def _fall_back(
        self, question: Question[ProposalT], trace: DecisionTrace, fallback: Fallback
    ) -> ProposalT:
        if fallback.disable:
            self.client.stop_asking(fallback.reason)
        proposal = question.rules()
        trace.policy = "rules"
        trace.fallback_reason = fallback.reason
        self.records.decision(
            f"{question.kind}:fallback",
            spectrum=question.spectrum,
            point_pb=question.point_pb,
            chosen=proposal.model_dump(mode="json"),
            rationale=f"fell back to rules: {fallback.reason}",
            gate="fallback",
        )
        return proposal

    def _converse(
        self,
        question: Question[ProposalT],
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        trace: DecisionTrace,
    ) -> ProposalT:
        while True:
            content, calls = self.client.complete(messages, tools, question.kind)
            trace.calls += 1
            messages.append(assistant_message(content, calls))
            proposal, reasons = self._answer(question, messages, content, calls)
            if proposal is not None:
                return proposal
            self._record_refusals(question, trace, reasons, content, calls)
            self._check_limits(trace)

    def _answer(
        self,
        question: Question[ProposalT],
        messages: list[dict[str, Any]],
        content: str | None,
        calls: list[dict[str, str]],
    ) -> tuple[ProposalT | None, list[str]]:
        """Answer each call of a reply: the accepted proposal, else why each one was refused."""
        kind = question.kind
        reasons: list[str] = []
        if not calls:
            reason = (
                f"no tool call in the reply (text: {str(content)[:200]!r}); "
                f"answer by calling {question.tool.name}"
            )
            reasons.append(reason)
            messages.append({"role": "user", "content": f"Refused: {reason}."})
            self.records.message("user", f"Refused: {reason}.", kind=kind)
        for call in calls:
            outcome, proposal = answer_call(call, question.tool, question.check, self.workspace)
            if proposal is not None:
                self.records.decision(
                    f"{kind}:proposal",
                    spectrum=question.spectrum,
                    point_pb=question.point_pb,
                    chosen=proposal.model_dump(mode="json"),
                    rationale=proposal.rationale,
                    gate="passed",
                )
                return proposal, reasons
            if outcome.startswith("refused: "):
                reasons.append(outcome.removeprefix("refused: "))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": outcome})
            self.records.message("tool", outcome, kind=kind)
        return None, reasons

    def _record_refusals(
        self,
        question: Question[ProposalT],
        trace: DecisionTrace,
        reasons: list[str],
        content: str | None,
        calls: list[dict[str, str]],
    ) -> None:
        chosen = [clip(c["name"] + " " + c["arguments"], MAX_AUDIT_CHARS) for c in calls] or (
            None if content is None else clip(content, MAX_AUDIT_CHARS)
        )
        for reason in reasons:
            trace.rejections.append(reason)
            self.records.decision(
                f"{question.kind}:rejected",
                spectrum=question.spectrum,
                point_pb=question.point_pb,
                chosen=chosen,
                rationale=reason,
                gate="refused",
            )

    def _check_limits(self, trace: DecisionTrace) -> None:
        """Fall back after too many refusals, or too many replies spent on inspection."""
        if len(trace.rejections) > self.max_rejections:
            raise Fallback(
                f"{len(trace.rejections)} proposals refused (limit "
                f"{self.max_rejections}); last: {trace.rejections[-1]}"
            )
        if trace.calls >= self.max_rejections + 1 + MAX_INSPECTIONS:
            raise Fallback(
                f"no decision after {trace.calls} replies (at most {MAX_INSPECTIONS} "
                "spent on read-only tools)"
            )
