"""A real OpenAI-compatible chat-completions server on 127.0.0.1 that replays scripted replies.

The tests point the real `openai` client at it (no mocking of the client). Each request to
`/v1/chat/completions` takes the next reply of the script (or asks a `responder` function);
a reply is a tool call (arguments as a dict or as raw, possibly malformed, text), plain text,
an HTTP error (500, 429, 503), a slow answer (past the client's timeout), a dropped connection,
or any body sent as it is (`raw`: not JSON, truncated JSON, a wrong Content-Type, a completion
of the wrong shape, nesting thousands of levels deep) and a body cut short (`cut`: the
Content-Length announces more than is sent before the connection closes).
Every request body and its headers are kept in `requests` for the tests to inspect.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer of the server."""

    kind: str  # "tool", "text", "http", "drop", "raw", "cut"
    tool: str = ""
    arguments: str = ""
    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    prompt_tokens: int = 100
    completion_tokens: int = 20
    body: bytes = b""
    content_type: str = "application/json"
    declared_length: int | None = None
    pause_s: float = 0.0  # "raw": between the bytes of the body (a trickle)


def tool_call(name: str, arguments: dict[str, Any] | str, **extra: Any) -> Reply:
    """A reply calling tool `name`; a str is sent as it is (e.g. malformed JSON)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return Reply("tool", tool=name, arguments=text, **extra)


def text(content: str, **extra: Any) -> Reply:
    """A plain-text reply without a tool call (a refusal, chatter)."""
    return Reply("text", text=content, **extra)


def http_error(status: int, message: str = "scripted error") -> Reply:
    """An HTTP error status with an OpenAI-style error body."""
    return Reply("http", status=status, text=message)


def slow(reply: Reply, delay_s: float) -> Reply:
    """`reply`, sent after `delay_s` seconds."""
    return Reply(**{**reply.__dict__, "delay_s": delay_s})


def raw(body: str | bytes, content_type: str = "application/json", status: int = 200) -> Reply:
    """`body` sent as it is, with this Content-Type and status (JSON or not, any shape)."""
    data = body.encode() if isinstance(body, str) else body
    return Reply("raw", body=data, content_type=content_type, status=status)


def json_body(payload: Any, content_type: str = "application/json") -> Reply:
    """`payload` serialised as the whole body (a completion of the wrong shape, say)."""
    return raw(json.dumps(payload), content_type)


def cut(body: str | bytes, declared_length: int) -> Reply:
    """The start of `body`, a Content-Length of `declared_length`, then the connection closes."""
    data = body.encode() if isinstance(body, str) else body
    if declared_length <= len(data):
        raise ValueError(f"declared_length {declared_length} must exceed the {len(data)} bytes")
    return Reply("cut", body=data, declared_length=declared_length)


def completion(reply: Reply, model: str = "scripted", number: int = 1) -> dict[str, Any]:
    """The chat-completion JSON the server sends for a "tool" or "text" reply (to edit)."""
    return _completion({"model": model}, reply, number)


def trickle(body: str | bytes, pause_s: float) -> Reply:
    """`body` sent one byte at a time, `pause_s` seconds apart (each pause within the timeout)."""
    return Reply(**{**raw(body).__dict__, "pause_s": pause_s})


def request_data(body: dict[str, Any]) -> dict[str, Any]:
    """The numbers a request carried: the JSON inside <data> of its (first) user message."""
    user = next(m for m in body["messages"] if m["role"] == "user")["content"]
    parsed: dict[str, Any] = json.loads(user.split("<data>")[1].split("</data>")[0])
    return parsed


DROP = Reply("drop")
"""Close the connection without an answer."""

DEEP = 5000
"""Nesting of the deep replies: far past CPython's recursion limit for json.loads."""


def deep_json(depth: int = DEEP) -> str:
    """Valid JSON nested `depth` arrays deep."""
    return "[" * depth + "]" * depth


