"""The backend interface, the call log that audits and caches every LLM call, and backend specs.

A backend explains (prompt -> sentences) and simulates (explanation + excerpts -> an expected
0-9 value per token). Every exchange with a model goes through `Backend.call`, which looks the
request up in the call log first (a hit costs nothing), enforces the token budget, times the call
and records it. API keys never enter a request payload, so they never reach the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.llm.prompts import ExplainPrompt
from neuronscope.core.llm.rating import Item
from neuronscope.core.records import Call


class LLMError(NeuronscopeError):
    """A failed or unusable LLM exchange, as one line (recorded against the neuron; a job stops only when the same
    systematic failure hits several neurons in a row)."""

    #: Non-empty for a failure that will hit every neuron alike, naming its cause: "authentication", "permission",
    #: "not found", "unreachable". Empty for one that may pass (a timeout, a server error, a malformed answer).
    systematic: str = ""

    def __init__(self, message: str, *, systematic: str = "") -> None:
        super().__init__(message)
        self.systematic = systematic


class BudgetExceeded(Exception):
    """The job's token budget would be passed by the next call; the job stops cleanly."""


class CallLog:
    """An in-memory call log: cache by key, token accounting, an optional budget. The store-backed log
    (neuronscope.core.jobs.engine) subclasses it to persist calls; this one serves tests and one-off use."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.used_tokens = 0
        self.new_calls = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._memory: dict[str, str] = {}
        #: Requests being made now, by key: a thread asking for one waits for its answer instead of paying again.
        self._inflight: dict[str, threading.Event] = {}
        #: Caps the requests in flight across every backend and thread of a job (None: no cap).
        self.limiter: threading.Semaphore | None = None

    def lookup(self, key: str) -> str | None:
        """The cached response for a request key, if any."""
        return self._memory.get(key)

    def save(self, key: str, call: Call) -> None:
        """Keep a finished call (subclasses persist it)."""
        self._memory[key] = call.response

    def reserve(self, tokens: int) -> None:
        """Account for a call about to be made; BudgetExceeded if it would pass the budget."""
        with self._lock:
            if self.max_tokens is not None and self.used_tokens + tokens > self.max_tokens:
                raise BudgetExceeded(
                    f"token budget reached: {self.used_tokens:,} used, the next call needs about {tokens:,} more "
                    f"(--max-tokens {self.max_tokens:,})"
                )
            self.used_tokens += tokens

    def count(self, *, hit: bool) -> None:
        """Count a call answered from the log (hit) or made."""
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.new_calls += 1

    def settle(self, reserved: int, actual: int) -> None:
        """Replace a reservation by the call's actual token count."""
        with self._lock:
            self.used_tokens += actual - reserved

    def claim(self, key: str) -> threading.Event | None:
        """Take a request to make (None) or, when another thread is making the same request now, the event its
        answer sets: shuffled controls and resumed neurons ask for the same explanation at once, paid once."""
        with self._lock:
            if key in self._inflight:
                return self._inflight[key]
            self._inflight[key] = threading.Event()
            return None

    def release(self, key: str) -> None:
        """The claimed request is answered (saved) or failed: wake the threads waiting for it."""
        with self._lock:
            event = self._inflight.pop(key, None)
        if event is not None:
            event.set()

    def set_concurrency(self, limit: int | None) -> None:
        """Cap the requests in flight at once (None or 0: no cap)."""
        self.limiter = threading.BoundedSemaphore(limit) if limit else None


class Deferred:
    """A backend built when first used for more than its spec (`build` makes it): a job's simulator that the quotes
    mode names in its scores but never asks."""

    def __init__(self, spec: str, build: Callable[[], Backend]) -> None:
        self.spec = spec
        self._build = build

    def __getattr__(self, name: str) -> Any:  # (only for what is not set above)
        return getattr(self._build(), name)


