"""The openai backend: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama) through the `openai` client.

Explanations come from chat completions (greedy for one, seeded samples for several). Simulation takes one
of three routes, chosen once per backend by probing the server (or named with `mode=`) and kept in `mode`:

* ``echo`` - the completions endpoint echoes the simulation prompt with the top logprobs of every prompt token.
  A simulate call's excerpts are packed into as few prompts as fit `pack_tokens` (estimated) tokens
  (neuronscope.core.llm.prompts.packed_simulation_text: instructions and example once, then each excerpt's
  `token<TAB>?` lines), one request per prompt. The token that starts at each slot's character offset
  (`logprobs.text_offset`) is located, and the distribution predicting it is read over the digits
  "0".."9", renormalised over the digits present, as an expected value (no digit among the top N: 0).
  Servers disagree on where that distribution is listed: OpenAI lists at entry i the distribution that
  predicted token i; llama-cpp-python lists there the one predicting token i+1 when the model adds no BOS
  token (it pairs the prompt tokens with the logits rows without skipping one). `echo_shift` (0 or 1:
  the distribution predicting token i is at entry i - shift) is measured by the echo probe: a prompt of
  repeated `word<TAB>digit` lines whose digits are forced by the repetition; the shift under which the
  listed distributions put most mass on those digits wins. An echo in which no token starts at a slot
  (the server tokenised the slot together with its neighbours) is an LLMError for the call: mixing
  routes inside one score would make scores incomparable, so the user picks `chat-logprobs` instead.
  Ratings (neuronscope.core.llm.rating) are read the same way, from `Rating:<TAB>?` slots of one echoed prompt.
* ``chat-logprobs`` - a chat model fills in the `token<TAB>digit` lines (neuronscope.core.llm.prompts.simulation_messages)
  with `logprobs`/`top_logprobs`; at each digit it wrote, the top logprobs over the digits give the
  expected value. Ratings: one `Rating: d` line per item.
* ``chat-digits`` - the same request without logprobs: the written digits are the values.

On the chat routes the excerpts of one simulate call go out in parallel (a thread pool of at most
`concurrency` workers); every request still goes through `Backend.call`, so the job's limiter caps them.

Several servers may serve one model (`urls`): each request goes to the server with the fewest requests in flight
(ties in turn), skipping servers that failed lately (a cool-down that doubles with each failure in a row). A
transient failure (timeout, dropped or refused connection, 408/409/429, 5xx) is tried on the other servers at
once; only when every server failed does the request back off and go round again (`max_retries` more rounds,
exponential backoff or the wait a server asks for). A request every server refuses twice (once with
`max_retries` 0) fails as systematic ("unreachable"), as do 401, 403 and 404, so a job against dead servers
or with a bad key stops within seconds (neuronscope.core.jobs.engine). Every failure ends as a one-line LLMError
naming the spec and the server, never a traceback. Cache keys name the spec without servers and the revision
(the user's `#REVISION`, else the model name): the same model answers from the log whichever host serves it.
The API key lives only in the clients (it goes to the server in the Authorization header): payloads, cache keys
and log records never contain it.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import openai
import orjson

from neuronscope.core.llm.base import Backend, LLMError, request_key
from neuronscope.core.llm.openai_answers import (
    choices,
    digit_dist,
    echo_logprobs,
    message_text,
    one_line,
    read_chat_logprobs,
    read_echo,
    token_starts,
    usage,
    value_lines,
)
from neuronscope.core.llm.openai_http import (
    BEARER,
    REFUSALS,
    REFUSED_TRIES,
    TRANSIENT_STATUSES,
    HTTPError,
    price_of,
    refused,
    retry_after,
)
from neuronscope.core.llm.prompts import (
    SLOT,
    ExplainPrompt,
    PackedText,
    packed_simulation_text,
    simulation_messages,
)
from neuronscope.core.llm.rating import Item, packed_rating_text, rating_messages

try:  # the openai client's HTTP library: httpx, or its fork httpx2 (openai 3)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef,import-not-found,unused-ignore]

#: Where requests go without servers in the spec or OPENAI_BASE_URL.
OPENAI_URL = "https://api.openai.com/v1"
#: Sent as the key to servers other than OpenAI's when OPENAI_API_KEY is unset (they ignore it).
DUMMY_KEY = "sk-no-key-required"
#: Routes for simulation.
MODES = ("echo", "chat-logprobs", "chat-digits")
#: Longest explanation asked for, in tokens.
MAX_EXPLAIN_TOKENS = 80
#: Sampling temperature when several explanations are asked for.
TEMPERATURE = 0.8
#: Bumped when the requests change, so cached answers to old requests are not reused.
PROMPT_VERSION = 2
#: The echo probe: lines repeated so that a model of any size predicts their digits from the repetition.
_PROBE_LINES = (("cat", 7), ("dog", 2), ("sun", 5), ("red", 0), ("map", 9), ("box", 3), ("pen", 6), ("cup", 1))
_PROBE_REPEATS = 3
#: Requests in flight a job may keep by default: per OpenAI server (a paid API, asked politely), per other server
#: (a GPU server batches what it gets). NEURONSCOPE_CONCURRENCY overrides the total.
OPENAI_CONCURRENCY, SERVER_CONCURRENCY = 8, 64
#: Most tokens (estimated) in one packed echo prompt; NEURONSCOPE_OPENAI_PACK_TOKENS overrides it. Explanation
#: prompts take as many (Backend.context_tokens), so a server that explains can take them.
PACK_TOKENS = 6000
#: Connections each thread's HTTP pool of a server may hold open (a chat route's simulate sends a call's excerpts
#: from one thread at once; the job's limiter caps the requests in flight).
POOL_CONNECTIONS = 64
#: Threads one simulate call of a chat route uses at most (a job's neurons run side by side already).
CALL_THREADS = 32
#: A server that failed a request is passed over for COOL_S seconds, doubled with each failure in a row up to COOL_MAX_S.
COOL_S, COOL_MAX_S = 1.0, 30.0

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Server:
    """One server of the backend, and what we know of its health."""

    url: str
    inflight: int = 0
    failures: int = 0
    """Requests failed in a row (transiently)."""
    cool_until: float = 0.0
    """time.monotonic() before which the server is tried only after the others."""


@dataclass
class _Failure:
    """A transient failure of one try: worth trying elsewhere or again."""

    kind: str
    """timeout, refused, connection or status."""
    url: str
    message: str
    """The one-line error, should this be the last try."""
    status: int = 0
    wait: float | None = None
    """The wait the server asked for."""


def _env_int(name: str, value: int | None, default: int) -> int:
    """An explicit setting, else the environment's, else the default; at least 1."""
    text = os.environ.get(name)
    if value is None and text:
        try:
            value = int(text)
        except ValueError:
            raise LLMError(f"{name} must be an integer, not {text!r}") from None
    return max(1, int(value if value is not None else default))


