"""A scripted fake OpenAI-compatible HTTP server on loopback, for the openai backend's tests.

`FakeOpenAI` serves POST /v1/chat/completions and /v1/completions (and GET /v1/models) from a thread
(stdlib http.server). Each endpoint has a queue of scripted replies, used in order; when the queue is
empty, the endpoint's handler (a function of the request body) answers, else 404. A reply is a `Reply`
(status, JSON body or raw bytes, headers, a delay that can outlast a client timeout) or a handler.
Every request is recorded (`requests`: path, headers, parsed body), so tests can count retries. Several
servers run side by side on ports of their own; `fail(reply)` makes one answer every request with a reply (an
error, a delay past the client's timeout, or a dropped connection: `Reply(drop=True)`) until `recover()`, and
`refuse()` closes its port so connections to it are refused.

Helpers build answers: `chat_answer`, `chat_logprobs_answer` (one logprob entry per character run),
and `EchoModel`, a completions handler that tokenises the prompt, echoes it with text offsets and lists
crafted top logprobs either OpenAI's way (shift 0) or llama.cpp's (shift 1: the distribution predicting
token i listed at entry i-1).
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from neuronscope.core.llm.prompts import SLOT

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: Any = None
    """A JSON-able object, or bytes sent as they are."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (longer than the client's timeout makes it time out)."""
    drop: bool = False
    """Close the connection without answering."""


@dataclass
class Request:
    """One request the server got."""

    path: str
    headers: dict[str, str]
    body: Any


Handler = Callable[[Any], Reply]


def error(status: int, message: str = "scripted failure", **headers: str) -> Reply:
    """An OpenAI-style error reply; `retry-after-ms` keeps the client's backoff short."""
    return Reply(status, {"error": {"message": message, "type": "server_error"}},
                 {"retry-after-ms": "10", **headers})


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_answer(*texts: str, usage_: dict[str, int] | None = None) -> Reply:
    """A chat completion with one choice per text."""
    body: dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    for i, t in enumerate(texts)],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return Reply(200, body)


def split_tokens(text: str) -> list[str]:
    """A toy tokenizer: words, single digits, and every other character on its own."""
    return re.findall(r"[A-Za-z]+|[0-9]|.|\n", text, flags=re.S)


def chat_logprobs_answer(lines: list[tuple[str, str]], dists: list[dict[str, float]],
                         usage_: dict[str, int] | None = None) -> Reply:
    """A chat completion writing `token<TAB>digit` lines, with logprobs: the digit of line k carries the
    top logprobs `dists[k]` (probabilities, turned into logprobs); every other token is certain."""
    content = []
    text = ""
    for k, (token, digit) in enumerate(lines):
        for piece in split_tokens(token) + ["\t"]:
            content.append({"token": piece, "logprob": 0.0, "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": piece, "logprob": 0.0, "bytes": None}]})
        tops = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in dists[k].items()]
        own = dists[k].get(digit, 1.0)
        content.append({"token": digit, "logprob": math.log(own), "bytes": None, "top_logprobs": tops})
        content.append({"token": "\n", "logprob": 0.0, "bytes": None, "top_logprobs": []})
        text += f"{token}\t{digit}\n"
    reply = chat_answer(text, usage_=usage_)
    reply.body["choices"][0]["logprobs"] = {"content": content}
    return reply


