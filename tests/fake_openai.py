"""A tiny OpenAI-compatible chat server for tests: canned replies in, recorded requests out.

``serve(replies)`` starts a threaded stdlib HTTP server on 127.0.0.1 (a free port) that answers
``POST /v1/chat/completions``. Each request takes the next canned reply from the queue:

- a ``str``: an assistant message with that content;
- an ``int``: that HTTP error status with an OpenAI-style error body;
- a ``dict``: a full assistant ``message`` (``{"role": "assistant", "content": None, "tool_calls": [...]}``);
- a :class:`Reply` for anything else (a malformed body, extra headers).

``replies`` may also be a callable ``request_json -> reply``, for tests where requests arrive concurrently and
the reply must depend on the request rather than on the arrival order. Every request's JSON is recorded in
``server.requests`` in arrival order, and its HTTP headers in ``server.headers``. Streaming requests
(``"stream": true``) get the same reply as server-sent events. An exhausted queue answers 500 with
``x-should-retry: false``, so a test that asks too often fails at once.

Error replies carry ``retry-after-ms: 1``, so the OpenAI client's own HTTP retries cost no waiting.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass
class Reply:
    """A canned answer: ``body`` if set, else an error if ``status`` >= 400, else ``message``/``content``."""

    content: str | None = None
    message: dict[str, Any] | None = None
    status: int = 200
    body: str | None = None
    """Sent verbatim with status ``status`` (a malformed body when it is not a chat completion)."""
    headers: dict[str, str] = field(default_factory=dict)


ReplyLike = str | int | dict[str, Any] | Reply


def as_reply(value: ReplyLike) -> Reply:
    """The :class:`Reply` a shorthand (text, status or message dict) stands for."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, bool):
        raise TypeError("a canned reply cannot be a bool")
    if isinstance(value, str):
        return Reply(content=value)
    if isinstance(value, int):
        return Reply(status=value)
    if isinstance(value, dict):
        return Reply(message=value)
    raise TypeError(f"a canned reply must be str, int, dict or Reply, got {type(value).__name__}")


class FakeOpenAIServer:
    """The running server: ``base_url`` to point a client at, ``requests`` to inspect afterwards."""

    def __init__(self, replies: Iterable[ReplyLike] | Callable[[dict[str, Any]], ReplyLike]) -> None:
        self._respond = replies if callable(replies) else None
        self._queue: deque[ReplyLike] = deque() if callable(replies) else deque(replies)
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        """The HTTP headers of each request, in the order of ``requests``."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def remaining(self) -> int:
        """Canned replies not yet served."""
        with self._lock:
            return len(self._queue)

    def _next(self, request: dict[str, Any], headers: dict[str, str]) -> tuple[int, Reply]:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
            index = len(self.requests) - 1
            if self._respond is None and not self._queue:
                body = _error_body("fake server: no canned reply left", 500)
                return index, Reply(status=500, body=body, headers={"x-should-retry": "false"})
            value = self._respond(request) if self._respond is not None else self._queue.popleft()
        return index, as_reply(value)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@contextmanager
def serve(replies: Iterable[ReplyLike] | Callable[[dict[str, Any]], ReplyLike]) -> Iterator[FakeOpenAIServer]:
    """Run a :class:`FakeOpenAIServer` for the ``with`` block."""
    server = FakeOpenAIServer(replies)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _error_body(message: str, status: int) -> str:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


def _completion(message: dict[str, Any], model: str, index: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _chunks(message: dict[str, Any], model: str, index: int) -> Iterator[dict[str, Any]]:
    """The server-sent chunks of ``message``: role and content, each tool call, then the finish reason."""
    base = {"id": f"chatcmpl-fake-{index}", "object": "chat.completion.chunk", "created": 0, "model": model}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    for i, call in enumerate(message.get("tool_calls") or []):
        delta = {"tool_calls": [{"index": i, **call}]}
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass

        def _send(self, status: int, body: str, headers: dict[str, str], kind: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != CHAT_PATH:
                self._send(404, _error_body(f"no route {self.path}", 404), {}, "application/json")
                return
            try:
                request = json.loads(raw)
            except ValueError:
                self._send(400, _error_body("request body is not JSON", 400), {}, "application/json")
                return
            index, reply = server._next(request, {k.lower(): v for k, v in self.headers.items()})
            if reply.status >= 400 and reply.body is None:
                headers = {"retry-after-ms": "1", **reply.headers}
                body = _error_body(f"fake server error {reply.status}", reply.status)
                self._send(reply.status, body, headers, "application/json")
            elif reply.body is not None:
                self._send(reply.status, reply.body, reply.headers, "application/json")
            else:
                message = reply.message or {"role": "assistant", "content": reply.content}
                model = str(request.get("model", "fake"))
                if request.get("stream"):
                    events = "".join(f"data: {json.dumps(c)}\n\n" for c in _chunks(message, model, index))
                    self._send(200, events + "data: [DONE]\n\n", reply.headers, "text/event-stream")
                else:
                    body = json.dumps(_completion(message, model, index))
                    self._send(200, body, reply.headers, "application/json")

    return Handler
