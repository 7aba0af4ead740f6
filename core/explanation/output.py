"""The output-centric explanation of a unit and its steering score: what the unit makes the model say, beside what
makes it fire (after Gur-Arieh et al. 2025, "Enhancing automated interpretability with output-centric feature
descriptions").

- The unit is pushed up (STEER_SCALE x its peak added at every position) over the excerpts it is explained from;
  the explainer is shown the next tokens that gain and lose the most probability
  (neuronscope.core.models.interventions.steering_effect) and writes what the unit makes the model say. The
  token-lookup baseline names the promoted tokens.
- The steering score: greedy continuations of the beginnings of the held-out excerpts are generated with the unit pushed up at every
  position and without; a rater (the job's simulator, in its simulation mode) reads the explanation and gives each
  continuation the mean activation it predicts over its tokens. The score is the AUROC of steered against plain
  continuations (0.5 is chance, 1 is every steered continuation rated above every plain one), with a bootstrap
  interval, beside another neuron's output explanation (shuffled) and the baseline rated on the same continuations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuronscope.core.explanation.scorers import auroc_score
from neuronscope.core.explanation.simulation import simulate, simulator_name
from neuronscope.core.ids import NeuronId
from neuronscope.core.llm.base import Backend
from neuronscope.core.llm.baseline import lookup_explanation
from neuronscope.core.llm.prompts import ExplainPrompt, show_token
from neuronscope.core.records import TOP
from neuronscope.core.results import ScoredExplanation, SplitScores

#: The roles of output-centric explanations: the explainer's, another neuron's (shuffled) and the baseline's.
OUTPUT_ROLES = {"candidate": "output", "shuffled": "output-shuffled", "baseline": "output-baseline"}
#: The split and method their scores are stored under.
STEER_SPLIT, STEER_METHOD = "steer", "steering"
#: Pushing a unit up adds this multiple of its peak (over the excerpts shown to the explainer) at every position.
STEER_SCALE = 4.0
#: Tokens of each held-out excerpt used as a steering prompt (at most; half the excerpt when shorter), tokens
#: generated after it, and promoted or suppressed tokens shown to the explainer.
PROMPT_TOKENS, STEER_TOKENS, SHOWN_TOKENS = 16, 16, 10

_SYSTEM = (
    "You are studying one unit inside a language model through what it does to the model's output. When the unit is "
    "pushed up, some next tokens become more likely and others less likely; you are given both lists, with the change "
    "in probability. In one short sentence, say what the unit makes the model say (and, if it is clear, what it "
    "stops it saying), naming the tokens themselves, not examples of your own. Put the most telling tokens in double "
    "quotes. Answer with the sentence only.")



@dataclass(frozen=True)
class OutputView:
    """What a unit does to the output, as the explainer and the rater see it."""

    raised: tuple[tuple[str, float], ...]
    """Next tokens pushing the unit up makes more likely, with the mean change in probability, largest first."""
    lowered: tuple[tuple[str, float], ...]
    """Next tokens it makes less likely, most lowered first."""
    plain: tuple[tuple[str, ...], ...]
    """Greedy continuations (token strings) of the steering prompts."""
    steered: tuple[tuple[str, ...], ...]
    """The same with the unit pushed up at every position."""


def output_prompt(view: OutputView) -> ExplainPrompt:
    """The explainer's prompt: the promoted and suppressed tokens (shown inertly). Its `examples` give the baseline
    explainer the promoted tokens with weights on the 0-9 scale."""

    def listing(tokens: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f'"{show_token(t)}" ({c:+.3f})' for t, c in tokens[:SHOWN_TOKENS]) or "(none)"

    user = f"More likely: {listing(view.raised)}\nLess likely: {listing(view.lowered)}"
    top = max((c for _, c in view.raised), default=0.0)
    promoted = [(t, c) for t, c in view.raised[:SHOWN_TOKENS] if c > 0]
    example = (tuple(t for t, _ in promoted), tuple(TOP * c / top for _, c in promoted)) if top > 0 else ((), ())
    return ExplainPrompt(system=_SYSTEM, shots=(), user=user, shown=len(promoted), examples=(example,))


def output_lookup(view: OutputView) -> str:
    """The baseline's output explanation: the promoted tokens, weighted."""
    return lookup_explanation(output_prompt(view).examples)


def steering_score(simulator: Backend, simulation: str, text: str, view: OutputView, seed: int) -> SplitScores:
    """The steering score of an explanation: AUROC of the rater's mean prediction over steered against plain
    continuations."""
    texts = list(view.steered) + list(view.plain)
    predicted = simulate(simulator, simulation, text, texts) if any(texts) else [np.zeros(0)] * len(texts)
    values = np.array([float(np.mean(p)) if len(p) else 0.0 for p in predicted])
    labels = np.arange(len(texts)) < len(view.steered)
    return SplitScores(STEER_SPLIT, simulator_name(simulator.spec, simulation),
                       (auroc_score(STEER_METHOD, values, labels, seed),))


def scored_output(simulator: Backend, simulation: str, text: str, view: OutputView, *, explainer: str, role: str,
                  seed: int, source: NeuronId | None = None) -> ScoredExplanation:
    """An output-centric explanation (role "candidate", "shuffled" or "baseline", stored as OUTPUT_ROLES names it)
    with its steering score."""
    return ScoredExplanation(text=text, explainer=explainer, role=OUTPUT_ROLES[role], source=source,
                             splits=(steering_score(simulator, simulation, text, view, seed),))
