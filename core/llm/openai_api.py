"""The openai backend: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama) through the `openai` client.

Explanations come from chat completions (greedy for one, seeded samples for several). Simulation takes one
of three routes, chosen once per backend by probing the server (or named with `mode=`) and kept in `mode`:

* ``echo`` - the completions endpoint echoes the simulation prompt (neuronscope.core.llm.prompts.simulation_text) with
  the top logprobs of every prompt token. The token that starts at each slot's character offset
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
* ``chat-logprobs`` - a chat model fills in the `token<TAB>digit` lines (neuronscope.core.llm.prompts.simulation_messages)
  with `logprobs`/`top_logprobs`; at each digit it wrote, the top logprobs over the digits give the
  expected value.
* ``chat-digits`` - the same request without logprobs: the written digits are the values.

The excerpts of one simulate call go out in parallel (a thread pool of `concurrency` workers, default 8,
or NEURONSCOPE_CONCURRENCY); each still goes through `Backend.call`, so calls to the log may be
concurrent: the in-memory CallLog is thread-safe, and a store-backed log must serialise its own writes.

Retries are ours (`max_retries`, exponential backoff, or the wait a server asks for): 429, 408/409, 5xx,
timeouts and dropped connections are retried; a refused connection is tried twice and then reported as
systematic ("unreachable"), as are 401, 403 and 404, so a job against a dead server or with a bad key stops
within seconds (neuronscope.core.jobs.engine). Every failure ends as a one-line LLMError naming the spec,
never a traceback. The API
key lives only in the client (it goes to the server in the Authorization header): payloads, cache keys
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
from typing import Any
from urllib.parse import urlparse

import numpy as np
import openai

from neuronscope.core.llm.base import Backend, LLMError
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
from neuronscope.core.llm.prompts import SLOT, ExplainPrompt, simulation_messages, simulation_text
from neuronscope.core.llm.rating import Item, rating_messages

#: Where requests go without a base_url in the spec or OPENAI_BASE_URL.
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
PROMPT_VERSION = 1
#: The echo probe: lines repeated so that a model of any size predicts their digits from the repetition.
_PROBE_LINES = (("cat", 7), ("dog", 2), ("sun", 5), ("red", 0), ("map", 9), ("box", 3), ("pen", 6), ("cup", 1))
_PROBE_REPEATS = 3


class OpenAIBackend(Backend):
    """An OpenAI-compatible server as explainer and simulator."""

    def __init__(self, model: str, *, spec: str, base_url: str | None = None, mode: str | None = None,
                 echo_shift: int | None = None, concurrency: int | None = None, timeout: float = 60.0,
                 max_retries: int = 4, top_logprobs: int = 20) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.is_openai = urlparse(self.base_url).hostname == "api.openai.com"
        key = os.environ.get("OPENAI_API_KEY") or ""
        if not key and self.is_openai:
            raise LLMError(f"{spec}: set OPENAI_API_KEY to use {self.base_url} (or name another server: "
                           f"openai:MODEL@http://HOST:PORT/v1)")
        self._key = key or DUMMY_KEY
        self.revision = model if self.is_openai else f"{model}@{self.base_url}"
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
        env = os.environ.get("NEURONSCOPE_CONCURRENCY")
        try:
            self.concurrency = max(1, int(concurrency if concurrency is not None else (env or 8)))
        except ValueError:
            raise LLMError(f"NEURONSCOPE_CONCURRENCY must be an integer, not {env!r}") from None
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._probe_lock = threading.Lock()
        self._n_supported: bool | None = None
        # Retries are ours (`_post`): a refused connection fails fast, a timeout or server error backs off.
        self.client = openai.OpenAI(api_key=self._key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    # -- HTTP ---------------------------------------------------------------------------------------
    def _post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a request body to chat/completions or completions; the parsed JSON answer. Every failure
        (after the client's retries) is a one-line LLMError."""
        resource: Any = self.client.chat.completions if endpoint == "chat" else self.client.completions
        text = ""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            wait: float | None = None
            try:
                raw = resource.with_raw_response.create(**body, timeout=self.timeout)
                text = self._redact(raw.http_response.text)  # a key a server echoes never reaches the log or store
                break
            except openai.APITimeoutError:
                if last:
                    raise LLMError(f"{self.spec}: no answer within {self.timeout:g} s, "
                                   f"after {self.max_retries} retries (timeout)") from None
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                if refused(err) and (last or attempt + 1 >= REFUSED_TRIES):
                    raise LLMError(f"{self.spec}: nothing answers at {self.base_url} (connection refused): start the "
                                   f"server or fix the URL: {self._scrub(cause)}", systematic="unreachable") from None
                if last:
                    raise LLMError(f"{self.spec}: cannot reach {self.base_url} after {self.max_retries} retries "
                                   f"(connection error): {self._scrub(cause)}") from None
            except openai.APIStatusError as err:
                status = int(err.status_code)
                if last or not (status in TRANSIENT_STATUSES or status >= 500):
                    raise HTTPError(self._status_message(err), status) from None
                wait = retry_after(err.response.headers)
            except openai.OpenAIError as err:
                raise LLMError(f"{self.spec}: {type(err).__name__}: {self._scrub(err)}") from None
            time.sleep(wait if wait is not None else min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.25))
        try:
            data = json.loads(text)
        except ValueError:
            raise LLMError(f"{self.spec}: the server answered with malformed JSON: {self._scrub(text, 80)!r}") from None
        if not isinstance(data, dict):
            raise LLMError(f"{self.spec}: the server answered with JSON that is not an object: {self._scrub(text, 80)!r}")
        if isinstance(data.get("error"), (dict, str)) and not data.get("choices"):
            raise LLMError(f"{self.spec}: the server answered with an error: {self._scrub(data['error'])}")
        return data

    def _status_message(self, err: Any) -> str:
        status = int(err.status_code)
        detail = err.body
        if isinstance(detail, dict):
            detail = detail.get("error", detail)
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        detail = self._scrub(detail if detail else err.message)
        if status in (408, 409, 429) or status >= 500:
            reason = {408: "request timeout", 409: "conflict", 429: "rate limited"}.get(status, "server error")
            return f"{self.spec}: HTTP {status} after {self.max_retries} retries ({reason}): {detail}"
        reason = {400: "bad request", 401: "authentication failed: check OPENAI_API_KEY",
                  403: "permission denied", 404: "not found: check the model name and URL",
                  422: "request not accepted"}.get(status, "refused")
        return f"{self.spec}: HTTP {status} ({reason}): {detail}"

    def _redact(self, text: str) -> str:
        """Text from the server without the API key or any bearer token in it, should the server echo them."""
        if self._key != DUMMY_KEY:
            text = text.replace(self._key, "***")
        return BEARER.sub("Bearer ***", text)

    def _scrub(self, text: Any, limit: int = 200) -> str:
        """One line of an error text, redacted (before it is cut, so no part of a key survives the cut)."""
        return one_line(self._redact(str(text)), limit)


    # -- explanation --------------------------------------------------------------------------------
    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        messages = prompt.messages()
        sampled = n > 1
        payload = {"v": PROMPT_VERSION, "route": "chat", "model": self.model, "messages": messages, "n": n,
                   "seed": seed if sampled else 0, "temperature": TEMPERATURE if sampled else 0.0,
                   "max_tokens": MAX_EXPLAIN_TOKENS}
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
        one: Callable[[Sequence[str]], list[float]]
        if mode == "echo":
            one = lambda tokens: self._simulate_echo(explanation, tokens)  # noqa: E731
        else:
            one = lambda tokens: self._simulate_chat(explanation, tokens, mode == "chat-logprobs")  # noqa: E731
        if len(excerpts) <= 1 or self.concurrency == 1:
            return [np.asarray(one(tokens), np.float32) for tokens in excerpts]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(excerpts)),
                                  thread_name_prefix="neuronscope-openai")
        try:
            futures = [pool.submit(one, tokens) for tokens in excerpts]
            return [np.asarray(f.result(), np.float32) for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _simulate_echo(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        if not tokens:
            return []
        prompt = simulation_text(explanation, tokens)
        shift = self.echo_shift if self.echo_shift is not None else 0
        payload = {"v": PROMPT_VERSION, "route": "echo", "model": self.model, "prompt": prompt.text,
                   "logprobs": self.echo_logprobs, "echo_shift": shift}
        estimate = self.count_tokens(prompt.text) + 1

        def run() -> tuple[str, int, int]:
            data = self._post("completions", self._echo_body(prompt.text, self.echo_logprobs))
            values = read_echo(self.spec, data, prompt.text, prompt.slots, shift)
            p, c = usage(data, estimate - 1, 1)
            return json.dumps({"values": values}), p, c

        return list(json.loads(self.call("simulate", payload, run, estimate=estimate))["values"])

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

    def _chat_values(self, kind: str, extra: dict[str, Any], messages: list[dict[str, str]], count: int,
                     with_logprobs: bool) -> list[float]:
        """One digit per answer line, `count` lines: the expected digit from the top logprobs where the server
        gives them, else the digit written."""
        max_tokens = 8 * count + 32
        payload: dict[str, Any] = {"v": PROMPT_VERSION, **extra,
                                   "route": "chat-logprobs" if with_logprobs else "chat-digits",
                                   "model": self.model, "messages": messages, "max_tokens": max_tokens}
        if with_logprobs:
            payload["top_logprobs"] = self.chat_logprobs
        prompt_estimate = sum(self.count_tokens(m["content"]) for m in messages)
        estimate = prompt_estimate + 4 * count
        what = "simulation" if kind == "simulate" else "rating"

        def run() -> tuple[str, int, int]:
            body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                    "temperature": 0.0, "seed": 0}
            if with_logprobs:
                body.update(logprobs=True, top_logprobs=self.chat_logprobs)
            data = self._post("chat", body)
            choice = choices(self.spec, data, what)[0]
            if with_logprobs:
                answer, values = read_chat_logprobs(self.spec, choice, count)
            else:
                answer = message_text(self.spec, choice, what)
                values = [float(d) for _, d in value_lines(self.spec, answer, count)]
            p, c = usage(data, prompt_estimate, self.count_tokens(answer))
            return json.dumps({"answer": answer, "values": values}, ensure_ascii=False), p, c

        return list(json.loads(self.call(kind, payload, run, estimate=estimate))["values"])

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        """Ratings through chat (one `Rating: d` line per excerpt, read from logprobs where the route has them);
        the echo route's servers take the same chat request, as every OpenAI-compatible server does."""
        mode = self.choose_mode()
        return self._chat_values("rate", {"task": task}, rating_messages(task, explanation, items), len(items),
                                 mode == "chat-logprobs")


    # -- choosing the route -------------------------------------------------------------------------
    def choose_mode(self) -> str:
        """The simulation route: named, or probed once (echo, then chat logprobs, then plain digits)."""
        with self._probe_lock:
            if self.mode == "echo" and self.echo_shift is None:
                ok, why = self._probe_echo()
                if not ok:
                    raise LLMError(f"{self.spec}: mode echo does not work with this server: {why}")
            if self.mode is None:
                ok, why = self._probe_echo()
                if ok:
                    self.mode, self.mode_reason = "echo", why
                else:
                    ok2, why2 = self._probe_chat_logprobs()
                    self.mode = "chat-logprobs" if ok2 else "chat-digits"
                    self.mode_reason = f"echo: {why}; chat logprobs: {why2}"
            return self.mode

    def _probe_request(self, what: str, payload: dict[str, Any], endpoint: str, body: dict[str, Any],
                       judge: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """One probe through the call log: the verdict is cached, so a rerun routes the same way. A refusal
        (HTTP 4xx) is a verdict; a server failure (5xx, timeout) raises and is not cached."""

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

        return dict(json.loads(self.call("simulate", {"v": PROMPT_VERSION, "probe": what, **payload}, run,
                                         estimate=self.count_tokens(json.dumps(body)) + 2)))

    def _probe_echo(self) -> tuple[bool, str]:
        """Does the server echo prompt logprobs, and at which shift? Tries 20 top logprobs, then 5."""
        lines = [f"{w}\t{d}\n" for w, d in _PROBE_LINES] * _PROBE_REPEATS
        text = "".join(lines) + f"{_PROBE_LINES[0][0]}\t{SLOT}\n"
        digits, pos = [], 0
        for rep in range(_PROBE_REPEATS):
            for w, d in _PROBE_LINES:
                if rep > 0:  # from the second repetition on, the digits are forced by the first
                    digits.append((pos + len(w) + 1, str(d)))
                pos += len(w) + 3
        slot = len(text) - 2
        verdict: dict[str, Any] = {}
        for n in dict.fromkeys((self.top_logprobs, 5)):
            verdict = self._probe_request("echo", {"model": self.model, "prompt": text, "logprobs": n},
                                          "completions", self._echo_body(text, n),
                                          lambda data: self._judge_echo(data, digits, slot))
            if verdict["ok"]:
                self.echo_shift, self.echo_logprobs = int(verdict["shift"]), n
            if verdict.get("status") not in (400, 422):  # too many logprobs asked for: try 5 (OpenAI's limit)
                break
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

    def _probe_chat_logprobs(self) -> tuple[bool, str]:
        messages = [{"role": "user", "content": "Answer with one digit: 3 + 4 ="}]
        verdict: dict[str, Any] = {}
        for n in dict.fromkeys((self.top_logprobs, 5)):
            body = {"model": self.model, "messages": messages, "max_tokens": 2, "temperature": 0.0,
                    "logprobs": True, "top_logprobs": n}
            verdict = self._probe_request("chat-logprobs", {"model": self.model, "top_logprobs": n}, "chat", body,
                                          self._judge_chat_logprobs)
            if verdict["ok"]:
                self.chat_logprobs = n
            if verdict.get("status") not in (400, 422):
                break
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
        self.client.close()
