"""One neuron's explain -> select -> score, with its controls; no store access (neuronscope.core.jobs.engine does that).

For a neuron's splits: the explainer writes k candidates from the train excerpts (and, when asked, a revision
of the first from the select excerpts its simulation got most wrong); with more than one candidate each
is simulated and scored on the select split and the best is marked; the chosen one is simulated and
scored on the test split (so selection never leaks into the headline score). Two controls are
scored on the same test excerpts: another neuron's explanation (shuffled) with the same simulator and
simulation mode (neuronscope.core.explanation.simulation), and the token-lookup baseline (its own explainer and simulator). On the
test split every explanation also gets, in the lines mode, the contrast score (its simulation minus a neutral
explanation's; see neuronscope.core.explanation.score), and the scores of the job's other scorers (neuronscope.core.explanation.scorers: detection, fuzzing,
embedding), the controls scored the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from neuronscope.core.explanation.score import contrast, score
from neuronscope.core.explanation.scorers import RATED, embedding_score, rated_score
from neuronscope.core.explanation.simulation import simulate as simulation_of
from neuronscope.core.explanation.simulation import simulator_name
from neuronscope.core.explanation.splits import NeuronSplits
from neuronscope.core.ids import NeuronId
from neuronscope.core.llm.base import Backend, LLMError
from neuronscope.core.llm.baseline import BaselineBackend, lookup_explanation
from neuronscope.core.llm.prompts import (
    NEUTRAL_EXPLANATION,
    REVISION_MISSES,
    Example,
    ExplainPrompt,
    explain_prompt,
    on_scale,
    revision_prompt,
)
from neuronscope.core.results import ScoredExplanation, Simulation, SplitScores

if TYPE_CHECKING:
    from neuronscope.core.explanation.embedding import Embedder


def prompt_for(explainer: Backend, splits: NeuronSplits) -> ExplainPrompt:
    """The explainer's prompt for a neuron, trimmed to the explainer's context."""
    return explain_prompt(splits.train, explainer.count_tokens, explainer.context_tokens())


def revise(explainer: Backend, simulator: Backend, splits: NeuronSplits, prompt: ExplainPrompt, text: str, *,
           simulation: str, seed: int) -> str | None:
    """The 2023 paper's revision: the explainer sees its explanation and the select excerpts whose simulation was
    furthest from the neuron (summed absolute error on the 0-9 scale), and writes another. None when nothing
    was missed, or the revision repeats the explanation."""
    examples = splits.select
    predicted = simulation_of(simulator, simulation, text, [e.tokens for e in examples])
    errors = [float(np.abs(on_scale(e.target, splits.scale_max) - p).sum()) for e, p in zip(examples, predicted)]
    worst = sorted(range(len(examples)), key=lambda i: (-errors[i], i))[:REVISION_MISSES]
    misses = [(examples[i].tokens, examples[i].target, predicted[i]) for i in worst if errors[i] > 0]
    if not misses:
        return None
    better = explainer.explain(revision_prompt(prompt, text, misses), 1, seed)[0]
    return better if better.strip() != text.strip() else None


def lookup_of(splits: NeuronSplits) -> str:
    """The token-lookup explanation of a neuron's train excerpts."""
    return lookup_explanation([(e.tokens, on_scale(e.target, splits.scale_max).tolist()) for e in splits.train])


