"""Dry runs: a backend that tallies the calls the real one would make and answers with stand-ins.

A dry run (neuronscope.core.jobs.engine's `Job.plan`) runs the job's real per-neuron code with each backend wrapped
in a `RecordingBackend`. For every explain, simulate or rate that code asks for, the wrapper lists the requests the
real backend would send (`Backend.requests`: payload, prompt and completion tokens) and counts them in a `Tally`:
a request the call log holds is answered from the log, and so is one this dry run has already counted (a repeat:
the real run's log holds it by then), counted apart; any other is a new call, with its tokens and, at the backend's
price, its dollars.

When the log holds every request of an operation, the real backend answers it from the log (no model runs), so a
resumed job is planned from the answers it really got. Otherwise the wrapper answers with stand-ins shaped as the
real backend's answers: explanations of typical length, one per sample, different for every request (so
candidates, revisions and shuffled controls stay as distinct as real ones), and 0 for every predicted
activation and rating. A backend that needs no call (the token-lookup baseline lists no requests) answers
itself, for free.

The real backend is still asked for its tokenizer, prompts and estimates, and through `LookupOnlyLog` it may read
the call log but never make a call or write one. It is built for the dry run (neuronscope.core.llm.base's
`pricing_backends`): an openai backend needs no OPENAI_API_KEY to be counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuronscope.core.llm.base import Backend, CallLog, request_key
from neuronscope.core.llm.prompts import ExplainPrompt
from neuronscope.core.llm.rating import Item
from neuronscope.core.records import Call


class DryRunCall(RuntimeError):
    """A backend tried to call a model, or to log a call, during a dry run (a bug, never a user error)."""


class LookupOnlyLog(CallLog):
    """A call log that answers lookups from another log and refuses every new call."""

    def __init__(self, source: CallLog) -> None:
        super().__init__()
        self.source = source

    def lookup(self, key: str) -> str | None:
        return self.source.lookup(key)

    def reserve(self, tokens: int) -> None:
        raise DryRunCall("a dry run tried to call a model")

    def save(self, key: str, call: Call) -> None:
        raise DryRunCall("a dry run tried to log a call")


@dataclass
class Tally:
    """What a dry run counted, over every backend it wrapped."""

    calls: int = 0
    """New calls."""
    logged: int = 0
    """Calls the log holds now, answered from it."""
    repeats: int = 0
    """Repeats of new calls counted earlier in the same job (a shuffled control asks for another neuron's
    explanation): the real run answers them from the log too, once the first is made."""
    prompt_tokens: int = 0
    """Prompt tokens of the new calls."""
    completion_tokens: int = 0
    """Completion tokens of the new calls (at most)."""
    cost: float | None = 0.0
    """Dollars of the new calls; None once a new call's backend has no known price."""
    seen: set[str] = field(default_factory=set)
    """Keys of the new calls counted, so a repeat counts as answered from the log."""

    @property
    def cached(self) -> int:
        """Calls the log would answer in the real run: held now, or repeats of its new calls (its cache hits)."""
        return self.logged + self.repeats

    def add(self, prompt_tokens: int, completion_tokens: int, price: tuple[float, float] | None) -> None:
        """Count one new call."""
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if self.cost is not None and price is not None:
            self.cost += (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
        else:
            self.cost = None


def _arguments(kind: str, args: tuple[Any, ...]) -> Any:
    """An operation's arguments as JSON-able data: what tells requests apart when the backend cannot give their
    payloads."""
    if kind == "explain":
        prompt, n, seed = args
        return [prompt.messages(), n, seed]
    if kind == "rate":
        task, explanation, items = args
        return [task, explanation, [[list(i.tokens), list(i.marks)] for i in items]]
    explanation, excerpts = args
    return [explanation, [list(t) for t in excerpts]]


#: Words after a stand-in explanation's tag, so it is about as long as a real one (~20 tokens).
_STAND_IN_WORDS = "the tokens and contexts an explanation names, in a phrase of typical length"


def stand_in_explanation(prompt: ExplainPrompt, n: int, seed: int, sample: int) -> str:
    """A stand-in for sample `sample` of `explain(prompt, n, seed)`: the same for the same request, different for
    any other request or sample. It quotes nothing, so the quotes simulation predicts 0 from it."""
    digest = hashlib.sha256(json.dumps(_arguments("explain", (prompt, n, seed)), sort_keys=True,
                                       ensure_ascii=False).encode()).hexdigest()
    return f"stand-in {digest[:10]}-{sample}: {_STAND_IN_WORDS}"


class RecordingBackend(Backend):
    """A job's real backend in a dry run: operations tallied, answered from the log or by stand-ins."""

    def __init__(self, inner: Backend, tally: Tally) -> None:
        super().__init__()
        self.inner = inner
        self.tally = tally
        self.spec = inner.spec
        self.revision = inner.revision
        self.price = inner.price
        self.log = inner.log

    def bind(self, log: CallLog) -> None:
        self.inner.bind(log)
        self.log = log

    # -- the three operations: tallied, then answered from the log or by stand-ins (explain: _explain_texts) ------
    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        if self._record("simulate", (explanation, excerpts)):
            return self.inner.simulate(explanation, excerpts)
        return super().simulate(explanation, excerpts)

    def rate(self, task: str, explanation: str, items: Sequence[Item]) -> np.ndarray:
        if items and self._record("rate", (task, explanation, items)):  # no items: no call (Backend.rate)
            return self.inner.rate(task, explanation, items)
        return super().rate(task, explanation, items)

    def _record(self, kind: str, args: tuple[Any, ...]) -> bool:
        """Tally an operation's requests; True when the real backend can answer it without a model (the log holds
        every request, or there is none)."""
        requests = self.inner.requests(kind, *args)
        logged = True
        for index, (payload, prompt_tokens, completion_tokens) in enumerate(requests):
            if payload is not None and self.inner.is_cached(kind, payload):
                self.tally.logged += 1
                continue
            logged = False
            # A request whose payload the backend cannot give is known by the operation's arguments: repeats in
            # this dry run are recognised, but it is never found in the log.
            key = request_key(self.spec, self.revision, kind, payload if payload is not None else
                              {"dry run": _arguments(kind, args), "request": index})
            if key in self.tally.seen:
                self.tally.repeats += 1
                continue
            self.tally.seen.add(key)
            self.tally.add(prompt_tokens, completion_tokens, self.price)
        return logged

    def _explain_texts(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        # Explain's retry of an unusable greedy answer comes through here too, so it is tallied, and answered from
        # the log where the log holds it, never by a model.
        if self._record("explain", (prompt, n, seed)):
            return self.inner._explain_texts(prompt, n, seed)
        return self._explain(prompt, n, seed)

    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        return [stand_in_explanation(prompt, n, seed, i) for i in range(n)]

    def _simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return [np.zeros(len(tokens), np.float32) for tokens in excerpts]

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        return [0.0] * len(items)

    # -- everything else is the real backend's ----------------------------------------------------------------
    def requests(self, kind: str, *args: Any) -> list[tuple[Any, int, int]]:
        return self.inner.requests(kind, *args)

    def is_cached(self, kind: str, payload: Any) -> bool:
        return self.inner.is_cached(kind, payload)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def context_tokens(self) -> int:
        return self.inner.context_tokens()

    def close(self) -> None:
        """Nothing: the job closes the real backend."""