class OpenAIBackend(Backend):
    """OpenAI-compatible servers of one model as explainer and simulator."""

    def __init__(self, model: str, *, spec: str, urls: Sequence[str] = (), revision: str = "",
                 mode: str | None = None, echo_shift: int | None = None, concurrency: int | None = None,
                 timeout: float = 60.0, max_retries: int = 4, top_logprobs: int = 20,
                 pack_tokens: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        given = [u.strip().rstrip("/") for u in urls if u.strip()]
        #: The servers, in the order given (OPENAI_BASE_URL or OpenAI's when none is).
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(given or [(os.environ.get("OPENAI_BASE_URL")
                                                                     or OPENAI_URL).rstrip("/")]))
        self.base_url = self.urls[0]
        hosts = [urlparse(u).hostname == "api.openai.com" for u in self.urls]
        self.is_openai = any(hosts)
        key = os.environ.get("OPENAI_API_KEY") or ""
        if not key and self.is_openai:
            raise LLMError(f"{spec}: set OPENAI_API_KEY to use {OPENAI_URL} (or name another server: "
                           f"openai:MODEL@http://HOST:PORT/v1)")
        self._key = key or DUMMY_KEY
        # No URL in the revision: cache keys are the same whichever host serves the model.
        self.revision = revision or model
        self.price = price_of(model)
        if mode is not None and mode not in MODES:
            raise LLMError(f"{spec}: unknown simulation mode {mode!r}: use one of {', '.join(MODES)}")
        if echo_shift not in (None, 0, 1):
            raise LLMError(f"{spec}: echo_shift must be 0 or 1, not {echo_shift!r}")
        #: Simulation route (None until probed).
        self.mode: str | None = mode
        #: Where the echo lists the distribution predicting token i: at entry i - echo_shift (None until probed).
        self.echo_shift: int | None = echo_shift
        #: How many top logprobs to ask for; the probes lower it to 5 (OpenAI's completions limit) where a
        #: server refuses more.
        self.top_logprobs = top_logprobs
        self.echo_logprobs = top_logprobs
        self.chat_logprobs = top_logprobs
        #: Why the probe chose the route it chose.
        self.mode_reason = "named" if mode else ""
        #: Requests in flight a job should allow against these servers: OPENAI_CONCURRENCY per OpenAI server,
        #: SERVER_CONCURRENCY per other server, or NEURONSCOPE_CONCURRENCY (or `concurrency`) when set.
        self.default_concurrency = _env_int("NEURONSCOPE_CONCURRENCY", concurrency, sum(
            OPENAI_CONCURRENCY if openai_host else SERVER_CONCURRENCY for openai_host in hosts))
        #: Threads one simulate call of a chat route may use (at most CALL_THREADS).
        self.concurrency = self.default_concurrency
        #: Most tokens (estimated) in one packed echo prompt.
        self.pack_tokens = _env_int("NEURONSCOPE_OPENAI_PACK_TOKENS", pack_tokens, PACK_TOKENS)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._probe_lock = threading.Lock()
        self._lock = threading.Lock()
        self._turn = 0
        self._n_supported: bool | None = None
        # Retries are ours (`_send`): a refused connection fails fast, a timeout or server error goes elsewhere.
        self._servers = [_Server(url) for url in self.urls]
        self._local = threading.local()
        self._clients: list[openai.OpenAI] = []
        self._pool: ThreadPoolExecutor | None = None

    def _client(self, url: str) -> openai.OpenAI:
        """This thread's client of a server. Each thread has its own, with its own connection pool: threads sharing
        one pool queue on its lock (measured at 64 threads: 43 % of their time, bench/README.md)."""
        clients: dict[str, openai.OpenAI] = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            http = openai.DefaultHttpxClient(
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
                timeout=self.timeout)
            clients[url] = openai.OpenAI(api_key=self._key, base_url=url, timeout=self.timeout, max_retries=0,
                                         http_client=http)
            with self._lock:
                self._clients.append(clients[url])
        return clients[url]

    # -- HTTP ---------------------------------------------------------------------------------------
    def _post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a request body to chat/completions or completions on one of the servers; the parsed JSON answer.
        Every failure (after the retries) is a one-line LLMError."""
        text = self._send(endpoint, body)
        try:
            data = orjson.loads(text)  # an echo answer is large: the standard library takes 3 times as long
        except ValueError:
            try:  # servers written in Python may send -Infinity or NaN for a logprob, which orjson refuses
                data = json.loads(text)
            except ValueError:
                raise LLMError(f"{self.spec}: the server answered with malformed JSON: {self._scrub(text, 80)!r}") from None
        if not isinstance(data, dict):
            raise LLMError(f"{self.spec}: the server answered with JSON that is not an object: {self._scrub(text, 80)!r}")
        if isinstance(data.get("error"), (dict, str)) and not data.get("choices"):
            raise LLMError(f"{self.spec}: the server answered with an error: {self._scrub(data['error'])}")
        return data

    def _send(self, endpoint: str, body: dict[str, Any]) -> str:
        """The answer's text from the first server that gives one: each round tries every server once (the least
        busy first), then backs off; refusals everywhere fail fast as systematic."""
        count = len(self._servers)
        rounds = self.max_retries + 1
        refusals = [0] * count
        failure: _Failure | None = None
        for attempt in range(rounds):
            tried: set[int] = set()
            waits: list[float] = []
            while len(tried) < count:
                index = self._pick(tried)
                tried.add(index)
                outcome = self._attempt(index, endpoint, body)
                if isinstance(outcome, str):
                    return outcome
                failure = outcome
                if outcome.wait is not None:
                    waits.append(outcome.wait)
                if outcome.kind == "refused":
                    refusals[index] += 1
            if min(refusals) >= min(REFUSED_TRIES, rounds):
                detail = failure.message.split(" (connection refused): ", 1)[-1] if failure else ""
                where = ", ".join(self.urls)
                raise LLMError(f"{self.spec}: nothing answers at {where} (connection refused): start the server or "
                               f"fix the URL: {detail}", systematic="unreachable")
            if attempt + 1 < rounds:
                time.sleep(max(waits) if waits else min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.25))
        assert failure is not None
        message = failure.message + (f" (all {count} servers failed)" if count > 1 else "")
        if failure.kind == "status":
            raise HTTPError(message, failure.status)
        raise LLMError(message)

    def _pick(self, tried: set[int]) -> int:
        """The server to try next, not yet tried for this request: one not cooling down before one that is
        (the soonest to recover first), then the fewest requests in flight, then in turn; counted in flight."""
        with self._lock:
            now = time.monotonic()
            count = len(self._servers)
            start = self._turn
            self._turn = (start + 1) % count

            def rank(i: int) -> tuple[bool, float, int, int]:
                server = self._servers[i]
                cooling = server.cool_until > now
                return cooling, server.cool_until if cooling else 0.0, server.inflight, (i - start) % count

            best = min((i for i in range(count) if i not in tried), key=rank)
            self._servers[best].inflight += 1
            return best

    def _attempt(self, index: int, endpoint: str, body: dict[str, Any]) -> str | _Failure:
        """One try on one server: the answer's text, or a transient failure; an LLMError for a failure that
        another try would not mend."""
        server = self._servers[index]
        url = server.url
        client = self._client(url)
        resource: Any = client.chat.completions if endpoint == "chat" else client.completions
        failure: _Failure | None = None
        try:
            raw = resource.with_raw_response.create(**body, timeout=self.timeout)
            return self._redact(raw.http_response.text)  # a key a server echoes never reaches the log or store
        except openai.APITimeoutError:
            failure = _Failure("timeout", url, f"{self.spec}: no answer from {url} within {self.timeout:g} s, "
                                               f"after {self.max_retries} retries (timeout)")
        except openai.APIConnectionError as err:
            cause = self._scrub(err.__cause__ or err)
            if refused(err):
                failure = _Failure("refused", url, f"{self.spec}: nothing answers at {url} (connection refused): "
                                                   f"{cause}")
            else:
                failure = _Failure("connection", url, f"{self.spec}: cannot reach {url} after {self.max_retries} "
                                                      f"retries (connection error): {cause}")
        except openai.APIStatusError as err:
            status = int(err.status_code)
            if not (status in TRANSIENT_STATUSES or status >= 500):
                raise HTTPError(self._status_message(err, url), status) from None
            failure = _Failure("status", url, self._status_message(err, url), status, retry_after(err.response.headers))
        except openai.OpenAIError as err:
            raise LLMError(f"{self.spec}: {type(err).__name__} from {url}: {self._scrub(err)}") from None
        finally:
            self._settle(server, failure)
        return failure

    def _settle(self, server: _Server, failure: _Failure | None) -> None:
        """A try on `server` is over: out of flight; a failure cools the server down, anything else restores it."""
        with self._lock:
            server.inflight -= 1
            if failure is None:
                server.failures, server.cool_until = 0, 0.0
            else:
                server.failures += 1
                cool = min(COOL_MAX_S, COOL_S * 2 ** min(server.failures - 1, 16))
                server.cool_until = time.monotonic() + max(cool, failure.wait or 0.0)

    def _status_message(self, err: Any, url: str) -> str:
        status = int(err.status_code)
        detail = err.body
        if isinstance(detail, dict):
            detail = detail.get("error", detail)
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        detail = self._scrub(detail if detail else err.message)
        if status in (408, 409, 429) or status >= 500:
            reason = {408: "request timeout", 409: "conflict", 429: "rate limited"}.get(status, "server error")
            return f"{self.spec}: HTTP {status} from {url} after {self.max_retries} retries ({reason}): {detail}"
        reason = {400: "bad request", 401: "authentication failed: check OPENAI_API_KEY", 403: "permission denied",
                  404: "not found: check the model name and URL", 422: "request not accepted"}.get(status, "refused")
        return f"{self.spec}: HTTP {status} from {url} ({reason}): {detail}"

    def _redact(self, text: str) -> str:
        """Text from the server without the API key or any bearer token in it, should the server echo them."""
        if self._key != DUMMY_KEY:
            text = text.replace(self._key, "***")
        # The regex only where a bearer token may be: it costs ~10 ms on a 250 kB echo, the check a tenth of that.
        return BEARER.sub("Bearer ***", text) if "bearer" in text.lower() else text

    def _scrub(self, text: Any, limit: int = 200) -> str:
        """One line of an error text, redacted (before it is cut, so no part of a key survives the cut)."""
        return one_line(self._redact(str(text)), limit)

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items, in order; in parallel (up to `concurrency` threads, CALL_THREADS at most) when several."""
        if min(self.concurrency, len(items), CALL_THREADS) <= 1:
            return [fn(x) for x in items]
        with self._lock:  # one pool for the backend's life: its threads keep their HTTP clients (`_client`)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(self.concurrency, CALL_THREADS),
                                                thread_name_prefix="neuronscope-openai")
            pool = self._pool
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for future in futures:
                future.cancel()

    # -- dry runs -----------------------------------------------------------------------------------
    def requests(self, kind: str, *args: Any) -> list[tuple[Any, int, int]]:
        """The requests an operation would send, with their payloads where the route is known (named, probed,
        or its probes' verdicts in the call log); no request is made here. Before the route is known: estimates
        without payloads, one per excerpt for OpenAI's API (chat), else one per packed echo prompt."""
        if kind == "explain":
            prompt, n, seed = args
            return [(self._explain_payload(prompt, n, seed), self.count_tokens(prompt.text()), n * MAX_EXPLAIN_TOKENS)]
        mode = self._mode(peek=True)
        if kind == "rate":
            task, explanation, items = args
            if not items:
                return []
            if mode == "echo" or (mode is None and not self.is_openai):
                return [(self._echo_payload({"task": task}, p) if mode else None, p.tokens, 1)
                        for p in self._rating_prompts(task, explanation, items)]
            if mode is None:
                return super().requests(kind, *args)
            payload, prompt_tokens = self._chat_request({"task": task},
                                                        rating_messages(task, explanation, items), len(items),
                                                        mode == "chat-logprobs")
            return [(payload, prompt_tokens, 4 * len(items))]
        explanation, excerpts = args
        filled = [tokens for tokens in excerpts if len(tokens)]
        if not filled:
            return []
        if mode == "echo" or (mode is None and not self.is_openai):
            return [(self._echo_payload({}, p) if mode else None, p.tokens, 1)
                    for p in self._simulation_prompts(explanation, filled)]
        if mode is None:
            return super().requests(kind, explanation, filled)
        out: list[tuple[Any, int, int]] = []
        for tokens in filled:
            payload, prompt_tokens = self._chat_request({}, simulation_messages(explanation, tokens),
                                                        len(tokens), mode == "chat-logprobs")
            out.append((payload, prompt_tokens, 4 * len(tokens)))
        return out

    # -- explanation --------------------------------------------------------------------------------
    def _explain_payload(self, prompt: ExplainPrompt, n: int, seed: int) -> dict[str, Any]:
        sampled = n > 1
        return {"v": PROMPT_VERSION, "route": "chat", "model": self.model, "messages": prompt.messages(), "n": n,
                "seed": seed if sampled else 0, "temperature": TEMPERATURE if sampled else 0.0,
                "max_tokens": MAX_EXPLAIN_TOKENS}

    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        messages = prompt.messages()
        payload = self._explain_payload(prompt, n, seed)
        estimate = self.count_tokens(prompt.text()) + n * MAX_EXPLAIN_TOKENS
        answer = self.call("explain", payload, lambda: self._run_explain(messages, n, seed), estimate=estimate)
        return list(json.loads(answer))

    def _run_explain(self, messages: list[dict[str, str]], n: int, seed: int) -> tuple[str, int, int]:
        base = {"model": self.model, "messages": messages, "max_tokens": MAX_EXPLAIN_TOKENS}
        prompt_estimate = sum(self.count_tokens(m["content"]) for m in messages)
        if n == 1:
            data = self._post("chat", {**base, "temperature": 0.0, "seed": 0})
            texts = [message_text(self.spec, choices(self.spec, data, "explanation")[0], "explanation")]
            p, c = usage(data, prompt_estimate, self.count_tokens(texts[0]))
            return json.dumps(texts, ensure_ascii=False), p, c
        texts, p_total, c_total = [], 0, 0
        # Ask for n samples at once where the server honours n (OpenAI, vLLM); top up one seed at a time
        # where it returns fewer (llama.cpp).
        requests = [(n, seed)] if self._n_supported is not False else [(1, seed + i) for i in range(n)]
        while requests:
            count, s = requests.pop(0)
            body = {**base, "temperature": TEMPERATURE, "seed": s}
            if count > 1:
                body["n"] = count
            data = self._post("chat", body)
            got = [message_text(self.spec, c, "explanation") for c in choices(self.spec, data, "explanation")][:count]
            texts += got
            p, c = usage(data, prompt_estimate, sum(self.count_tokens(t) for t in got))
            p_total, c_total = p_total + p, c_total + c
            if count > 1:
                self._n_supported = len(got) >= count
                requests += [(1, seed + i) for i in range(len(got), count)]
        return json.dumps(texts, ensure_ascii=False), p_total, c_total

    # -- simulation ---------------------------------------------------------------------------------
    def _simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        if not excerpts:
            return []
        mode = self.choose_mode()
        if mode == "echo":
            filled = [i for i, tokens in enumerate(excerpts) if len(tokens)]
            prompts = self._simulation_prompts(explanation, [excerpts[i] for i in filled])
            answers = self._map(lambda p: self._echo_values("simulate", {}, p), prompts)
            values: list[list[float]] = [[] for _ in excerpts]
            for i, v in zip(filled, (v for answer in answers for v in answer)):
                values[i] = v
            return [np.asarray(v, np.float32) for v in values]
        with_logprobs = mode == "chat-logprobs"
        out = self._map(lambda tokens: self._simulate_chat(explanation, tokens, with_logprobs), list(excerpts))
        return [np.asarray(v, np.float32) for v in out]

    def _simulation_prompts(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[PackedText]:
        return packed_simulation_text(explanation, excerpts, self.pack_tokens, self.count_tokens)

    def _rating_prompts(self, task: str, explanation: str, items: Sequence[Item]) -> list[PackedText]:
        return packed_rating_text(task, explanation, items, self.pack_tokens, self.count_tokens)

    def _echo_payload(self, extra: dict[str, Any], prompt: PackedText) -> dict[str, Any]:
        return {"v": PROMPT_VERSION, **extra, "route": "echo", "model": self.model, "prompt": prompt.text,
                "logprobs": self.echo_logprobs, "echo_shift": self.echo_shift or 0}

    def _echo_values(self, kind: str, extra: dict[str, Any], prompt: PackedText) -> list[list[float]]:
        """The expected digit at every slot of a packed prompt, per excerpt (or item), from one echo request."""
        payload = self._echo_payload(extra, prompt)
        shift, logprobs = int(payload["echo_shift"]), int(payload["logprobs"])

        def run() -> tuple[str, int, int]:
            try:
                data = self._post("completions", self._echo_body(prompt.text, logprobs))
            except HTTPError as err:
                if err.status in (400, 413, 422) and not err.systematic:
                    raise HTTPError(f"{err} (the prompt packs {len(prompt.slots)} excerpts in about {prompt.tokens} "
                                    f"tokens: if that passes the server's context, lower "
                                    f"NEURONSCOPE_OPENAI_PACK_TOKENS from {self.pack_tokens})", err.status) from None
                raise
            flat = read_echo(self.spec, data, prompt.text, [s for slots in prompt.slots for s in slots], shift)
            values, at = [], 0
            for slots in prompt.slots:
                values.append(flat[at:at + len(slots)])
                at += len(slots)
            p, c = usage(data, prompt.tokens, 1)
            return json.dumps({"values": values}), p, c

        answer = json.loads(self.call(kind, payload, run, estimate=prompt.tokens + 1))
        return [[float(x) for x in v] for v in answer["values"]]

    def _echo_body(self, text: str, logprobs: int) -> dict[str, Any]:
        # max_tokens=1, not 0: llama.cpp reads 0 as "no limit", other servers refuse it; one generated token is
        # listed after the prompt's and ignored.
        return {"model": self.model, "prompt": text, "echo": True, "max_tokens": 1, "temperature": 0.0,
                "logprobs": logprobs}

    def _simulate_chat(self, explanation: str, tokens: Sequence[str], with_logprobs: bool) -> list[float]:
        if not tokens:
            return []
        return self._chat_values("simulate", {}, simulation_messages(explanation, tokens), len(tokens),
                                 with_logprobs)

    def _chat_request(self, extra: dict[str, Any], messages: list[dict[str, str]], count: int,
                      with_logprobs: bool) -> tuple[dict[str, Any], int]:
        """The payload of a chat request for `count` answer lines, and its prompt's tokens (estimated)."""
        payload: dict[str, Any] = {"v": PROMPT_VERSION, **extra,
                                   "route": "chat-logprobs" if with_logprobs else "chat-digits",
                                   "model": self.model, "messages": messages, "max_tokens": 8 * count + 32}
        if with_logprobs:
            payload["top_logprobs"] = self.chat_logprobs
        return payload, sum(self.count_tokens(m["content"]) for m in messages)

    def _chat_values(self, kind: str, extra: dict[str, Any], messages: list[dict[str, str]], count: int,
                     with_logprobs: bool) -> list[float]:
        """One digit per answer line, `count` lines: the expected digit from the top logprobs where the server
        gives them, else the digit written."""
        payload, prompt_estimate = self._chat_request(extra, messages, count, with_logprobs)
        max_tokens, top = int(payload["max_tokens"]), payload.get("top_logprobs")
        what = "simulation" if kind == "simulate" else "rating"

        def run() -> tuple[str, int, int]:
            body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                    "temperature": 0.0, "seed": 0}
            if with_logprobs:
                body.update(logprobs=True, top_logprobs=top)
            data = self._post("chat", body)
            choice = choices(self.spec, data, what)[0]
            if with_logprobs:
                answer, values = read_chat_logprobs(self.spec, choice, count)
            else:
                answer = message_text(self.spec, choice, what)
                values = [float(d) for _, d in value_lines(self.spec, answer, count)]
            p, c = usage(data, prompt_estimate, self.count_tokens(answer))
            return json.dumps({"answer": answer, "values": values}, ensure_ascii=False), p, c

        return list(json.loads(self.call(kind, payload, run, estimate=prompt_estimate + 4 * count))["values"])

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        """Ratings from one echoed prompt (the expected digit at each `Rating:<TAB>?` slot) on the echo route, else
        through chat (one `Rating: d` line per item, read from logprobs where the route has them)."""
        mode = self.choose_mode()
        if mode == "echo":
            prompts = self._rating_prompts(task, explanation, items)
            answers = self._map(lambda p: self._echo_values("rate", {"task": task}, p), prompts)
            return [v[0] for answer in answers for v in answer]
        return self._chat_values("rate", {"task": task}, rating_messages(task, explanation, items), len(items),
                                 mode == "chat-logprobs")

    # -- choosing the route -------------------------------------------------------------------------
    def choose_mode(self) -> str:
        """The simulation route: named, or probed once (echo, then chat logprobs, then plain digits)."""
        mode = self._mode(peek=False)
        assert mode is not None
        return mode

    def _mode(self, peek: bool) -> str | None:
        """The route, probing where needed; with `peek`, only from what is known already (named, probed, or the
        probes' verdicts in the call log), else None: no request is made."""
        with self._probe_lock:
            if self.mode == "echo" and self.echo_shift is None:
                verdict = self._probe_echo(peek)
                if verdict is None:
                    return None
                if not verdict[0]:
                    if peek:
                        return None
                    raise LLMError(f"{self.spec}: mode echo does not work with this server: {verdict[1]}")
            if self.mode is None:
                verdict = self._probe_echo(peek)
                if verdict is None:
                    return None
                ok, why = verdict
                if ok:
                    self.mode, self.mode_reason = "echo", why
                else:
                    verdict2 = self._probe_chat_logprobs(peek)
                    if verdict2 is None:
                        return None
                    ok2, why2 = verdict2
                    self.mode = "chat-logprobs" if ok2 else "chat-digits"
                    self.mode_reason = f"echo: {why}; chat logprobs: {why2}"
            return self.mode

    def _probe_request(self, what: str, payload: dict[str, Any], endpoint: str, body: dict[str, Any],
                       judge: Callable[[dict[str, Any]], dict[str, Any]], peek: bool = False) -> dict[str, Any] | None:
        """One probe through the call log: the verdict is cached, so a rerun routes the same way. A refusal
        (HTTP 4xx) is a verdict; a server failure (5xx, timeout) raises and is not cached. With `peek`: the
        cached verdict, or None."""
        full = {"v": PROMPT_VERSION, "probe": what, **payload}
        if peek:
            cached = self.log.lookup(request_key(self.spec, self.revision, "simulate", full))
            return None if cached is None else dict(json.loads(cached))

        def run() -> tuple[str, int, int]:
            try:
                data = self._post(endpoint, body)
            except HTTPError as err:
                if err.status in REFUSALS:
                    return json.dumps({"ok": False, "status": err.status,
                                       "why": str(err).removeprefix(f"{self.spec}: ")}), 0, 0
                raise
            verdict = judge(data)
            p, c = usage(data, self.count_tokens(json.dumps(body)), 1)
            return json.dumps(verdict), p, c

        return dict(json.loads(self.call("simulate", full, run, estimate=self.count_tokens(json.dumps(body)) + 2)))

    def _probe_echo(self, peek: bool = False) -> tuple[bool, str] | None:
        """Does the server echo prompt logprobs, and at which shift? Tries 20 top logprobs, then 5. None when
        peeking and the verdict is not in the log."""
        lines = [f"{w}\t{d}\n" for w, d in _PROBE_LINES] * _PROBE_REPEATS
        text = "".join(lines) + f"{_PROBE_LINES[0][0]}\t{SLOT}\n"
        digits, pos = [], 0
        for rep in range(_PROBE_REPEATS):
            for w, d in _PROBE_LINES:
                if rep > 0:  # from the second repetition on, the digits are forced by the first
                    digits.append((pos + len(w) + 1, str(d)))
                pos += len(w) + 3
        slot = len(text) - 2
        verdict: dict[str, Any] | None = {}
        for n in dict.fromkeys((self.top_logprobs, 5)):
            verdict = self._probe_request("echo", {"model": self.model, "prompt": text, "logprobs": n},
                                          "completions", self._echo_body(text, n),
                                          lambda data: self._judge_echo(data, digits, slot), peek)
            if verdict is None:
                return None
            if verdict["ok"]:
                self.echo_shift, self.echo_logprobs = int(verdict["shift"]), n
            if verdict.get("status") not in (400, 422):  # too many logprobs asked for: try 5 (OpenAI's limit)
                break
        assert verdict is not None
        return bool(verdict["ok"]), str(verdict["why"])

    def _judge_echo(self, data: dict[str, Any], digits: Sequence[tuple[int, str]], slot: int) -> dict[str, Any]:
        try:
            offsets, tops = echo_logprobs(self.spec, data)
        except LLMError as err:
            return {"ok": False, "why": str(err).split(": ", 1)[-1]}
        index = token_starts(offsets)
        if slot not in index or any(off not in index for off, _ in digits):
            return {"ok": False, "why": "the echoed tokens do not start at the digits and slots of the prompt"}
        scores = {}
        for shift in (0, 1):
            total = 0.0
            for off, digit in digits:
                entry = index[off] - shift
                top = tops[entry] if 0 <= entry < len(tops) else None
                dist = digit_dist(top) if top is not None else {}
                total += math.exp(dist[digit]) if digit in dist else 0.0
            scores[shift] = total / len(digits)
        best = max(scores, key=lambda s: scores[s])
        summary = f"P(forced digit) {scores[0]:.2f} at shift 0, {scores[1]:.2f} at shift 1"
        if scores[best] < 0.3 or scores[best] - scores[1 - best] < 0.2:
            return {"ok": False, "why": f"the echo probe is inconclusive ({summary})"}
        return {"ok": True, "shift": best, "why": f"echo with prompt logprobs, shift {best} ({summary})"}

    def _probe_chat_logprobs(self, peek: bool = False) -> tuple[bool, str] | None:
        messages = [{"role": "user", "content": "Answer with one digit: 3 + 4 ="}]
        verdict: dict[str, Any] | None = {}
        for n in dict.fromkeys((self.top_logprobs, 5)):
            body = {"model": self.model, "messages": messages, "max_tokens": 2, "temperature": 0.0,
                    "logprobs": True, "top_logprobs": n}
            verdict = self._probe_request("chat-logprobs", {"model": self.model, "top_logprobs": n}, "chat", body,
                                          self._judge_chat_logprobs, peek)
            if verdict is None:
                return None
            if verdict["ok"]:
                self.chat_logprobs = n
            if verdict.get("status") not in (400, 422):
                break
        assert verdict is not None
        return bool(verdict["ok"]), str(verdict["why"])

    def _judge_chat_logprobs(self, data: dict[str, Any]) -> dict[str, Any]:
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(content, list) and content and isinstance(content[0], dict) \
                and isinstance(content[0].get("top_logprobs"), list) and content[0]["top_logprobs"]:
            return {"ok": True, "why": "chat answers carry top_logprobs"}
        return {"ok": False, "why": "chat answers carry no top_logprobs"}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for client in clients:
            client.close()
