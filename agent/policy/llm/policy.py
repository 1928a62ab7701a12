"""`LLMPolicy`: the scan's decisions taken by a chat model through tool calls, under the gates.

Any OpenAI-compatible chat-completions endpoint with tool calling works (OpenAI, vLLM,
llama.cpp server, Ollama), through the `openai` SDK. The model is offered one decision tool
per question, whose JSON Schema is generated from the proposal's pydantic model in
agent/policy/rules.py (one source of truth), plus a few read-only analysis tools of the registry.

Every proposal is validated by its pydantic model and then by the same gates as `rules`
(agent/policy/gates.py, plus "the spectrum and point you were asked about"). A refused proposal goes
back to the model with the reason, up to `max_rejections` times; then the decision is the
`rules` one. Every other failure of the endpoint falls back at once (the client makes no
retries): unreachable, a timeout, an HTTP error, a connection closed mid-body, a body that is not
JSON, not declared as JSON, nested deeper than MAX_NESTING, longer than MAX_REPLY_BYTES or not a
chat completion (`Completion`); the one place that turns them into a fallback is
`LLMPolicy._complete`. `max_consecutive_errors` failures in a row stop asking for the rest of
the scan. Budgets of calls and tokens per scan fall back the same way. Each message, its
tokens and latency, each refusal and each fallback is queued as an audit row (`take_rows`),
with the API key redacted; the key is never logged, stored or put in a message.

Safety: only the listed tools exist for the model; their arguments are validated, every path
is confined to the run folder and the declared inputs (agent/runtime/safety.py); nothing the model
says is executed; scan data travels inside <data> as JSON, declared as data in the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx2  # the openai client's HTTP library: its errors surface while a body streams in
import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.policy.gates import GateResult, background_gate, fallback_gate, points_gate
from agent.policy.protocol import (
    AuditRow,
    BackgroundProposal,
    Candidate,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
    Proposal,
)
from agent.policy.rules import FALLBACK_MIN_EVENTS, RulesPolicy
from agent.runtime.safety import PathConfinementError, confine_paths, redact, redact_data
from core.errors import AnomscanError, InvalidInputError
from tools.registry import get_tool

ProposalT = TypeVar("ProposalT", bound=Proposal)

PROMPT_NAMES = ("system", "initial_points", "next_points", "accept_background", "fallback")
PROMPT_FOLDERS = (
    Path(__file__).resolve().parents[2] / "prompts",  # inside an installed wheel
    Path(__file__).resolve().parents[3] / "prompts",  # the repository (editable install)
)
"""Where the prompt files are looked for, in order."""

DECISION_TOOLS: dict[str, tuple[type[Proposal], str]] = {
    "propose_points": (PointsProposal, "AR points (pb) to scan next, or stop."),
    "accept_background": (
        BackgroundProposal,
        "The background function to accept for the spectrum at the point (null = none).",
    ),
    "decide_fallback": (
        FallbackProposal,
        "Whether to run the symbolic-regression fallback for the spectrum at the point.",
    ),
}
INSPECTION_TOOLS = ("fit_background", "robustness_checks", "bump_hunt", "signal_fit")
"""Read-only registry tools the model may call before deciding (paths confined to the run)."""

MAX_TOOL_OUTPUT_CHARS = 20_000
MAX_INSPECTIONS = 3
"""Replies per decision spent on read-only tools before the model must decide."""
MAX_REPLY_BYTES = 1_000_000
"""Bytes of a reply read at most: a longer one is an endpoint error (reading stops there)."""
MAX_NESTING = 64
"""Deepest JSON nesting (objects, arrays) parsed, in a reply and in tool-call arguments."""
MAX_AUDIT_CHARS = 20_000
"""Characters of a reply's text or arguments kept in an audit row (the rest is cut, and said)."""
MAX_BODY_EXCERPT_CHARS = 2_000
"""Characters of a body that was not a chat completion kept in the audit's error row."""
MAX_ERROR_CHARS = 500
"""Characters of an error message kept in a fallback reason."""