def request_key(backend: str, revision: str, kind: str, payload: Any) -> str:
    """A stable cache key for a request: same backend, weights, kind and payload -> same key."""
    text = json.dumps([backend, revision, kind, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


#: Seeded samples asked for when a greedy explanation has no usable line (Backend.explain).
RETRY_SAMPLES = 3


class Backend(ABC):
    """An explainer and simulator. Subclasses implement `_explain` and `_simulate` through `call`."""

    #: The spec the user named, e.g. `local:qwen-1.5b`.
    spec: str
    #: Weights revision or server model id: part of every cache key.
    revision: str = ""
    #: Dollars per million (prompt, completion) tokens, where known.
    price: tuple[float, float] | None = None
    #: Built for a dry run without what its calls need (an API key; see `pricing_backends`): it lists requests and
    #: reads the call log, and refuses to call a model.
    pricing_only: bool = False

    def __init__(self) -> None:
        self.log = CallLog()

    def bind(self, log: CallLog) -> None:
        """Send this backend's calls through `log` (the job's store-backed log)."""
        self.log = log

    # -- the two operations -----------------------------------------------------------------------
    def explain(self, prompt: ExplainPrompt, n: int = 1, seed: int = 0) -> list[str]:
        """n explanations of a neuron (greedy when n == 1, else n seeded samples). A greedy answer with no usable
        line (empty, or single characters) is asked again as RETRY_SAMPLES seeded samples, the first usable one
        kept: a second call, logged and cached like the first."""
        def usable(answers: list[str]) -> list[str]:
            return [c for c in map(clean_explanation, answers) if c]

        texts = self._explain_texts(prompt, n, seed)
        cleaned = usable(texts)
        if not cleaned and n == 1:
            cleaned = usable(self._explain_texts(prompt, RETRY_SAMPLES, seed))[:1]
        if not cleaned:
            raise LLMError(f"{self.spec} returned no usable explanation (its answer began {texts[0][:60]!r})")
        return cleaned  # empty samples dropped: fewer than n candidates is fine

    def _explain_texts(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        """An explain request's raw answers (a dry run's backend answers from the log or with stand-ins)."""
        return self._explain(prompt, n, seed)

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """The expected activation (0-9 scale) at every token of every excerpt, given the explanation."""
        out = self._simulate(explanation, excerpts)
        for tokens, pred in zip(excerpts, out):
            if len(pred) != len(tokens):
                raise LLMError(f"{self.spec} simulated {len(pred)} values for {len(tokens)} tokens")
        return [np.asarray(p, np.float32) for p in out]

    def rate(self, task: str, explanation: str, items: Sequence[Item]) -> np.ndarray:
        """The expected rating (0-9) of every item for a rating task of neuronscope.core.llm.rating (detect, fuzz, token)."""
        out = self._rate(task, explanation, items) if items else []
        if len(out) != len(items):
            raise LLMError(f"{self.spec} rated {len(out)} excerpts of {len(items)}")
        return np.asarray(out, np.float32)

    @abstractmethod
    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]: ...

    @abstractmethod
    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]: ...

    @abstractmethod
    def _simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]: ...

    def requests(self, kind: str, *args: Any) -> list[tuple[Any, int, int]]:
        """The calls `explain(prompt, n, seed)`, `simulate(explanation, excerpts)` or `rate(task, explanation,
        items)` would make, as (payload or
        None when unknown, prompt tokens, completion tokens), for dry runs. This default estimates from text
        lengths; backends that know their payloads return them, so cached calls are recognised."""
        from neuronscope.core.llm.prompts import simulation_text

        if kind == "explain":
            prompt, n, _seed = args
            return [(None, self.count_tokens(prompt.text()), 48 * n)]
        if kind == "rate":
            from neuronscope.core.llm.rating import rating_text

            task, explanation, items = args
            return [(None, self.count_tokens(rating_text(task, explanation, items)), 4 * len(items))]
        explanation, excerpts = args
        return [(None, self.count_tokens(simulation_text(explanation, tokens).text), 2 * len(tokens))
                for tokens in excerpts]

    def is_cached(self, kind: str, payload: Any) -> bool:
        """Whether a request with this payload is in the call log."""
        return payload is not None and self.log.lookup(request_key(self.spec, self.revision, kind, payload)) is not None

    def count_tokens(self, text: str) -> int:
        """Tokens of a text in this backend's tokenizer (an estimate where it has none)."""
        return max(1, len(text) // 4)

    def context_tokens(self) -> int:
        """How many prompt tokens an explanation request may use."""
        return 6000

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release models or connections."""

    # -- calls through the log --------------------------------------------------------------------
    def call(self, kind: str, payload: Any, run: Callable[[], tuple[str, int, int]], *, estimate: int) -> str:
        """Answer a request from the log, or run it: `run()` returns (response, prompt tokens, completion
        tokens). `estimate` (tokens) is reserved against the budget before the call. The same request made by
        another thread at the same time is waited for, not made twice; the log's limiter caps the requests in
        flight (the budget is checked before waiting for a slot, so it is passed by at most the requests in flight)."""
        key = request_key(self.spec, self.revision, kind, payload)
        log = self.log
        while True:
            cached = log.lookup(key)
            if cached is not None:
                log.count(hit=True)
                return cached
            waiting = log.claim(key)
            if waiting is None:
                try:
                    cached = log.lookup(key)  # answered between our lookup and our claim?
                except BaseException:
                    log.release(key)
                    raise
                if cached is None:
                    break
                log.release(key)
                log.count(hit=True)
                return cached
            waiting.wait()  # then read its answer from the log, or make the request ourselves if it failed
        try:
            if self.pricing_only:
                raise LLMError(f"{self.spec} was built to count a dry run's calls and cannot make one")
            log.reserve(estimate)
            limiter = log.limiter
            if limiter is not None:
                limiter.acquire()
            start = time.perf_counter()
            try:
                response, prompt_tokens, completion_tokens = run()
            except BaseException:
                log.settle(estimate, 0)
                raise
            finally:
                if limiter is not None:
                    limiter.release()
            log.settle(estimate, prompt_tokens + completion_tokens)
            log.count(hit=False)
            prompt_text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            log.save(key, Call(self.spec, self.revision, kind, prompt_text, response, prompt_tokens,
                               completion_tokens, time.perf_counter() - start))
        finally:
            log.release(key)
        return response


def clean_explanation(text: str) -> str:
    """The first non-empty line of an answer, without a list marker, an `Explanation:` label or wrapping
    quotes; '' when nothing usable is left."""
    for line in text.strip().splitlines():
        line = re.sub(r"^(?:[-*#>]+|\d+[.)])\s+", "", line.strip())
        line = re.sub(r"^(?:explanation|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`" and line[0] not in line[1:-1]:
            line = line[1:-1].strip()
        if len(line) >= 2:
            return line[:2000]
    return ""


@dataclass(frozen=True)
class Spec:
    """A parsed backend spec."""

    kind: str
    """local, openai or baseline."""
    model: str
    """Model name ('' for baseline)."""
    urls: tuple[str, ...] = ()
    """Servers of an openai spec given as MODEL@URL1,URL2 (requests spread over them)."""
    revision: str = ""
    """A user's name for the weights behind an openai model (MODEL#REVISION): part of the cache keys."""

    @property
    def name(self) -> str:
        """The spec without its servers: what the call cache, the job's identity and the stored results name, so
        the same model resumes a job served anywhere."""
        if self.kind == "baseline":
            return "baseline"
        return f"{self.kind}:{self.model}" + (f"#{self.revision}" if self.revision else "")


BACKENDS = ("local", "openai", "baseline")


def parse_spec(spec: str) -> Spec:
    """`local:qwen-1.5b`, `openai:gpt-4o-mini`, `openai:MODEL#REVISION@http://host:port/v1,http://host2:port/v1`,
    `baseline`."""
    kind, _, rest = spec.partition(":")
    if kind == "baseline" and not rest:
        return Spec("baseline", "")
    if kind not in BACKENDS or not rest:
        raise LLMError(
            f"unknown backend {spec!r}: use local:MODEL (e.g. local:qwen-1.5b), openai:MODEL[#REVISION][@URL,...] "
            "or baseline"
        )
    if kind != "openai":
        return Spec(kind, rest)
    rest, at, servers = rest.partition("@")
    model, _, revision = rest.partition("#")
    urls = tuple(u.strip().rstrip("/") for u in servers.split(",")) if at else ()
    if not model or (at and not all(u.startswith(("http://", "https://")) for u in urls)) or (_ and not revision):
        raise LLMError(f"bad openai spec {spec!r}: write openai:MODEL[#REVISION]@http://HOST:PORT/v1[,http://HOST2:PORT/v1]")
    return Spec("openai", model, tuple(dict.fromkeys(urls)), revision)


def spec_name(spec: str) -> str:
    """A backend spec as results and job identities name it: Spec.name (servers left out)."""
    return parse_spec(spec).name


#: Set while a dry run builds its backends (`pricing_backends`).
_PRICING: ContextVar[bool] = ContextVar("neuronscope_pricing", default=False)


@contextmanager
def pricing_backends() -> Iterator[None]:
    """While active (in this thread), `make_backend` builds backends for a dry run, which counts requests and sends
    none: an openai spec needs no OPENAI_API_KEY then (pricing a job comes before having a key). Such a backend is
    `pricing_only` and refuses to call; the real run builds its own, and asks for the key."""
    token = _PRICING.set(True)
    try:
        yield
    finally:
        _PRICING.reset(token)


def make_backend(spec: str, *, device: str | None = None, dtype: str | None = None,
                 status: Callable[[str], None] | None = None) -> Backend:
    """Build the backend a spec names (models load here, lazily imported); in `pricing_backends`, an openai backend
    is built `pricing_only` (it needs no OPENAI_API_KEY)."""
    parsed = parse_spec(spec)
    if parsed.kind == "baseline":
        from neuronscope.core.llm.baseline import BaselineBackend

        return BaselineBackend()
    if parsed.kind == "local":
        from neuronscope.core.llm.local import LocalBackend

        return LocalBackend(parsed.model, spec=spec, device=device, dtype=dtype, status=status)
    from neuronscope.core.llm.openai_api import OpenAIBackend

    # Server options from the environment: a simulation route to force, a per-request timeout in seconds.
    mode = os.environ.get("NEURONSCOPE_OPENAI_MODE") or None
    timeout = os.environ.get("NEURONSCOPE_OPENAI_TIMEOUT")
    try:
        seconds = float(timeout) if timeout else 60.0
    except ValueError:
        raise LLMError(f"NEURONSCOPE_OPENAI_TIMEOUT={timeout!r} is not a number of seconds") from None
    return OpenAIBackend(parsed.model, spec=parsed.name, urls=parsed.urls, revision=parsed.revision, mode=mode,
                         timeout=seconds, pricing_only=_PRICING.get())
