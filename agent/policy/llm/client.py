"""The LLM policy's chat-completions endpoint: its settings, the client, budgets and failures.

Any OpenAI-compatible endpoint with tool calling works (OpenAI, vLLM, llama.cpp server,
Ollama), through the `openai` SDK. The client makes no retries: a scan must not stall on an
endpoint, and the rules can always decide instead. So every failure falls back to the rules
at once: unreachable, a timeout, an HTTP error, a connection closed mid-body, or a body that
is not a chat completion (agent/policy/llm/completion.py); `ChatClient.complete` is the one
place that turns them into a `Fallback`, and logs why. `max_consecutive_errors` failures in a
row, or a spent budget of calls or tokens per scan, leave the rest of the scan to the rules.
The API key is never logged, stored or put in a message (`LLMSettings` hides it from repr).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx2  # the openai client's HTTP library: its errors surface while a body streams in
import openai

from agent.policy.llm.completion import (
    MAX_ERROR_CHARS,
    BadReply,
    Completion,
    body_excerpt,
    parse_completion,
    read_body,
)
from agent.policy.llm.records import MAX_AUDIT_CHARS, PolicyRecords, clip
from core.errors import InvalidInputError


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
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse negative limits, a timeout <= 0 and a base URL no client could reach."""
        for name in ("max_rejections", "max_calls", "max_tokens", "max_consecutive_errors"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"LLM limit {name} must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise InvalidInputError(f"LLM timeout must be > 0 s, got {self.timeout_s}")
        if self.base_url is not None:
            _check_base_url(self.base_url)

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


class Fallback(Exception):
    """Take the rules' decision, for `reason`; `disable`: for the rest of the scan too.

    Control flow inside the LLM policy: it never escapes the policy.
    """

    def __init__(self, reason: str, *, disable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.disable = disable


def describe_endpoint_error(error: Exception) -> tuple[str, str]:
    """What went wrong with a request, and the start of a bad body (or "") for the audit."""
    if isinstance(error, BadReply):
        return error.reason, "; " + body_excerpt(error.body, complete=error.complete)
    if isinstance(error, openai.APIStatusError):
        what = f"HTTP {error.status_code}: {clip(error.message, MAX_ERROR_CHARS)}"
        if isinstance(error.body, str) and error.body:  # not JSON: an HTML page, say
            return what, "; " + body_excerpt(error.body.encode(), complete=True)
        return what, ""
    if isinstance(error, openai.APIError):
        cause = error.__cause__
        what = f"{type(error).__name__}: {error}"
        if cause is not None and str(cause):
            what += f" ({type(cause).__name__}: {clip(str(cause), MAX_ERROR_CHARS)})"
        return what, ""
    said = clip(str(error), MAX_ERROR_CHARS)
    return f"reading the reply failed ({type(error).__name__}: {said})", ""


class ChatClient:
    """Requests to the endpoint within the scan's budgets; each reply or failure is recorded."""

    def __init__(
        self, settings: LLMSettings, records: PolicyRecords, client: openai.OpenAI | None = None
    ) -> None:
        self.settings = settings
        self.records = records
        self.openai = client or openai.OpenAI(
            api_key=settings.api_key or "unset",
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            max_retries=0,
        )
        self.calls = 0
        self.tokens = 0
        self.consecutive_errors = 0
        self.disabled_reason: str | None = None

    def stop_asking(self, reason: str) -> None:
        """Leave every later decision of the scan to the rules (the first reason is kept)."""
        if self.disabled_reason is None:
            self.disabled_reason = reason

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], kind: str
    ) -> tuple[str | None, list[dict[str, str]]]:
        """One request: the reply's text and tool calls, or `Fallback` on any endpoint failure.

        The one place where whatever the endpoint does (no answer, an HTTP error, a body cut
        short, not JSON, the wrong shape) becomes a fallback to the rules with its reason.
        """
        self._check_budgets()
        self.calls += 1
        started = time.perf_counter()
        try:
            reply = self._request(messages, tools)
        except (openai.APIError, httpx2.HTTPError, BadReply) as error:
            self._endpoint_error(error, kind, time.perf_counter() - started)
        latency = time.perf_counter() - started
        self.consecutive_errors = 0
        return self._record_reply(reply, messages, kind, latency)

    def _check_budgets(self) -> None:
        if self.disabled_reason is not None:
            raise Fallback(self.disabled_reason)
        if self.calls >= self.settings.max_calls:
            raise Fallback(
                f"LLM call budget spent ({self.calls} of {self.settings.max_calls} calls)",
                disable=True,
            )
        if self.tokens >= self.settings.max_tokens:
            raise Fallback(
                f"LLM token budget spent ({self.tokens} of {self.settings.max_tokens} tokens)",
                disable=True,
            )

    def _request(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Completion:
        """Send the request, read at most MAX_REPLY_BYTES of the body and parse it strictly."""
        with self.openai.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
            model=self.settings.model,
            messages=messages,
            tools=tools,
            tool_choice="auto",
            temperature=self.settings.temperature,
        ) as response:
            content_type = str(response.headers.get("content-type", ""))
            body = read_body(response.iter_bytes(), self.settings.timeout_s)
        return parse_completion(body, content_type)

    def _record_reply(
        self, reply: Completion, messages: list[dict[str, Any]], kind: str, latency: float
    ) -> tuple[str | None, list[dict[str, str]]]:
        """Count the reply's tokens (about 4 characters each when the endpoint does not say)."""
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
        self.records.message(
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

    def _endpoint_error(self, error: Exception, kind: str, latency: float) -> NoReturn:
        """Log why the endpoint failed (with the start of a bad body) and fall back at once."""
        self.consecutive_errors += 1
        what, detail = describe_endpoint_error(error)
        reason = self.records.redact(f"LLM endpoint error ({what}) after {latency:.2f} s")
        self.records.message(
            "error", reason + self.records.redact(detail), kind=kind, latency_s=latency
        )
        disable = self.consecutive_errors >= max(1, self.settings.max_consecutive_errors)
        if disable:
            reason += (
                f"; {self.consecutive_errors} endpoint errors in a row: rules decide the "
                "rest of the scan"
            )
        raise Fallback(reason, disable=disable) from None