class PromptError(AnomscanError):
    """A prompt file is missing or unreadable."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ReplyFunction(_Strict):
    """The function a tool call names; `arguments` is JSON text, parsed by the policy."""

    name: str
    arguments: str


class ReplyToolCall(_Strict):
    """One tool call of a reply."""

    id: str
    function: ReplyFunction


class ReplyMessage(_Strict):
    """The assistant's message: text, tool calls, or both."""

    content: str | None = None
    tool_calls: list[ReplyToolCall] | None = None


class ReplyChoice(_Strict):
    """A choice of a completion (the policy reads the first)."""

    message: ReplyMessage


class ReplyUsage(_Strict):
    """Tokens the endpoint counted, when it says."""

    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    total_tokens: int | None = Field(default=None, ge=0)


class Completion(_Strict):
    """What the policy reads of a chat completion, with strict types; other fields are ignored."""

    model: str | None = None
    choices: list[ReplyChoice] = Field(min_length=1)
    usage: ReplyUsage | None = None


class _BadReply(Exception):
    """The endpoint answered with something that is not a chat completion; `body` as read."""

    def __init__(self, reason: str, body: bytes = b"", *, complete: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.body = body
        self.complete = complete


_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def nesting_depth(text: str, limit: int = MAX_NESTING) -> int:
    """Deepest nesting of arrays and objects in JSON `text`, counted up to `limit` + 1.

    Strings are skipped; nothing is parsed, so any depth is safe (json.loads raises
    RecursionError near 1000 levels).
    """
    depth = deepest = 0
    for token in _JSON_TOKENS.finditer(text):
        mark = token.group()
        if mark in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif mark in ("]", "}"):
            depth -= 1
    return deepest


def clip(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how many there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... (truncated: {limit} of {len(text)} characters kept)"


def _excerpt(body: bytes, *, complete: bool) -> str:
    """The start of a body for the audit, saying how much of it there was."""
    shown = body[:MAX_BODY_EXCERPT_CHARS].decode("utf-8", errors="replace")
    if len(body) <= MAX_BODY_EXCERPT_CHARS and complete:
        return f"body ({len(body)} bytes): {shown!r}"
    total = f"{len(body)}" if complete else f"more than {len(body)}"
    return f"body (truncated: first {MAX_BODY_EXCERPT_CHARS} of {total} bytes): {shown!r}"


def _validation_summary(error: ValidationError, shown: int = 3) -> str:
    parts = [
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
        for item in error.errors(include_url=False)[:shown]
    ]
    if error.error_count() > shown:
        parts.append(f"{error.error_count() - shown} more")
    return "; ".join(parts)


def _read_body(chunks: Iterable[bytes], timeout_s: float) -> bytes:
    """The body from its chunks, at most MAX_REPLY_BYTES of it, within `timeout_s` seconds."""
    deadline = time.perf_counter() + timeout_s
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            raise _BadReply(
                f"reply longer than {MAX_REPLY_BYTES} bytes (reading stopped there)",
                bytes(body),
                complete=False,
            )
        if time.perf_counter() > deadline:
            raise _BadReply(
                f"reply body still arriving after {timeout_s:g} s", bytes(body), complete=False
            )
    return bytes(body)


def _parse_completion(body: bytes, content_type: str) -> Completion:
    """A chat completion from a 200 reply's body, or `_BadReply` saying what is wrong with it."""
    media = content_type.partition(";")[0].strip().lower()
    if not media.endswith(("/json", "+json")):
        raise _BadReply(f"reply is not JSON (Content-Type {media or 'missing'!r})", body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _BadReply(f"reply is not UTF-8 text ({error})", body) from None
    if nesting_depth(text) > MAX_NESTING:
        raise _BadReply(f"reply nested deeper than {MAX_NESTING} levels (not parsed)", body)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _BadReply(f"reply body is not valid JSON ({error})", body) from None
    if isinstance(data, dict) and "choices" not in data and "error" in data:
        said = clip(json.dumps(data["error"]), MAX_ERROR_CHARS)
        raise _BadReply(f"reply is an error, not a completion ({said})", body)
    try:
        return Completion.model_validate(data)
    except ValidationError as error:
        summary = _validation_summary(error)
        raise _BadReply(f"reply is not a chat completion ({summary})", body) from None


@dataclass(frozen=True)
class Prompts:
    """The prompt texts by name and their SHA-256 (recorded in the run)."""

    folder: Path
    texts: Mapping[str, str]

    @property
    def sha256(self) -> dict[str, str]:
        """SHA-256 (hex) of each prompt file's text."""
        return {
            name: hashlib.sha256(text.encode()).hexdigest() for name, text in self.texts.items()
        }


def prompts_folder() -> Path:
    """The first folder of PROMPT_FOLDERS that holds the system prompt."""
    for folder in PROMPT_FOLDERS:
        if (folder / "system.txt").is_file():
            return folder
    looked = ", ".join(str(folder) for folder in PROMPT_FOLDERS)
    raise PromptError(f"no prompts/system.txt in {looked}; reinstall anomscan")


def load_prompts(folder: Path | None = None) -> Prompts:
    """Read every prompt file (`prompts/<name>.txt`)."""
    where = folder or prompts_folder()
    texts = {}
    for name in PROMPT_NAMES:
        path = where / f"{name}.txt"
        if not path.is_file():
            raise PromptError(
                f"prompt file {path} is missing; every one of {PROMPT_NAMES} is needed"
            )
        texts[name] = path.read_text(encoding="utf-8")
    return Prompts(where, texts)


@dataclass(frozen=True)
class LLMSettings:
    """Endpoint, model and limits of the LLM policy; the key never appears in its repr."""

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_rejections: int = 3
    max_calls: int = 2000
    max_tokens: int = 3_000_000
    max_consecutive_errors: int = 3
    temperature: float = 0.0

    @classmethod
    def from_environment(
        cls,
        base_url: str | None = None,
        model: str | None = None,
        environ: Mapping[str, str] | None = None,
        **limits: Any,
    ) -> LLMSettings:
        """Settings from the options, else ANOMSCAN_LLM_BASE_URL / _MODEL and OPENAI_API_KEY."""
        env = os.environ if environ is None else environ
        chosen_model = model or env.get("ANOMSCAN_LLM_MODEL")
        if not chosen_model:
            raise InvalidInputError(
                "the llm policy needs a model: give --llm-model or set ANOMSCAN_LLM_MODEL"
            )
        settings = cls(
            model=chosen_model,
            base_url=base_url or env.get("ANOMSCAN_LLM_BASE_URL") or None,
            api_key=env.get("OPENAI_API_KEY") or None,
            **limits,
        )
        for name in ("max_rejections", "max_calls", "max_tokens", "max_consecutive_errors"):
            if getattr(settings, name) < 0:
                raise InvalidInputError(
                    f"LLM limit {name} must be >= 0, got {getattr(settings, name)}"
                )
        if settings.timeout_s <= 0:
            raise InvalidInputError(f"LLM timeout must be > 0 s, got {settings.timeout_s}")
        if settings.base_url is not None:
            _check_base_url(settings.base_url)
        return settings

    def public(self) -> dict[str, Any]:
        """The settings for the run's config: everything but the key (only whether it is set)."""
        return {
            "model": self.model,
            "base_url": self.base_url,
            "api_key_set": self.api_key is not None,
            "timeout_s": self.timeout_s,
            "max_rejections": self.max_rejections,
            "max_calls": self.max_calls,
            "max_tokens": self.max_tokens,
            "max_consecutive_errors": self.max_consecutive_errors,
            "temperature": self.temperature,
        }


def _check_base_url(url: str) -> None:
    """Refuse a base URL the client could never reach (no http(s) scheme, no host, bad port)."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as error:
        raise InvalidInputError(
            f"LLM base URL {url!r} is not a URL ({error}); give e.g. http://127.0.0.1:8000/v1"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InvalidInputError(
            f"LLM base URL {url!r} is not an http(s) URL with a host; "
            "give e.g. http://127.0.0.1:8000/v1 (--llm-base-url or ANOMSCAN_LLM_BASE_URL)"
        )


@dataclass
class DecisionTrace:
    """How the last decision was reached: by the model, or by rules after a fallback."""

    kind: str
    policy: str = "llm"
    calls: int = 0
    rejections: list[str] = field(default_factory=list)
    fallback_reason: str | None = None


def function_tool(name: str, description: str, model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAI function-tool description with the JSON Schema of a pydantic model."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": model.model_json_schema(),
        },
    }


def inspection_tool_specs() -> list[dict[str, Any]]:
    """The read-only registry tools offered to the model, schemas from their input models."""
    specs = []
    for name in INSPECTION_TOOLS:
        tool = get_tool(name)
        specs.append(function_tool(name, tool.description, tool.input_model))
    return specs


class _Fallback(Exception):
    """Control flow inside the policy: take the rules decision; never escapes the policy."""

    def __init__(self, reason: str, *, disable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.disable = disable


def _data_block(data: Mapping[str, Any]) -> str:
    return "<data>\n" + json.dumps(data, indent=1, sort_keys=True, default=str) + "\n</data>"


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
        self.run_dir = run_dir
        self.declared_inputs = tuple(declared_inputs)
        self.prompts = prompts or load_prompts()
        self.rules = RulesPolicy()
        self.client = client or openai.OpenAI(
            api_key=settings.api_key or "unset",
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            max_retries=0,
        )
        self.calls = 0
        self.tokens = 0
        self.consecutive_errors = 0
        self.disabled_reason: str | None = None
        self.last: DecisionTrace | None = None
        self._rows: list[AuditRow] = []
        self._decisions = 0
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- audit rows
    def decided_by(self) -> str:
        """`llm`, or `rules` when the last decision fell back to the rules."""
        return self.last.policy if self.last is not None else self.name

    def take_rows(self) -> list[AuditRow]:
        """The audit rows queued since the last call (LLM messages, refusals, fallbacks)."""
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def _secret(self, text: str) -> str:
        return redact(text, [self.settings.api_key])

    def _queue(self, table: str, content: dict[str, Any]) -> None:
        key = f"llm:{self._decisions}:{len(self._rows)}:{table}"
        clean = redact_data(content, [self.settings.api_key])
        self._rows.append(AuditRow(table, key, clean))

    def _message_row(
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
        self._queue(
            "llm_messages",
            {
                "model": self.settings.model,
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

    def _decision_row(
        self,
        kind: str,
        *,
        spectrum: str | None,
        point_pb: float | None,
        chosen: Any,
        rationale: str,
        gate: str,
        policy: str = "llm",
    ) -> None:
        self._queue(
            "decisions",
            {
                "kind": kind,
                "spectrum": spectrum,
                "point_pb": point_pb,
                "chosen": chosen if isinstance(chosen, str) else json.dumps(chosen, default=str),
                "policy": policy,
                "rationale": rationale,
                "gate": gate,
            },
        )

    # ---------------------------------------------------------------- the loop
    def _budget_left(self) -> None:
        if self.disabled_reason is not None:
            raise _Fallback(self.disabled_reason)
        if self.calls >= self.settings.max_calls:
            raise _Fallback(
                f"LLM call budget spent ({self.calls} of {self.settings.max_calls} calls)",
                disable=True,
            )
        if self.tokens >= self.settings.max_tokens:
            raise _Fallback(
                f"LLM token budget spent ({self.tokens} of {self.settings.max_tokens} tokens)",
                disable=True,
            )

    def _complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], kind: str
    ) -> tuple[str | None, list[dict[str, str]]]:
        """One request: the reply's text and tool calls, or `_Fallback` on any endpoint failure.

        The one place where whatever the endpoint does (no answer, an HTTP error, a body cut
        short, not JSON, the wrong shape) becomes a fallback to the rules with its reason.
        """
        self._budget_left()
        self.calls += 1
        started = time.perf_counter()
        try:
            reply = self._request(messages, tools)
        except (openai.APIError, httpx2.HTTPError, _BadReply) as error:
            self._endpoint_error(error, kind, time.perf_counter() - started)
        latency = time.perf_counter() - started
        self.consecutive_errors = 0
        usage = reply.usage
        prompt_tokens = usage.prompt_tokens if usage else None
        completion_tokens = usage.completion_tokens if usage else None
        total = usage.total_tokens if usage else None
        if total is None:
            total = sum(len(str(m.get("content") or "")) for m in messages) // 4
        self.tokens += total
        message = reply.choices[0].message
        calls = [
            {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
            for call in message.tool_calls or []
        ]
        kept = [{**call, "arguments": clip(call["arguments"], MAX_AUDIT_CHARS)} for call in calls]
        content = None if message.content is None else clip(message.content, MAX_AUDIT_CHARS)
        self._message_row(
            "assistant",
            {"content": content, "tool_calls": kept},
            kind=kind,
            tokens=total,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
            served_model=reply.model,
        )
        return message.content, calls

    def _request(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Completion:
        """Send the request, read at most MAX_REPLY_BYTES of the body and parse it strictly."""
        with self.client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
            model=self.settings.model,
            messages=messages,
            tools=tools,
            tool_choice="auto",
            temperature=self.settings.temperature,
        ) as response:
            content_type = str(response.headers.get("content-type", ""))
            body = _read_body(response.iter_bytes(), self.settings.timeout_s)
        return _parse_completion(body, content_type)

    def _endpoint_error(self, error: Exception, kind: str, latency: float) -> NoReturn:
        """Log why the endpoint failed (with the start of a bad body) and fall back at once."""
        self.consecutive_errors += 1
        detail = ""
        if isinstance(error, _BadReply):
            what = error.reason
            detail = "; " + _excerpt(error.body, complete=error.complete)
        elif isinstance(error, openai.APIStatusError):
            what = f"HTTP {error.status_code}: {clip(error.message, MAX_ERROR_CHARS)}"
            if isinstance(error.body, str) and error.body:  # not JSON: an HTML page, say
                detail = "; " + _excerpt(error.body.encode(), complete=True)
        elif isinstance(error, openai.APIError):
            cause = error.__cause__
            what = f"{type(error).__name__}: {error}"
            if cause is not None and str(cause):
                what += f" ({type(cause).__name__}: {clip(str(cause), MAX_ERROR_CHARS)})"
        else:
            said = clip(str(error), MAX_ERROR_CHARS)
            what = f"reading the reply failed ({type(error).__name__}: {said})"
        reason = self._secret(f"LLM endpoint error ({what}) after {latency:.2f} s")
        self._message_row("error", reason + self._secret(detail), kind=kind, latency_s=latency)
        disable = self.consecutive_errors >= max(1, self.settings.max_consecutive_errors)
        if disable:
            reason += (
                f"; {self.consecutive_errors} endpoint errors in a row: rules decide the "
                "rest of the scan"
            )
        raise _Fallback(reason, disable=disable) from None

    def _run_inspection(self, name: str, arguments: dict[str, Any]) -> str:
        tool = get_tool(name)
        validated = tool.input_model.model_validate(arguments)
        confine_paths(validated, [self.run_dir], self.declared_inputs)
        output = json.dumps(tool.call(arguments), default=str)
        if len(output) > MAX_TOOL_OUTPUT_CHARS:
            output = output[:MAX_TOOL_OUTPUT_CHARS] + " ... (truncated)"
        return output

    def _decide(
        self,
        kind: str,
        tool_name: str,
        data: dict[str, Any],
        check: Callable[[ProposalT], GateResult],
        rules: Callable[[], ProposalT],
        spectrum: str | None = None,
        point_pb: float | None = None,
    ) -> ProposalT:
        with self._lock:
            self._decisions += 1
            trace = DecisionTrace(kind)
            self.last = trace
            model, description = DECISION_TOOLS[tool_name]
            tools = [function_tool(tool_name, description, model), *inspection_tool_specs()]
            allowed = {tool_name, *INSPECTION_TOOLS}
            user = self.prompts.texts[kind] + "\n" + _data_block(data)
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": self.prompts.texts["system"]},
                {"role": "user", "content": user},
            ]
            self._message_row("system", messages[0]["content"], kind=kind)
            self._message_row("user", user, kind=kind)
            try:
                return self._converse(
                    kind,
                    tool_name,
                    model,
                    messages,
                    tools,
                    allowed,
                    check,
                    trace,
                    spectrum,
                    point_pb,
                )  # type: ignore[return-value]
            except _Fallback as fallback:
                if fallback.disable and self.disabled_reason is None:
                    self.disabled_reason = fallback.reason
                proposal = rules()
                trace.policy = "rules"
                trace.fallback_reason = fallback.reason
                self._decision_row(
                    f"{kind}:fallback",
                    spectrum=spectrum,
                    point_pb=point_pb,
                    chosen=proposal.model_dump(mode="json"),
                    rationale=f"fell back to rules: {fallback.reason}",
                    gate="fallback",
                    policy="llm",
                )
                return proposal

    def _converse(
        self,
        kind: str,
        tool_name: str,
        model: type[Proposal],
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        allowed: set[str],
        check: Callable[[Any], GateResult],
        trace: DecisionTrace,
        spectrum: str | None,
        point_pb: float | None,
    ) -> Proposal:
        while True:
            content, calls = self._complete(messages, tools, kind)
            trace.calls += 1
            messages.append(
                {
                    "role": "assistant",
                    "content": content,
                    **(
                        {
                            "tool_calls": [
                                {
                                    "id": c["id"],
                                    "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]},
                                }
                                for c in calls
                            ]
                        }
                        if calls
                        else {}
                    ),
                }
            )
            reasons: list[str] = []
            if not calls:
                reason = (
                    f"no tool call in the reply (text: {str(content)[:200]!r}); "
                    f"answer by calling {tool_name}"
                )
                reasons.append(reason)
                messages.append({"role": "user", "content": f"Refused: {reason}."})
                self._message_row("user", f"Refused: {reason}.", kind=kind)
            for call in calls:
                outcome, proposal = self._handle_call(call, tool_name, model, allowed, check)
                if proposal is not None:
                    self._decision_row(
                        f"{kind}:proposal",
                        spectrum=spectrum,
                        point_pb=point_pb,
                        chosen=proposal.model_dump(mode="json"),
                        rationale=proposal.rationale,
                        gate="passed",
                    )
                    return proposal
                if outcome.startswith("refused: "):
                    reasons.append(outcome.removeprefix("refused: "))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": outcome})
                self._message_row("tool", outcome, kind=kind)
            for reason in reasons:
                trace.rejections.append(reason)
                self._decision_row(
                    f"{kind}:rejected",
                    spectrum=spectrum,
                    point_pb=point_pb,
                    chosen=[clip(c["name"] + " " + c["arguments"], MAX_AUDIT_CHARS) for c in calls]
                    or (None if content is None else clip(content, MAX_AUDIT_CHARS)),
                    rationale=reason,
                    gate="refused",
                )
            if len(trace.rejections) > self.settings.max_rejections:
                raise _Fallback(
                    f"{len(trace.rejections)} proposals refused (limit "
                    f"{self.settings.max_rejections}); last: {trace.rejections[-1]}"
                )
            if trace.calls >= self.settings.max_rejections + 1 + MAX_INSPECTIONS:
                raise _Fallback(
                    f"no decision after {trace.calls} replies (at most {MAX_INSPECTIONS} "
                    "spent on read-only tools)"
                )

    def _handle_call(
        self,
        call: dict[str, str],
        tool_name: str,
        model: type[Proposal],
        allowed: set[str],
        check: Callable[[Any], GateResult],
    ) -> tuple[str, Proposal | None]:
        name = call["name"]
        if name not in allowed:
            return (
                f"refused: unknown tool {clip(name, 100)!r}; the tools are {sorted(allowed)}",
                None,
            )
        text = call["arguments"] or "{}"
        if nesting_depth(text) > MAX_NESTING:
            return (
                f"refused: the arguments of {name} are nested deeper than {MAX_NESTING} levels",
                None,
            )
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as error:
            return f"refused: the arguments of {name} are not valid JSON ({error})", None
        if not isinstance(arguments, dict):
            return f"refused: the arguments of {name} must be a JSON object", None
        if name != tool_name:
            try:
                return self._run_inspection(name, arguments), None
            except ValidationError as error:
                return f"refused: invalid arguments for {name}: {error}", None
            except PathConfinementError as error:
                return f"refused: {error}", None
            except AnomscanError as error:
                return f"tool {name} failed: {type(error).__name__}: {error}", None
        try:
            proposal = model.model_validate(arguments)
        except ValidationError as error:
            return f"refused: invalid arguments for {name}: {error}", None
        gate = check(proposal)
        if not gate.passed:
            return f"refused: the gates refused it: {gate.reason}", None
        return "accepted", proposal

    # ---------------------------------------------------------------- the Policy interface
    def initial_points(
        self, xsec_range: tuple[float, float], points_per_decade: int
    ) -> PointsProposal:
        """The first sweep's AR points: at most the scan's point budget (else the rules grid)."""
        reference = self.rules.initial_points(xsec_range, points_per_decade)
        budget = len(reference.points_pb) if self.point_budget is None else self.point_budget

        def check(proposal: PointsProposal) -> GateResult:
            return self._points_check(proposal, [], xsec_range, budget, need_points=True)

        data = {
            "xsec_range_pb": list(xsec_range),
            "points_per_decade": points_per_decade,
            "point_budget": budget,
        }
        return self._decide(
            "initial_points",
            "propose_points",
            data,
            check,
            lambda: reference,
        )

    def next_points(
        self, outcomes: list[PointOutcome], xsec_range: tuple[float, float], remaining: int
    ) -> PointsProposal:
        """Refinement points between scanned ones, or stop."""
        scanned = [outcome.point_pb for outcome in outcomes]

        def check(proposal: PointsProposal) -> GateResult:
            return self._points_check(proposal, scanned, xsec_range, remaining, need_points=False)

        data = {
            "xsec_range_pb": list(xsec_range),
            "remaining": remaining,
            "scanned": [outcome.model_dump(mode="json") for outcome in outcomes],
        }
        return self._decide(
            "next_points",
            "propose_points",
            data,
            check,
            lambda: self.rules.next_points(outcomes, xsec_range, remaining),
        )

    @staticmethod
    def _points_check(
        proposal: PointsProposal,
        scanned: Sequence[float],
        xsec_range: tuple[float, float],
        remaining: int,
        *,
        need_points: bool,
    ) -> GateResult:
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

    def accept_background(
        self, spectrum: str, point_pb: float, candidates: list[Candidate]
    ) -> BackgroundProposal:
        """The candidate to accept; the gates refuse one that did not pass every check."""

        def check(proposal: BackgroundProposal) -> GateResult:
            same = self._same_question(proposal.spectrum, proposal.point_pb, spectrum, point_pb)
            if not same.passed:
                return same
            return background_gate(proposal, candidates, {spectrum})

        data = {
            "spectrum": spectrum,
            "point_pb": point_pb,
            "candidates": [candidate.model_dump(mode="json") for candidate in candidates],
        }
        return self._decide(
            "accept_background",
            "accept_background",
            data,
            check,
            lambda: self.rules.accept_background(spectrum, point_pb, candidates),
            spectrum,
            point_pb,
        )

    def fallback(
        self,
        spectrum: str,
        point_pb: float,
        candidates: list[Candidate],
        n_in_range: int,
        fallbacks_left: int,
    ) -> FallbackProposal:
        """Whether to run the symbolic fallback; never when a candidate passed or none is left."""

        def check(proposal: FallbackProposal) -> GateResult:
            same = self._same_question(proposal.spectrum, proposal.point_pb, spectrum, point_pb)
            if not same.passed:
                return same
            if proposal.use_fallback and fallbacks_left <= 0:
                return GateResult(False, "the scan's fallback budget is spent")
            return fallback_gate(proposal, candidates)

        data = {
            "spectrum": spectrum,
            "point_pb": point_pb,
            "n_in_range": n_in_range,
            "min_events": FALLBACK_MIN_EVENTS,
            "fallbacks_left": fallbacks_left,
            "candidates": [candidate.model_dump(mode="json") for candidate in candidates],
        }
        return self._decide(
            "fallback",
            "decide_fallback",
            data,
            check,
            lambda: self.rules.fallback(spectrum, point_pb, candidates, n_in_range, fallbacks_left),
            spectrum,
            point_pb,
        )

    @staticmethod
    def _same_question(
        spectrum: str, point_pb: float, asked_spectrum: str, asked_point: float
    ) -> GateResult:
        if spectrum != asked_spectrum:
            return GateResult(
                False, f"spectrum {spectrum!r} is not the one asked about ({asked_spectrum!r})"
            )
        if abs(point_pb / asked_point - 1.0) > 1e-6 if asked_point else point_pb != asked_point:
            return GateResult(
                False, f"point {point_pb:g} pb is not the one asked about ({asked_point:g} pb)"
            )
        return GateResult(True, "same spectrum and point")
