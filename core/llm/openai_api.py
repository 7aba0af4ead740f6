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

Several servers may serve one model (`urls`): neuronscope.core.llm.openai_servers spreads the requests over them
and tries a failed one on the others. Cache keys name the spec without servers and the revision (the user's
`#REVISION`, else the model name): the same model answers from the log whichever host serves it. The API key
lives only in the clients (it goes to the server in the Authorization header): payloads, cache keys and log
records never contain it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import openai
import orjson

from neuronscope.core.llm.base import Backend, LLMError
from neuronscope.core.llm.openai_answers import (
    choices,
    message_text,
    read_chat_logprobs,
    read_echo,
    usage,
    value_lines,
)
from neuronscope.core.llm.openai_http import (
    HTTPError,
    price_of,
)
from neuronscope.core.llm.openai_probe import PROMPT_VERSION, RouteProbing
from neuronscope.core.llm.openai_servers import DUMMY_KEY, ServerRouting, ServerState
from neuronscope.core.llm.prompts import (
    ExplainPrompt,
    PackedText,
    packed_simulation_text,
    simulation_messages,
)
from neuronscope.core.llm.rating import Item, packed_rating_text, rating_messages

#: Where requests go without servers in the spec or OPENAI_BASE_URL.
OPENAI_URL = "https://api.openai.com/v1"
#: Routes for simulation.
MODES = ("echo", "chat-logprobs", "chat-digits")
#: Longest explanation asked for, in tokens.
MAX_EXPLAIN_TOKENS = 80
#: Sampling temperature when several explanations are asked for.
TEMPERATURE = 0.8
#: Requests in flight a job may keep by default: per OpenAI server (a paid API, asked politely), per other server
#: (a GPU server batches what it gets). NEURONSCOPE_CONCURRENCY overrides the total.
OPENAI_CONCURRENCY, SERVER_CONCURRENCY = 8, 64
#: Most tokens (estimated) in one packed echo prompt; NEURONSCOPE_OPENAI_PACK_TOKENS overrides it. Explanation
#: prompts take as many (Backend.context_tokens), so a server that explains can take them.
PACK_TOKENS = 6000
#: Threads one simulate call of a chat route uses at most (a job's neurons run side by side already).
CALL_THREADS = 32

T = TypeVar("T")
R = TypeVar("R")


def _env_int(name: str, value: int | None, default: int) -> int:
    """An explicit setting, else the environment's, else the default; at least 1."""
    text = os.environ.get(name)
    if value is None and text:
        try:
            value = int(text)
        except ValueError:
            raise LLMError(f"{name} must be an integer, not {text!r}") from None
    return max(1, int(value if value is not None else default))


class OpenAIBackend(RouteProbing, ServerRouting, Backend):
    """OpenAI-compatible servers of one model as explainer and simulator."""

    def __init__(self, model: str, *, spec: str, urls: Sequence[str] = (), revision: str = "",
                 mode: str | None = None, echo_shift: int | None = None, concurrency: int | None = None,
                 timeout: float = 60.0, max_retries: int = 4, top_logprobs: int = 20,
                 pack_tokens: int | None = None, pricing_only: bool = False) -> None:
        """`pricing_only`: for a dry run, which sends nothing, so OpenAI's API needs no key (Backend.pricing_only)."""
        super().__init__()
        self.pricing_only = pricing_only
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
        if not key and self.is_openai and not pricing_only:
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
        self._servers = [ServerState(url) for url in self.urls]
        self._local = threading.local()
        self._clients: list[openai.OpenAI] = []
        self._pool: ThreadPoolExecutor | None = None

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
            # When one fails (the budget, a cancel), those already running finish before this returns: their calls
            # are logged with the neuron's, not after the job's last commit, unlogged but counted in its tokens.
            wait(futures)

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

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for client in clients:
            client.close()