class EchoModel:
    """A completions handler echoing the prompt with top logprobs.

    Tokens come from `split_tokens`. The distribution "predicting" token i is: for the k-th slot `?`,
    `slot_dists[k]` (probabilities; the last one repeats); for a digit that follows a tab, the digit itself
    with probability 0.9 (the probe's repeated lines force them); else the token itself. It is listed at
    entry i - shift. `misalign` merges each slot with the tab before it (a server tokenising differently).
    `slot_dists` may instead be a function of (prompt, the slot's character offset): a model whose reading of a
    slot depends on its context, not on how many slots come before it in the prompt."""

    def __init__(self, slot_dists: list[dict[str, float]] | Callable[[str, int], dict[str, float]], shift: int = 0,
                 misalign: bool = False, top_n: int | None = None) -> None:
        self.slot_dists = slot_dists
        self.shift = shift
        self.misalign = misalign
        self.top_n = top_n
        self.prompts: list[str] = []

    def __call__(self, body: Any) -> Reply:
        if self.top_n is not None and body.get("logprobs", 0) > self.top_n:
            return error(400, f"logprobs must be <= {self.top_n}")
        prompt = body["prompt"]
        self.prompts.append(prompt)
        tokens = split_tokens(prompt)
        if self.misalign:
            merged: list[str] = []
            for t in tokens:
                if t == SLOT and merged and merged[-1] == "\t":
                    merged[-1] += t
                else:
                    merged.append(t)
            tokens = merged
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        predicting: list[dict[str, float]] = []
        slot = 0
        for i, t in enumerate(tokens):
            if t == SLOT and 0 < i < len(tokens) - 1 and tokens[i - 1] == "\t" and tokens[i + 1] == "\n":
                if callable(self.slot_dists):
                    predicting.append(self.slot_dists(prompt, offsets[i]))
                else:
                    predicting.append(self.slot_dists[min(slot, len(self.slot_dists) - 1)])
                slot += 1
            elif t.isdigit() and i > 0 and tokens[i - 1] == "\t":
                predicting.append({t: 0.9, "\n": 0.1})
            else:
                predicting.append({t: 1.0})
        tops: list[dict[str, float] | None] = []
        for i in range(len(tokens)):
            j = i + self.shift  # entry i lists the distribution predicting token i + shift
            dist = predicting[j] if j < len(tokens) else {"\n": 1.0}
            tops.append({t: math.log(p) for t, p in dist.items()})
        tops[0] = None
        logprobs = {"tokens": tokens + ["\n"], "text_offset": offsets + [len(prompt)],
                    "token_logprobs": [None] + [0.0] * len(tokens), "top_logprobs": tops + [{"\n": 0.0}]}
        return Reply(200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                           "choices": [{"index": 0, "text": prompt + "\n", "logprobs": logprobs,
                                        "finish_reason": "length"}],
                           "usage": usage(len(tokens), 1)})


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of clients connecting at once are queued, not dropped


class FakeOpenAI:
    """The server; use as a context manager. `url` is the base_url (`http://127.0.0.1:PORT/v1`)."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply | Handler]] = {CHAT: [], COMPLETIONS: []}
        self.handlers: dict[str, Handler] = {}
        self.requests: list[Request] = []
        #: While set, every POST is answered with this reply (scripts and handlers are left as they are).
        self.down: Reply | None = None
        self._closed = False
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") == "/v1/models":
                    self._send(Reply(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}))
                else:
                    self._send(error(404, "no such path"))

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                path = self.path.split("?")[0]
                reply = fake._next(Request(path, {k.lower(): v for k, v in self.headers.items()}, body))
                if callable(reply):
                    reply = reply(body)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    threading.Event().wait(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-openai", daemon=True)

    def _next(self, request: Request) -> Reply | Handler:
        with self._lock:
            self.requests.append(request)
            if self.down is not None:
                return self.down
            queue = self.script.get(request.path)
            if queue:
                return queue.pop(0)
            handler = self.handlers.get(request.path)
        return handler if handler is not None else error(404, f"nothing scripted for {request.path}")

    def add(self, path: str, *replies: Reply | Handler) -> FakeOpenAI:
        """Queue replies for an endpoint (CHAT or COMPLETIONS)."""
        with self._lock:
            self.script.setdefault(path, []).extend(replies)
        return self

    def on(self, path: str, handler: Handler) -> FakeOpenAI:
        """Answer an endpoint with `handler(body)` once its queue is empty."""
        self.handlers[path] = handler
        return self

    def hits(self, path: str) -> list[Request]:
        """The requests an endpoint got."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def count(self, path: str | None = None) -> int:
        """How many requests this server got (at one endpoint, or in all)."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def fail(self, reply: Reply) -> FakeOpenAI:
        """Answer every request with `reply` (e.g. `error(503)`, `Reply(delay=9)`, `Reply(drop=True)`) until
        `recover()`."""
        with self._lock:
            self.down = reply
        return self

    def recover(self) -> FakeOpenAI:
        """Answer from the scripts and handlers again."""
        with self._lock:
            self.down = None
        return self

    def refuse(self) -> FakeOpenAI:
        """Stop serving and close the port: connections to `url` are refused from now on."""
        self.__exit__()
        return self

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        with self._lock:  # kept-alive connections too: nothing answers any more
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