def evaluate(simulator: Backend, text: str, examples: Sequence[Example], split: str, scale_max: float,
             seed: int, *, simulation: str = "lines", with_contrast: bool = False, scorers: Sequence[str] = (),
             embedder: Embedder | None = None) -> tuple[tuple[Simulation, ...], list[SplitScores]]:
    """Simulate an explanation on a split's excerpts (neuronscope.core.explanation.simulation's mode) and score it. with_contrast, in the
    lines mode, also simulates the neutral explanation on them (one more call, shared by every explanation of
    these excerpts) for the contrast score (the other modes subtract the neutral explanation already); `scorers`
    (neuronscope.core.explanation.scorers.SCORERS) adds detection and fuzzing rated by the simulator, and the embedding score."""
    tokens = [e.tokens for e in examples]
    predicted = simulation_of(simulator, simulation, text, tokens)
    sims = tuple(Simulation(e.excerpt_id, e.kind, split, tuple(float(v) for v in p)) for e, p in zip(examples, predicted))
    kinds, targets = [e.kind for e in examples], [e.target for e in examples]
    scores = list(score(kinds, targets, predicted, scale_max=scale_max, seed=seed).values())
    if with_contrast and simulation == "lines":
        neutral = simulator.simulate(NEUTRAL_EXPLANATION, tokens)
        scores.append(contrast(kinds, targets, predicted, neutral, seed=seed))
    scores += [rated_score(task, simulator, text, examples, seed) for name, task in RATED.items() if name in scorers]
    out = [SplitScores(split, simulator_name(simulator.spec, simulation), tuple(scores))]
    if "embedding" in scorers and embedder is not None:
        out.append(SplitScores(split, embedder.name, (embedding_score(embedder, text, examples, seed),)))
    return sims, out


def score_candidates(simulator: Backend, splits: NeuronSplits, texts: Sequence[str], *, explainer: str, role: str,
                     seed: int, simulation: str = "lines", scorers: Sequence[str] = (),
                     embedder: Embedder | None = None, with_contrast: bool = True) -> list[ScoredExplanation]:
    """Score candidates: select among several on the select split, the chosen one on the test split (with the
    contrast score unless with_contrast is False)."""
    chosen = 0
    select_results: list[tuple[tuple[Simulation, ...], list[SplitScores]] | None] = [None] * len(texts)
    if len(texts) > 1:
        for i, text in enumerate(texts):
            select_results[i] = evaluate(simulator, text, splits.select, "select", splits.scale_max, seed,
                                         simulation=simulation)
        values = [r[1][0].get("all").value if r and r[1][0].get("all") else -2.0 for r in select_results]  # type: ignore[union-attr]
        chosen = max(range(len(texts)), key=lambda i: (values[i], -i))
    test_sims, test_scores = evaluate(simulator, texts[chosen], splits.test, "test", splits.scale_max, seed,
                                      simulation=simulation, with_contrast=with_contrast, scorers=scorers,
                                      embedder=embedder)
    out = []
    for i, text in enumerate(texts):
        selected = select_results[i]
        sims: tuple[Simulation, ...] = selected[0] if selected else ()
        parts = list(selected[1]) if selected else []
        if i == chosen:
            sims += test_sims
            parts += test_scores
        out.append(ScoredExplanation(text=text, explainer=explainer, role=role, sample=i, selected=i == chosen,
                                     simulations=sims, splits=tuple(parts)))
    return out


def controls(simulator: Backend, splits: NeuronSplits, *,
             partner: NeuronId | None, partner_text: Callable[[], str] | None, seed: int,
             explainer: str, simulation: str = "lines", scorers: Sequence[str] = (),
             embedder: Embedder | None = None, with_contrast: bool = True) -> list[ScoredExplanation]:
    """The shuffled control (another neuron's explanation; left out when that explanation cannot be had, or there
    is no partner) and the token-lookup baseline on the test split, each scored the way the explanation is (the
    baseline by its own lookup simulator and rater; with_contrast as for the explanation)."""
    out = []
    text = None
    if partner is not None and partner_text is not None:
        try:
            text = partner_text()
        except LLMError:
            text = None  # the partner's own failure is recorded against the partner; this neuron goes without
    if text is not None:
        sims, scores = evaluate(simulator, text, splits.test, "test", splits.scale_max, seed, simulation=simulation,
                                with_contrast=True, scorers=scorers, embedder=embedder)
        out.append(ScoredExplanation(text=text, explainer=explainer, role="shuffled", source=partner,
                                     simulations=sims, splits=tuple(scores)))
    if explainer == "baseline" and simulator.spec == "baseline":
        return out  # the candidate is the baseline itself
    lookup = lookup_of(splits)
    sims, scores = evaluate(BaselineBackend(), lookup, splits.test, "test", splits.scale_max, seed, simulation=simulation,
                            with_contrast=with_contrast, scorers=scorers, embedder=embedder)
    out.append(ScoredExplanation(text=lookup, explainer="baseline", role="baseline", simulations=sims,
                                 splits=tuple(scores)))
    return out
