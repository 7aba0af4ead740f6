"""The token-lookup baseline: no LLM, deterministic, free.

Explainer: the tokens with the highest mean activation over the shown excerpts, written as
`tokens: "X" 8.5, "y" 6.0` (JSON-quoted tokens, mean on the 0-9 scale). Simulator: every token
predicted at the weight its explanation gives it, 0 otherwise; tokens of a lookup explanation match
exactly. It also reads other explanations (a user's sentence, a shuffled LLM one): every quoted word
in them counts at weight 9, matching tokens whatever their case and surrounding spaces. Every real
explainer is reported against this one.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from neuronscope.core.llm.base import Backend
from neuronscope.core.llm.prompts import ExplainPrompt
from neuronscope.core.llm.rating import Item
from neuronscope.core.records import TOP

#: Most tokens a lookup explanation names.
MAX_TOKENS = 8
#: Smallest mean (0-9 scale) for a token to be named.
MIN_MEAN = 1.0
_WEIGHTED = re.compile(r'("(?:[^"\\]|\\.)*")\s+(\d+(?:\.\d+)?)')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"|(?<!\w)\'(.+?)\'(?!\w)|“([^”]+)”|‘([^’]+)’')


def _key(token: str) -> str:
    return token.strip().casefold()


def lookup_explanation(examples: Sequence[tuple[Sequence[str], Sequence[float]]]) -> str:
    """The lookup explanation of excerpts given as (tokens, activations on the 0-9 scale)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for tokens, values in examples:
        for token, value in zip(tokens, values):
            entry = totals[token]
            entry[0] += float(value)
            entry[1] += 1
    means = sorted(((s / n, token) for token, (s, n) in totals.items() if token.strip()), key=lambda x: (-x[0], x[1]))
    named = [(token, mean) for mean, token in means if mean >= MIN_MEAN][:MAX_TOKENS]
    if not named:
        return "tokens: none stands out"
    return "tokens: " + ", ".join(f"{json.dumps(token, ensure_ascii=False)} {mean:.1f}" for token, mean in named)


def lookup_weights(explanation: str) -> tuple[dict[str, float], bool]:
    """(token -> predicted value, exact): read from a lookup explanation (exact tokens), else from any quoted
    words (keys folded with `_key`)."""
    weights: dict[str, float] = {}
    for quoted, number in _WEIGHTED.findall(explanation):
        try:
            token = json.loads(quoted)
        except ValueError:
            continue
        weights[token] = max(weights.get(token, 0.0), min(float(number), TOP))
    if weights:
        return weights, True
    for groups in _QUOTED.findall(explanation):
        word = _key(next(g for g in groups if g))
        if word:
            weights[word] = float(TOP)
    return weights, False


def lookup_predict(explanation: str, tokens: Sequence[str]) -> np.ndarray:
    """The lookup simulator's prediction for one excerpt."""
    weights, exact = lookup_weights(explanation)
    return np.array([weights.get(t if exact else _key(t), 0.0) for t in tokens], np.float32)


class BaselineBackend(Backend):
    """Token lookup in place of an LLM."""

    spec = "baseline"
    revision = "lookup-v1"
    price = (0.0, 0.0)

    def requests(self, kind: str, *args: object) -> list[tuple[object, int, int]]:
        return []  # no LLM: nothing to call, nothing to pay

    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        return [lookup_explanation(prompt.examples)] * n

    def _simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return [lookup_predict(explanation, tokens) for tokens in excerpts]

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        """Detection: the excerpt's largest lookup value; fuzzing: the mean lookup value of the marked tokens."""
        out = []
        for item in items:
            predicted = lookup_predict(explanation, item.tokens)
            if task == "fuzz":
                marked = predicted[np.asarray(item.marks, bool)] if item.marks else predicted[:0]
                out.append(float(marked.mean()) if len(marked) else 0.0)
            else:
                out.append(float(predicted.max(initial=0.0)))
        return out
