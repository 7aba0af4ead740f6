"""A loopback OpenAI-compatible server that times its answers like a batching inference server, for bench/scale.py.

    python bench/loopback_server.py --latency 1 --per-token 20e-6 --capacity 64      # prints its URL, serves until killed

Every request takes a fixed latency plus a cost per prompt token, whatever the load, while at most `--capacity`
requests are being served; the ones beyond wait in a queue for a free slot (what a server batching up to C sequences
does). It answers:

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
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The toy tokenizer of tests/fake_openai.py: words, single digits, every other character on its own.
TOKEN = re.compile(r"[A-Za-z]+|[0-9]|.|\n", re.S)
#: The slot the client reads a digit distribution at.
SLOT = "?"
DIGITS = tuple(str(d) for d in range(10))
#: A listed token in an explainer prompt: `"tok" (9, 3x)`.
LISTED = re.compile(r'"((?:[^"\\]|\\.)*)" \(\d+, \d+x\)')
QUOTED = re.compile(r'"([^"\n]*)"')


def tokens_of(text: str) -> list[str]:
    return TOKEN.findall(text)


def _logprobs(probs: dict[str, float]) -> dict[str, float]:
    return {t: math.log(p) for t, p in probs.items()}


def digit_probs(level: int) -> dict[str, float]:
    """A distribution over the digits peaked at `level`."""
    weights = [math.exp(-abs(d - level)) for d in range(10)]
    total = sum(weights)
    return {str(d): w / total for d, w in enumerate(weights)}


#: Digit distributions by peak, as logprobs (built once; the echo lists the same objects many times).
DIGIT_LOGPROBS = [_logprobs(digit_probs(level)) for level in range(10)]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def quotes_in(text: str) -> set[str]:
    return {q.strip().casefold() for q in QUOTED.findall(text) if q.strip()}


def _level(token: str, quotes: set[str], salt: int) -> int:
    """The digit a line's token gets: high when the description quotes it, else low, varied by a hash."""
    if token.strip().casefold() in quotes:
        return 8 + salt % 2
    return salt % 3 if salt % 7 == 0 else 0


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


# -- answers ------------------------------------------------------------------------------------------------------

def explanation_for(prompt: str, salt: int) -> str:
    """A short explanation quoting one or two tokens the explainer's prompt lists (or words of it)."""
    question = prompt.rsplit("Tokens it fires on most", 1)[-1]
    listed = [t for t in dict.fromkeys(LISTED.findall(question)) if t.strip()]
    if not listed:
        listed = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]+", question))][:8] or ["the"]
    h = _hash(prompt) + salt
    first = listed[h % len(listed)]
    if len(listed) > 1 and (h >> 8) % 2:
        second = listed[(h // len(listed) + 1) % len(listed)]
        if second != first:
            return f'the words "{first}" and "{second}"'
    return f'the word "{first}"'


def _chat_piece(token: str, logprob: float, tops: dict[str, float] | None) -> dict[str, Any]:
    listed = tops if tops is not None else {token: logprob}
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in listed.items()]}


SIM_LINE = re.compile(r"^([^\n]*)\t\?$", re.M)
RATING_LINE = re.compile(r"^(?:Token|Excerpt): ([^\n]*)\nRating: \?$", re.M)


def _filled(user: str, quotes: set[str]) -> list[tuple[str, int]] | None:
    """(answer line before its digit, digit) for every slot of a chat simulation (`token<TAB>?` lines, answered
    with the same lines filled in) or rating (`Rating: ?` lines, answered with `Rating: d` lines); None if none."""
    lines = SIM_LINE.findall(user)
    if lines:
        return [(f"{t}\t", _level(t, quotes, _hash(t) + i)) for i, t in enumerate(lines)]
    items = RATING_LINE.findall(user)
    if items:
        out = []
        for i, item in enumerate(items):
            token = item[1:-1] if item.startswith('"') and item.endswith('"') else item
            level = _level(token, quotes, _hash(item) + i)
            if not level and any(q in item.casefold() for q in quotes):
                level = 7
            out.append(("Rating: ", level))
        return out
    return None


