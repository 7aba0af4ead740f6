"""How an explanation is turned into a predicted activation at every token: the simulation modes.

- `quotes`: the explanation read literally. Every token it quotes ("until", " Nov", "://") is predicted wherever
  that token occurs, in any case; "until" also with spaces around it, " Nov" only word-initially (with its
  leading space); every other token at 0. Explainers are asked to quote strongest first, so the first quote is
  predicted at the top of the scale and later ones lower, down to a quarter of it for the last. No
  model is asked, so it costs nothing and cannot ignore the explanation; an explanation that names no token
  predicts nothing.
- `tokens`: `quotes`, and the simulator rates every other distinct token of the excerpts against the
  explanation out of context (neuronscope.core.llm.rating's token task), minus its rating for a neutral explanation, so
  explanations that name a kind of token ("month names") are simulated too.
- `lines`: the 2023 paper's simulation: the simulator writes a 0-9 value after every token of each excerpt,
  read in one forward pass (neuronscope.core.llm.prompts). Small models mostly ignore the explanation here (bench/README.md, quality.py).

The token-lookup baseline always simulates by its own lookup table, whatever the mode.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuronscope.core.choices import SIMULATIONS
from neuronscope.core.llm.base import Backend
from neuronscope.core.llm.prompts import NEUTRAL_EXPLANATION
from neuronscope.core.llm.rating import Item
from neuronscope.core.records import TOP

#: The last of an explanation's quotes is predicted at this share of the first's.
LAST_QUOTE = 0.25
#: Quoted strings in an explanation: straight or curly double quotes, on one line.
_QUOTED = re.compile(r'"([^"\n]*)"|“([^”\n]*)”')


def quoted(explanation: str) -> dict[str, float]:
    """What an explanation quotes, case-folded, in order, each with the value the quotes mode predicts for it: TOP
    for the first, falling linearly to LAST_QUOTE of it for the last (explainers are asked to quote strongest
    first). A quote that starts with a space (" a") names the word-initial token and keeps its one leading space;
    any other is stripped ("until" names the word however it is spaced). Empty quotes are dropped."""
    keys: list[str] = []
    for a, b in _QUOTED.findall(explanation):
        key = (a or b).rstrip().casefold()
        key = " " + key.strip() if key.startswith(" ") else key
        if key.strip() and key not in keys:
            keys.append(key)
    step = (1 - LAST_QUOTE) / (len(keys) - 1) if len(keys) > 1 else 0.0
    return {key: TOP * (1 - step * i) for i, key in enumerate(keys)}


def _value(token: str, quotes: dict[str, float]) -> float:
    word = token.strip().casefold()
    if not word:
        return 0.0
    return max(quotes.get(word, 0.0), quotes.get(" " + word, 0.0) if token.startswith(" ") else 0.0)


def simulator_name(spec: str, mode: str) -> str:
    """How a simulation's scores name their simulator: the backend spec, with the mode unless it is `lines` (the
    mode of stores made before there were others) or the simulator is the baseline (which has one way only)."""
    return spec if mode == "lines" or spec == "baseline" else f"{spec} ({mode})"


def simulate(simulator: Backend, mode: str, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """The predicted activation (0-9 scale) at every token of every excerpt under a simulation mode."""
    if mode not in SIMULATIONS:
        raise ValueError(f"unknown simulation {mode!r}: use one of {', '.join(SIMULATIONS)}")
    if mode == "lines" or simulator.spec == "baseline":
        return simulator.simulate(explanation, excerpts)
    quotes = quoted(explanation)
    types = sorted({t for tokens in excerpts for t in tokens})
    value = {t: _value(t, quotes) for t in types}
    if mode == "tokens":  # every token rated, so the neutral rating of these excerpts is one cached call
        items = [Item((t,)) for t in types]
        shift = simulator.rate("token", explanation, items) - simulator.rate("token", NEUTRAL_EXPLANATION, items)
        for t, v in zip(types, np.clip(shift, 0.0, TOP).tolist()):
            value[t] = max(value[t], v)
    return [np.array([value[t] for t in tokens], np.float32) for tokens in excerpts]


def requests(simulator: Backend, mode: str, explanation: str,
             excerpts: Sequence[Sequence[str]]) -> list[tuple[str, tuple[Any, int, int]]]:
    """The calls `simulate` would make, as (call kind, Backend.requests' tuple). Dry runs do not use it: they run
    `simulate` itself with a recording backend (neuronscope.core.llm.recording)."""
    if mode == "lines" or simulator.spec == "baseline":
        return [("simulate", r) for r in simulator.requests("simulate", explanation, excerpts)]
    if mode == "quotes":
        return []
    items = [Item((t,)) for t in sorted({t for tokens in excerpts for t in tokens})]
    return [("rate", r) for text in (explanation, NEUTRAL_EXPLANATION)
            for r in simulator.requests("rate", "token", text, items)]
