"""How the openai backend chooses its simulation route: a mixin of neuronscope.core.llm.openai_api.OpenAIBackend
that probes the server once (echo with prompt logprobs and at which shift, else chat logprobs, else plain digits),
each probe's verdict kept in the call log so a rerun routes the same way without asking again."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from neuronscope.core.llm.base import LLMError, request_key
from neuronscope.core.llm.openai_answers import digit_dist, echo_logprobs, token_starts, usage
from neuronscope.core.llm.openai_http import REFUSALS, HTTPError
from neuronscope.core.llm.prompts import SLOT

#: Bumped when the openai backend's requests change, so cached answers to old requests are not reused.
PROMPT_VERSION = 2
#: The echo probe: lines repeated so that a model of any size predicts their digits from the repetition.
_PROBE_LINES = (("cat", 7), ("dog", 2), ("sun", 5), ("red", 0), ("map", 9), ("box", 3), ("pen", 6), ("cup", 1))
_PROBE_REPEATS = 3


class RouteProbing:
    """The route (`mode`) and what the probes measured (`echo_shift`, `echo_logprobs`, `chat_logprobs`,
    `mode_reason`), set on the backend; requests go through its `call`, `_post` and `_echo_body`."""

    spec: str
    model: str
    revision: str
    mode: str | None
    mode_reason: str
    echo_shift: int | None
    top_logprobs: int
    echo_logprobs: int
    chat_logprobs: int
    log: Any
    _probe_lock: threading.Lock
    call: Callable[..., str]
    count_tokens: Callable[[str], int]
    _post: Callable[[str, dict[str, Any]], dict[str, Any]]
    _echo_body: Callable[[str, int], dict[str, Any]]

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

