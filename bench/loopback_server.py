"""A loopback OpenAI-compatible server that times its answers like a batching inference server, for bench/scale.py.

    python bench/loopback_server.py --latency 1 --per-token 20e-6 --capacity 64      # prints its URL, serves until killed

Every request takes a fixed latency plus a cost per prompt token, whatever the load, while at most `--capacity`
requests are being served; the ones beyond wait in a queue for a free slot (what a server batching up to C sequences
does). It answers (the answers are made in bench/loopback_answers.py):

* POST /v1/chat/completions: an explanation quoting one or two of the tokens the explainer's prompt lists
  (`"the" and " of"`), chosen by the prompt's hash; `token<TAB>?` and `Rating: ?` lines filled in with digits
  (with chat logprobs when asked for); "3 + 4 =" with 7. `n` choices where asked.
* POST /v1/completions with echo and logprobs: the prompt's tokens (words, single digits, every other character on its
  own, as tests/fake_openai.py tokenises) with text offsets and top logprobs: at a `?` slot after a tab a
  distribution over "0".."9" (high where the line's token is quoted in the prompt's last `Description:`), at a digit
  after a tab that digit (so the client's echo probe finds shift 0), elsewhere the token itself.
  `--pad-top` pads every entry to the number of logprobs asked for, as a real server sends them.
* GET /v1/models, and GET /stats: requests served by endpoint, prompt and completion tokens, seconds of service,
  the most requests served and queued at once.

Asyncio on HTTP/1.1 keep-alive, one process: hundreds of open connections cost little. `LoopbackServer` starts it
in a subprocess (so it does not share the client's GIL) and reads its counters. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopback_answers import chat_answer, echo_answer, tokens_of


@dataclass
class Settings:
    latency: float = 1.0
    """Seconds per request, whatever the load up to the capacity."""
    per_token: float = 20e-6
    """Seconds per prompt token, added to the latency."""
    capacity: int = 64
    """Requests served at once; the rest queue."""
    pad_top: bool = False
    """Pad every echoed top_logprobs entry to the number asked for."""


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    service_s: float = 0.0
    queue_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    queued: int = 0
    max_queued: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "total": sum(self.requests.values()),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "service_s": self.service_s, "queue_s": self.queue_s, "max_in_flight": self.max_in_flight,
                "max_queued": self.max_queued, "errors": self.errors, "now_in_flight": self.in_flight,
                "now_queued": self.queued}


# -- the server -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """An answer serialised already."""

    text: str


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.slots = asyncio.Semaphore(settings.capacity)

    async def serve(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Hold one of the capacity's slots for the request's service time (queueing when none is free)."""
        s, st = self.settings, self.stats
        st.queued += 1
        st.max_queued = max(st.max_queued, st.queued)
        waited = time.perf_counter()
        await self.slots.acquire()
        st.queued -= 1
        st.queue_s += time.perf_counter() - waited
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        service = s.latency + s.per_token * prompt_tokens
        try:
            await asyncio.sleep(service)
        finally:
            st.in_flight -= 1
            self.slots.release()
        st.requests[endpoint] = st.requests.get(endpoint, 0) + 1
        st.prompt_tokens += prompt_tokens
        st.completion_tokens += completion_tokens
        st.service_s += service

    async def answer(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "loopback", "object": "model"}]}
        if method == "GET" and path == "/stats":
            return 200, self.stats.as_dict()
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, {"error": {"message": f"no such path {method} {path}", "type": "invalid_request_error"}}
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as err:
            return 400, {"error": {"message": f"bad JSON: {err}", "type": "invalid_request_error"}}
        model = str(body.get("model") or "loopback")
        if path == "/v1/chat/completions":
            texts, contents, prompt_tokens = chat_answer(body)
            completion = sum(len(tokens_of(t)) for t in texts)
            await self.serve("chat", prompt_tokens, completion)
            return 200, {
                "id": "chatcmpl-loopback", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                             "logprobs": {"content": c} if c is not None else None}
                            for i, (t, c) in enumerate(zip(texts, contents))],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}
        if not body.get("echo"):
            prompt_tokens = len(tokens_of(str(body.get("prompt") or "")))
            await self.serve("completions", prompt_tokens, 1)
            return 200, {"id": "cmpl-loopback", "object": "text_completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "text": "\n", "logprobs": None, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                                   "total_tokens": prompt_tokens + 1}}
        logprobs, prompt_tokens = echo_answer(body, self.settings.pad_top)
        await self.serve("echo", prompt_tokens, 1)
        head = json.dumps({"id": "cmpl-loopback", "object": "text_completion", "created": 0, "model": model,
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                                     "total_tokens": prompt_tokens + 1}}, ensure_ascii=False)
        choice = json.dumps({"index": 0, "text": str(body.get("prompt")) + "\n", "finish_reason": "length"},
                            ensure_ascii=False)
        return 200, Raw(f'{head[:-1]}, "choices": [{choice[:-1]}, "logprobs": {logprobs}}}]}}')

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive connection: requests in turn until the client closes it."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, version = (lines[0].split(" ") + ["", "", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    raw = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        raw += chunk[:-2]
                else:
                    raw = await reader.readexactly(int(headers.get("content-length") or 0))
                try:
                    status, reply = await self.answer(method, path, raw)
                except Exception as err:  # noqa: BLE001 - a bench server answers 500 and keeps going
                    self.stats.errors += 1
                    status, reply = 500, {"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}}
                data = (reply.text if isinstance(reply, Raw) else json.dumps(reply, ensure_ascii=False)).encode()
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                             f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + data)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def main_async(settings: Settings, host: str, port: int) -> None:
    server = Server(settings)
    listener = await asyncio.start_server(server.connection, host, port, backlog=4096, limit=1 << 24)
    bound = listener.sockets[0].getsockname()
    print(f"READY http://{bound[0]}:{bound[1]}/v1", flush=True)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per request (default 1)")
    parser.add_argument("--per-token", type=float, default=20e-6, help="seconds per prompt token (default 20e-6)")
    parser.add_argument("--capacity", type=int, default=64, help="requests served at once; the rest queue (default 64)")
    parser.add_argument("--pad-top", action="store_true", help="pad echoed top logprobs to the number asked for")
    args = parser.parse_args()
    try:
        asyncio.run(main_async(Settings(args.latency, args.per_token, args.capacity, args.pad_top), args.host,
                               args.port))
    except KeyboardInterrupt:
        pass


class LoopbackServer:
    """The server in a subprocess; a context manager. `url` is the base URL (`http://127.0.0.1:PORT/v1`)."""

    def __init__(self, latency: float = 1.0, per_token: float = 20e-6, capacity: int = 64, pad_top: bool = False) -> None:
        self.settings = Settings(latency, per_token, capacity, pad_top)
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> LoopbackServer:
        s = self.settings
        command = [sys.executable, str(Path(__file__).resolve()), "--latency", str(s.latency), "--per-token",
                   str(s.per_token), "--capacity", str(s.capacity)] + (["--pad-top"] if s.pad_top else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.process.kill()
            raise RuntimeError(f"the loopback server did not start: {line!r}")
        self.url = line.split()[1]
        return self

    def stats(self) -> dict[str, Any]:
        """The server's counters now."""
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/stats", timeout=30) as reply:
            return dict(json.loads(reply.read()))

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used (Linux /proc), or nan."""
        if self.process is None:
            return math.nan
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return math.nan

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()


if __name__ == "__main__":
    main()
