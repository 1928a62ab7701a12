"""The audit rows the LLM policy queues, with the API key redacted before a row is kept.

Every message to and from the model (with its tokens and latency), every refused proposal
and every fallback to the rules is queued as an `AuditRow`; the graph writes them in the step
that asked (`Policy.take_rows`), so the audit shows how each decision was reached. The key is
redacted from a row's content before it is queued, so no row can carry it; long texts are
clipped to MAX_AUDIT_CHARS and say so, so that one chatty reply cannot bloat the audit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.policy.protocol import AuditRow
from agent.runtime.safety import redact, redact_data

MAX_AUDIT_CHARS = 20_000
"""Characters of a reply's text or arguments kept in an audit row (the rest is cut, and said)."""


def clip(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how many there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... (truncated: {limit} of {len(text)} characters kept)"


@dataclass
class DecisionTrace:
    """How the last decision was reached: by the model, or by rules after a fallback."""

    kind: str
    policy: str = "llm"
    calls: int = 0
    rejections: list[str] = field(default_factory=list)
    fallback_reason: str | None = None


class PolicyRecords:
    """The rows queued since the last `take`, keyed by decision and order (unique in a scan)."""

    def __init__(self, model: str, api_key: str | None) -> None:
        self.model = model
        self._secrets = [api_key]
        self._rows: list[AuditRow] = []
        self._decisions = 0

    def new_decision(self) -> None:
        """Start the rows of the next decision."""
        self._decisions += 1

    def redact(self, text: str) -> str:
        """`text` with the API key replaced."""
        return redact(text, self._secrets)

    def take(self) -> list[AuditRow]:
        """The rows queued since the last call; the queue is emptied."""
        rows, self._rows = self._rows, []
        return rows

    def message(
        self,
        role: str,
        content: Any,
        *,
        kind: str,
        tokens: int | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        latency_s: float | None = None,
        served_model: str | None = None,
    ) -> None:
        """An `llm_messages` row: one message of decision `kind` (JSON text unless a string)."""
        self._queue(
            "llm_messages",
            {
                "model": self.model,
                "served_model": served_model,
                "decision": kind,
                "role": role,
                "content": content if isinstance(content, str) else json.dumps(content),
                "tokens": tokens,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "latency_s": latency_s,
            },
        )

    def decision(
        self,
        kind: str,
        *,
        spectrum: str | None,
        point_pb: float | None,
        chosen: Any,
        rationale: str,
        gate: str,
    ) -> None:
        """A `decisions` row of the LLM policy: a proposal, a refusal or a fallback."""
        self._queue(
            "decisions",
            {
                "kind": kind,
                "spectrum": spectrum,
                "point_pb": point_pb,
                "chosen": chosen if isinstance(chosen, str) else json.dumps(chosen, default=str),
                "policy": "llm",
                "rationale": rationale,
                "gate": gate,
            },
        )

    def _queue(self, table: str, content: dict[str, Any]) -> None:
        key = f"llm:{self._decisions}:{len(self._rows)}:{table}"
        self._rows.append(AuditRow(table, key, redact_data(content, self._secrets)))