def chat_answer(body: dict[str, Any]) -> tuple[list[str], list[list[dict[str, Any]] | None], int]:
    """(texts of the choices, their logprob contents, prompt tokens) for a chat request."""
    messages = body.get("messages") or []
    contents = [str(m.get("content") or "") for m in messages if isinstance(m, dict)]
    user = next((str(m.get("content") or "") for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    prompt_tokens = sum(len(tokens_of(c)) for c in contents)
    with_logprobs = bool(body.get("logprobs"))
    n = max(1, int(body.get("n") or 1))
    seed = int(body.get("seed") or 0)
    description = user.rsplit("Description: ", 1)[-1].split("\n", 1)[0] if "Description: " in user else ""
    quotes = quotes_in(description)
    lines = _filled(user, quotes)
    if lines is not None:
        pieces: list[tuple[str, dict[str, float] | None]] = []
        for prefix, level in lines:
            pieces += [(t, None) for t in tokens_of(prefix)]
            pieces += [(str(level), DIGIT_LOGPROBS[level]), ("\n", None)]
        text = "".join(t for t, _ in pieces)
        content = [_chat_piece(t, tops[t] if tops else 0.0, tops) for t, tops in pieces] if with_logprobs else None
        return [text] * n, [content] * n, prompt_tokens
    if "Answer with one digit" in user:
        content = [_chat_piece("7", DIGIT_LOGPROBS[7]["7"], DIGIT_LOGPROBS[7])] if with_logprobs else None
        return ["7"] * n, [content] * n, prompt_tokens
    prompt = "\n".join(contents)
    texts = [explanation_for(prompt, seed + i) for i in range(n)]
    if with_logprobs:
        return texts, [[_chat_piece(t, 0.0, None) for t in tokens_of(x)] for x in texts], prompt_tokens
    return texts, [None] * n, prompt_tokens


def _entries(dist: dict[str, float]) -> str:
    """A top_logprobs dict as JSON, without its braces."""
    return json.dumps(dist, ensure_ascii=False)[1:-1]


#: Pieces of echo answers, serialised once: the entries of a token's own dict by token, of the digit distributions.
_OWN: dict[str, str] = {}
_DIGIT_ENTRIES = [_entries(d) for d in DIGIT_LOGPROBS]
_FORCED = {d: _entries({d: math.log(0.9), "\n": math.log(0.1)}) for d in DIGITS}
_PADS: dict[int, str] = {}


def _own(token: str) -> str:
    entries = _OWN.get(token)
    if entries is None:
        entries = _entries({token: 0.0})
        if len(_OWN) < 100_000:
            _OWN[token] = entries
    return entries


def _pad(k: int) -> str:
    if k not in _PADS:
        _PADS[k] = "".join(f', "<filler {j}>": -20.0' for j in range(k))
    return _PADS[k]


def echo_answer(body: dict[str, Any], pad_top: bool) -> tuple[str, int]:
    """(the logprobs object as JSON, prompt tokens) of an echo request. Serialised by hand from cached pieces: the
    answer is the bulk of the server's work, and json.dumps of thousands of small dicts costs more than the rest."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    prompt = str(prompt)
    asked = int(body.get("logprobs") or 0) if pad_top else 0
    tokens = tokens_of(prompt)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    # where each `Description: ` line starts, so a slot finds the explanation it is read under
    heads = [m.start() for m in re.finditer("Description: ", prompt)]
    head_index, quotes = -1, set[str]()
    tops = ["null"]
    last = len(tokens) - 1
    for i in range(1, len(tokens)):
        t = tokens[i]
        before = tokens[i - 1]
        if t == SLOT and before == "\t" and i < last and tokens[i + 1] == "\n":
            start = prompt.rfind("\n", 0, offsets[i]) + 1
            line_token = prompt[start:offsets[i] - 1]  # the line's token, less the tab
            k = head_index
            while k + 1 < len(heads) and heads[k + 1] < start:
                k += 1
            if k != head_index:
                head_index = k
                quotes = quotes_in(prompt[heads[k]:prompt.find("\n", heads[k])])
            entries, n = _DIGIT_ENTRIES[_level(line_token, quotes, _hash(line_token))], 10
        elif before == "\t" and t in DIGITS:
            entries, n = _FORCED[t], 2
        else:
            entries, n = _own(t), 1
        tops.append("{" + entries + (_pad(asked - n) if asked > n else "") + "}")
    tops.append('{"\\n": 0.0}')
    text = json.dumps(tokens + ["\n"], ensure_ascii=False)
    logprobs = (f'{{"tokens": {text}, "text_offset": {json.dumps(offsets + [len(prompt)])}, '
                f'"token_logprobs": [null{", 0.0" * len(tokens)}], "top_logprobs": [{", ".join(tops)}]}}')
    return logprobs, len(tokens)


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
