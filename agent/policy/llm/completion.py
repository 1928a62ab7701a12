"""What the LLM policy accepts from its endpoint as a chat completion, read within bounds.

A reply's body is read up to MAX_REPLY_BYTES and within the timeout, must be declared as JSON,
be UTF-8, be nested at most MAX_NESTING deep (counted before parsing: json.loads raises
RecursionError near 1000 levels) and validate as a `Completion` with strict types. Anything
else raises `BadReply` saying what was wrong, with the body as read, which the client turns
into a fallback to the rules: an endpoint's reply can never crash the scan nor exhaust memory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.policy.llm.records import clip

MAX_REPLY_BYTES = 1_000_000
"""Bytes of a reply read at most: a longer one is an endpoint error (reading stops there)."""
MAX_NESTING = 64
"""Deepest JSON nesting (objects, arrays) parsed, in a reply and in tool-call arguments."""
MAX_BODY_EXCERPT_CHARS = 2_000
"""Characters of a body that was not a chat completion kept in the audit's error row."""
MAX_ERROR_CHARS = 500
"""Characters of an error message kept in a fallback reason."""


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


class BadReply(Exception):
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


def body_excerpt(body: bytes, *, complete: bool) -> str:
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


def read_body(chunks: Iterable[bytes], timeout_s: float) -> bytes:
    """The body from its chunks, at most MAX_REPLY_BYTES of it, within `timeout_s` seconds."""
    deadline = time.perf_counter() + timeout_s
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            raise BadReply(
                f"reply longer than {MAX_REPLY_BYTES} bytes (reading stopped there)",
                bytes(body),
                complete=False,
            )
        if time.perf_counter() > deadline:
            raise BadReply(
                f"reply body still arriving after {timeout_s:g} s", bytes(body), complete=False
            )
    return bytes(body)


def parse_completion(body: bytes, content_type: str) -> Completion:
    """A chat completion from a 200 reply's body, or `BadReply` saying what is wrong with it."""
    media = content_type.partition(";")[0].strip().lower()
    if not media.endswith(("/json", "+json")):
        raise BadReply(f"reply is not JSON (Content-Type {media or 'missing'!r})", body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadReply(f"reply is not UTF-8 text ({error})", body) from None
    if nesting_depth(text) > MAX_NESTING:
        raise BadReply(f"reply nested deeper than {MAX_NESTING} levels (not parsed)", body)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadReply(f"reply body is not valid JSON ({error})", body) from None
    if isinstance(data, dict) and "choices" not in data and "error" in data:
        said = clip(json.dumps(data["error"]), MAX_ERROR_CHARS)
        raise BadReply(f"reply is an error, not a completion ({said})", body)
    try:
        return Completion.model_validate(data)
    except ValidationError as error:
        summary = _validation_summary(error)
        raise BadReply(f"reply is not a chat completion ({summary})", body) from None
