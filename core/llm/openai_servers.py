"""How the openai backend spreads its requests over several servers of one model, and tries them again
(mixed into neuronscope.core.llm.openai_api.OpenAIBackend).

Several servers may serve one model (`urls`): each request goes to the server with the fewest requests in flight
(ties in turn), skipping servers that failed lately (a cool-down that doubles with each failure in a row). A
transient failure (timeout, dropped or refused connection, 408/409/429, 5xx) is tried on the other servers at
once; only when every server failed does the request back off and go round again (`max_retries` more rounds,
exponential backoff or the wait a server asks for). A request every server refuses twice (once with
`max_retries` 0) fails as systematic ("unreachable"), as do 401, 403 and 404, so a job against dead servers
or with a bad key stops within seconds (neuronscope.core.jobs.engine). Every failure ends as a one-line LLMError
naming the spec and the server, never a traceback. Each thread has its own HTTP client per server.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any

import openai

from neuronscope.core.llm.base import LLMError
from neuronscope.core.llm.openai_answers import one_line
from neuronscope.core.llm.openai_http import (
    BEARER,
    REFUSED_TRIES,
    TRANSIENT_STATUSES,
    HTTPError,
    refused,
    retry_after,
)

try:  # the openai client's HTTP library: httpx, or its fork httpx2 (openai 3)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef,import-not-found,unused-ignore]

#: Sent as the key to servers other than OpenAI's when OPENAI_API_KEY is unset (they ignore it).
DUMMY_KEY = "sk-no-key-required"
#: Characters of the API key that an error text may not hold in a row (`_scrub`).
KEY_FRAGMENT = 6
#: Connections each thread's HTTP pool of a server may hold open (a chat route's simulate sends a call's excerpts
#: from one thread at once; the job's limiter caps the requests in flight).
POOL_CONNECTIONS = 64
#: The path of each endpoint under a server's base URL.
ROUTES = {"chat": "/chat/completions", "completions": "/completions"}
#: A server that failed a request is passed over for COOL_S seconds, doubled with each failure in a row up to COOL_MAX_S.
COOL_S, COOL_MAX_S = 1.0, 30.0


@dataclass
class ServerState:
    """One server of the backend, and what we know of its health."""

    url: str
    inflight: int = 0
    failures: int = 0
    """Requests failed in a row (transiently)."""
    cool_until: float = 0.0
    """time.monotonic() before which the server is tried only after the others."""


@dataclass
class Failure:
    """A transient failure of one try: worth trying elsewhere or again."""

    kind: str
    """timeout, refused, connection or status."""
    url: str
    message: str
    """The one-line error, should this be the last try."""
    status: int = 0
    wait: float | None = None
    """The wait the server asked for."""


class ServerRouting:
    """The backend's servers (`_servers`, with `urls`, `spec`, `_key`, `timeout`, `max_retries`, `_lock`, `_turn`,
    `_local` and `_clients` set by the backend): a request goes to one, and on a transient failure to the others."""

    spec: str
    urls: tuple[str, ...]
    timeout: float
    max_retries: int
    _key: str
    _servers: list[ServerState]
    _lock: Any
    _turn: int
    _local: Any
    _clients: list[openai.OpenAI]
    _tls: Any = None

    def _client(self, url: str) -> openai.OpenAI:
        """This thread's client of a server. Each thread has its own, with its own connection pool: threads sharing
        one pool queue on its lock (measured at 64 threads: 43 % of their time, bench/README.md)."""
        clients: dict[str, openai.OpenAI] = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            with self._lock:  # one TLS context for every thread: each costs ~30 ms of CPU to build
                if self._tls is None:
                    self._tls = httpx.create_ssl_context()
            http = openai.DefaultHttpxClient(
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
                timeout=self.timeout, verify=self._tls)
            clients[url] = openai.OpenAI(api_key=self._key, base_url=url, timeout=self.timeout, max_retries=0,
                                         http_client=http)
            with self._lock:
                self._clients.append(clients[url])
        return clients[url]

    def _send(self, endpoint: str, body: dict[str, Any]) -> str:
        """The answer's text from the first server that gives one: each round tries every server once (the least
        busy first), then backs off; refusals everywhere fail fast as systematic."""
        count = len(self._servers)
        rounds = self.max_retries + 1
        refusals = [0] * count
        failure: Failure | None = None
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

    def _attempt(self, index: int, endpoint: str, body: dict[str, Any]) -> str | Failure:
        """One try on one server: the answer's text, or a transient failure; an LLMError for a failure that
        another try would not mend."""
        server = self._servers[index]
        url = server.url
        client = self._client(url)
        failure: Failure | None = None
        try:
            # The body as it is: the SDK's typed `create` walks it to transform it (a third of a quotes job's
            # client CPU at 64 requests in flight), which plain JSON of ours never needs.
            raw = client.post(ROUTES[endpoint], cast_to=httpx.Response, body=body, options={"timeout": self.timeout})
            return self._redact(raw.text)  # a key a server echoes never reaches the log or store
        except openai.APITimeoutError:
            failure = Failure("timeout", url, f"{self.spec}: no answer from {url} within {self.timeout:g} s, "
                                               f"after {self.max_retries} retries (timeout)")
        except openai.APIConnectionError as err:
            cause = self._scrub(err.__cause__ or err)
            if refused(err):
                failure = Failure("refused", url, f"{self.spec}: nothing answers at {url} (connection refused): "
                                                   f"{cause}")
            else:
                failure = Failure("connection", url, f"{self.spec}: cannot reach {url} after {self.max_retries} "
                                                      f"retries (connection error): {cause}")
        except openai.APIStatusError as err:
            status = int(err.status_code)
            if not (status in TRANSIENT_STATUSES or status >= 500):
                raise HTTPError(self._status_message(err, url), status) from None
            failure = Failure("status", url, self._status_message(err, url), status, retry_after(err.response.headers))
        except openai.OpenAIError as err:
            raise LLMError(f"{self.spec}: {type(err).__name__} from {url}: {self._scrub(err)}") from None
        finally:
            self._settle(server, failure)
        return failure

    def _settle(self, server: ServerState, failure: Failure | None) -> None:
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
        """One line of an error text, redacted (before it is cut, so no part of a key survives the cut), without
        any run of KEY_FRAGMENT or more characters of the key either: a server may echo a key partly masked or cut
        (`sk-abc***xyz`), and the error is stored with the job."""
        text = self._redact(str(text))[: 4 * limit]
        key = self._key
        if key != DUMMY_KEY and len(key) > KEY_FRAGMENT:
            hidden = bytearray(len(text))
            for i in range(len(key) - KEY_FRAGMENT + 1):
                at = text.find(key[i:i + KEY_FRAGMENT])
                while at >= 0:
                    hidden[at:at + KEY_FRAGMENT] = b"\1" * KEY_FRAGMENT
                    at = text.find(key[i:i + KEY_FRAGMENT], at + 1)
            if any(hidden):
                text = re.sub("\0+", "***", "".join("\0" if h else c for c, h in zip(text, hidden)))
        return one_line(text, limit)