@functools.cache
def endpoint_failures(tool: str = "accept_background") -> dict[str, tuple[Reply, str]]:
    """Every way found for an endpoint to answer without a usable completion, by name.

    Each comes with the words the policy's audit must show for it; the policy must fall back
    to the rules at once on every one. `tool` names the tool in the (broken) calls.
    """
    good = completion(tool_call(tool, {}))
    body = json.dumps(good)

    def with_message(message: Any) -> Reply:
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        return json_body({**good, "choices": [choice]})

    def with_calls(calls: Any) -> Reply:
        return with_message({"role": "assistant", "content": None, "tool_calls": calls})

    huge = json.dumps(completion(text("x" * 20_000_000))).encode()
    not_choices = {key: value for key, value in good.items() if key != "choices"}
    return {
        "text-plain": (
            raw("upstream is warming up, try again", "text/plain"),
            "reply is not JSON (Content-Type 'text/plain')",
        ),
        "html": (
            raw("<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
            "reply is not JSON (Content-Type 'text/html')",
        ),
        "text-declared-json": (raw("Internal hiccup"), "reply body is not valid JSON"),
        "truncated-json": (raw(body[: len(body) // 2]), "reply body is not valid JSON"),
        "json-as-html": (raw(body, "text/html"), "Content-Type 'text/html'"),
        "json-as-octet-stream": (
            raw(body, "application/octet-stream"),
            "Content-Type 'application/octet-stream'",
        ),
        "not-utf8": (raw(b'{"choices": "\xff\xfe"}'), "reply is not UTF-8"),
        "missing-choices": (json_body(not_choices), "choices: Field required"),
        "empty-choices": (
            json_body({**good, "choices": []}),
            "choices: List should have at least 1",
        ),
        "null-message": (with_message(None), "choices.0.message: Input should be"),
        "tool-calls-not-a-list": (
            with_calls("call it"),
            "tool_calls: Input should be a valid list",
        ),
        "tool-call-wrong-types": (
            with_calls([{"id": 7, "type": "function", "function": "x"}]),
            "tool_calls.0.id: Input should be a valid string",
        ),
        "arguments-not-a-string": (
            with_calls(
                [{"id": "c1", "type": "function", "function": {"name": tool, "arguments": {}}}]
            ),
            "function.arguments: Input should be a valid string",
        ),
        "error-with-200": (
            json_body({"error": {"message": "model not loaded", "code": 503}}),
            "reply is an error, not a completion",
        ),
        "body-nested-5000": (
            raw('{"padding": ' + deep_json() + ", " + body[1:]),
            "reply nested deeper than 64 levels",
        ),
        "huge-20mb": (raw(huge), "reply longer than 1000000 bytes"),
        "closed-mid-body": (
            cut(body[:40], len(body)),
            "reading the reply failed (RemoteProtocolError",
        ),
        "dropped": (DROP, "APIConnectionError"),
        "http-500": (http_error(500), "HTTP 500"),
        "http-500-html": (raw("<html>Internal Server Error</html>", "text/html", 500), "HTTP 500"),
        "http-429": (http_error(429, "rate limited"), "HTTP 429"),
        "http-503": (http_error(503, "overloaded"), "HTTP 503"),
    }


def garbage_calls(tool: str = "accept_background") -> dict[str, tuple[Reply, str]]:
    """Well-formed completions whose tool call is garbage, by name, with the refusal's words.

    The policy sends each back to the model with the error, like any refused call.
    """
    return {
        "unknown-tool-broken-json": (
            tool_call("run_shell", '{"command": "rm -rf /", "args": [1, '),
            "unknown tool 'run_shell'",
        ),
        "arguments-nested-5000": (
            tool_call(tool, deep_json()),
            f"the arguments of {tool} are nested deeper than 64 levels",
        ),
    }


@dataclass
class ChatServer:
    """The scripted server; `url` is the base URL to give the client (ends in /v1)."""

    script: list[Reply] = field(default_factory=list)
    responder: Callable[[dict[str, Any]], Reply] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _calls: int = 0

    def next_reply(self, body: dict[str, Any]) -> Reply:
        """The scripted reply for this request (the responder when the script is spent)."""
        with self._lock:
            self.requests.append(body)
            self._calls += 1
            if self.script:
                return self.script.pop(0)
        if self.responder is not None:
            return self.responder(body)
        return http_error(500, "script exhausted: the test sent more requests than it scripted")

    def wait(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops."""
        self._stop.wait(seconds)


def _completion(body: dict[str, Any], reply: Reply, number: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish = "stop"
    if reply.kind == "tool":
        message["tool_calls"] = [
            {
                "id": f"call_{number}",
                "type": "function",
                "function": {"name": reply.tool, "arguments": reply.arguments},
            }
        ]
        finish = "tool_calls"
    else:
        message["content"] = reply.text
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout) leaves a broken pipe: expected, not an error."""
        if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            super().handle_error(request, client_address)


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def _send_bytes(self, reply: Reply) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(reply.declared_length or len(reply.body)))
            self.end_headers()
            if reply.pause_s:
                for byte in reply.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    server.wait(reply.pause_s)
            else:
                self.wfile.write(reply.body)
            if reply.kind == "cut":
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            server.headers.append({k.lower(): v for k, v in self.headers.items()})
            reply = server.next_reply(body)
            if reply.delay_s:
                server.wait(reply.delay_s)
            if reply.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.kind in ("raw", "cut"):
                self._send_bytes(reply)
                return
            if reply.kind == "http":
                error = {"message": reply.text, "type": "server_error", "code": reply.status}
                self._send(reply.status, {"error": error})
                return
            self._send(200, _completion(body, reply, len(server.requests)))

    return Handler


@contextmanager
def chat_server(
    script: list[Reply] | None = None, responder: Callable[[dict[str, Any]], Reply] | None = None
) -> Iterator[ChatServer]:
    """Start a ChatServer on a free port of 127.0.0.1 in a thread; stop it on exit."""
    state = ChatServer(script=list(script or []), responder=responder)
    httpd = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, name="chatserver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state._stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
