"""One neuron's explain -> select -> score, with its controls; no store access (core.jobs does that).

For a neuron's splits: the explainer writes k candidates from the train excerpts; with k > 1 each
is simulated and scored on the select split and the best is marked; the chosen one is simulated and
scored on the test split (so selection never leaks into the headline score). Two controls are
scored on the same test excerpts: another neuron's explanation (shuffled) with the same simulator,
and the token-lookup baseline (its own explainer and simulator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core.llm.base import Backend, LLMError
from core.llm.baseline import BaselineBackend, lookup_explanation
from core.prompts import Example, ExplainPrompt, explain_prompt, on_scale
from core.results import ScoredExplanation, Simulation, SplitScores
from core.score import score
from core.splits import NeuronSplits


def prompt_for(explainer: Backend, splits: NeuronSplits) -> ExplainPrompt:
    """The explainer's prompt for a neuron, trimmed to the explainer's context."""
    return explain_prompt(splits.train, explainer.count_tokens, explainer.context_tokens())


def lookup_of(splits: NeuronSplits) -> str:
    """The token-lookup explanation of a neuron's train excerpts."""
    return lookup_explanation([(e.tokens, on_scale(e.target, splits.scale_max).tolist()) for e in splits.train])


def evaluate(simulator: Backend, text: str, examples: Sequence[Example], split: str, scale_max: float,
             seed: int) -> tuple[tuple[Simulation, ...], SplitScores]:
    """Simulate an explanation on a split's excerpts and score it."""
    predicted = simulator.simulate(text, [e.tokens for e in examples])
    sims = tuple(Simulation(e.excerpt_id, e.kind, split, tuple(float(v) for v in p)) for e, p in zip(examples, predicted))
    scores = score([e.kind for e in examples], [e.target for e in examples], predicted, scale_max=scale_max, seed=seed)
    return sims, SplitScores(split, simulator.spec, tuple(scores.values()))


def score_candidates(simulator: Backend, splits: NeuronSplits, texts: Sequence[str], *, explainer: str, role: str,
                     seed: int) -> list[ScoredExplanation]:
    """Score candidates: select among several on the select split, the chosen one on the test split."""
    chosen = 0
    select_results: list[tuple[tuple[Simulation, ...], SplitScores] | None] = [None] * len(texts)
    if len(texts) > 1:
        for i, text in enumerate(texts):
            select_results[i] = evaluate(simulator, text, splits.select, "select", splits.scale_max, seed)
        values = [r[1].get("all").value if r and r[1].get("all") else -2.0 for r in select_results]  # type: ignore[union-attr]
        chosen = max(range(len(texts)), key=lambda i: (values[i], -i))
    test_sims, test_scores = evaluate(simulator, texts[chosen], splits.test, "test", splits.scale_max, seed)
    out = []
    for i, text in enumerate(texts):
        sims: tuple[Simulation, ...] = select_results[i][0] if select_results[i] else ()  # type: ignore[index]
        parts = [select_results[i][1]] if select_results[i] else []  # type: ignore[index]
        if i == chosen:
            sims += test_sims
            parts.append(test_scores)
        out.append(ScoredExplanation(text=text, explainer=explainer, role=role, sample=i, selected=i == chosen,
                                     simulations=sims, splits=tuple(parts)))
    return out


def controls(simulator: Backend, splits: NeuronSplits, *,
             partner: tuple[int, int] | None, partner_text: Callable[[], str] | None, seed: int,
             explainer: str) -> list[ScoredExplanation]:
    """The shuffled control (another neuron's explanation; left out when that explanation cannot be had) and the
    token-lookup baseline on the test split."""
    out = []
    text = None
    if partner is not None and partner_text is not None:
        try:
            text = partner_text()
        except LLMError:
            text = None  # the partner's own failure is recorded against the partner; this neuron goes without
    if text is not None:
        sims, scores = evaluate(simulator, text, splits.test, "test", splits.scale_max, seed)
        out.append(ScoredExplanation(text=text, explainer=explainer, role="shuffled", source=partner,
                                     simulations=sims, splits=(scores,)))
    if explainer == "baseline" and simulator.spec == "baseline":
        return out  # the candidate is the baseline itself
    lookup = lookup_of(splits)
    sims, scores = evaluate(BaselineBackend(), lookup, splits.test, "test", splits.scale_max, seed)
    out.append(ScoredExplanation(text=lookup, explainer="baseline", role="baseline", simulations=sims,
                                 splits=(scores,)))
    return out
