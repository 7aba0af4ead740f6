"""Scorers beside simulation, each a `Score` (neuronscope.core.explanation.score) with its own method name and a bootstrap interval, on
the held-out test excerpts of a neuron tail:

- `detection`: does the explanation tell the excerpts that make the neuron fire from the others? The rater rates
  each test excerpt 0-9; the score is the AUROC of firing against silent excerpts. An excerpt fires when its
  peak reaches FIRING of the weakest top excerpt's peak: every top excerpt, and a random one that fires as
  strongly (a neuron on " the" fires in most random text, and an explanation naming " the" is right there).
- `fuzzing`: are the marked tokens the firing ones? Each top excerpt is shown twice, once with its firing tokens
  marked, once with as many other tokens marked; the score is the AUROC of the right marks against the decoys.
- `embedding`: is the explanation's embedding closer to the firing excerpts than to the silent ones (AUROC of
  cosine similarity)?

0.5 is chance for all three. The rated scorers subtract what the rater says for a neutral explanation on the
same item (a small model's yes/no prior is mostly about the text, not the explanation), so only what the
explanation changes is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuronscope.core.explanation import embedding
from neuronscope.core.explanation.auroc import auroc, auroc_interval
from neuronscope.core.explanation.embedding import Embedder
from neuronscope.core.llm.base import Backend
from neuronscope.core.llm.prompts import NEUTRAL_EXPLANATION, Example
from neuronscope.core.llm.rating import Item
from neuronscope.core.results import Score

#: The rated scorers and their rating tasks (neuronscope.core.llm.rating).
RATED = {"detection": "detect", "fuzzing": "fuzz"}
#: A token fires, for fuzzing, at this fraction of its excerpt's peak or more; an excerpt fires, for detection and
#: embedding, at this fraction of the weakest top excerpt's peak.
FIRING = 0.5
#: Most tokens marked in one fuzzing item.
MAX_MARKED = 4


def firing_excerpts(examples: Sequence[Example]) -> np.ndarray:
    """Which excerpts make the neuron fire: peak at FIRING of the weakest firing top excerpt's peak or more."""
    peaks = np.array([float(np.max(e.target, initial=0.0)) for e in examples])
    tops = peaks[[e.kind != "random" and p > 0 for e, p in zip(examples, peaks)]]
    if not len(tops):
        return np.zeros(len(examples), bool)
    return peaks >= FIRING * tops.min()


def detection_items(examples: Sequence[Example]) -> tuple[list[Item], np.ndarray]:
    """Every test excerpt unmarked, labelled by whether it makes the neuron fire."""
    return [Item(tuple(e.tokens)) for e in examples], firing_excerpts(examples)


def fuzzing_items(examples: Sequence[Example], seed: int) -> tuple[list[Item], np.ndarray]:
    """For each top excerpt with firing tokens: its firing tokens marked (label 1, at most MAX_MARKED, largest
    first) and as many non-firing tokens marked at random (label 0)."""
    rng = np.random.default_rng(seed)
    items, labels = [], []
    for e in examples:
        target = np.asarray(e.target, np.float64)
        if e.kind == "random" or not len(target) or target.max() <= 0:
            continue
        firing = np.flatnonzero(target >= FIRING * target.max())
        firing = firing[np.argsort(-target[firing], kind="stable")][:MAX_MARKED]
        others = np.setdiff1d(np.arange(len(target)), firing)
        if not len(others):
            continue
        decoys = rng.choice(others, size=min(len(firing), len(others)), replace=False)
        for chosen, label in ((firing, True), (decoys, False)):
            marks = np.zeros(len(target), bool)
            marks[chosen] = True
            items.append(Item(tuple(e.tokens), tuple(bool(m) for m in marks)))
            labels.append(label)
    return items, np.array(labels, bool)


def rating_items(task: str, examples: Sequence[Example], seed: int) -> tuple[list[Item], np.ndarray]:
    """The items a rated scorer asks about, with their labels."""
    return detection_items(examples) if task == "detect" else fuzzing_items(examples, seed)


def auroc_score(method: str, values: np.ndarray, labels: np.ndarray, seed: int) -> Score:
    """AUROC of values between label 1 and label 0 with its bootstrap interval; 0.5 with a flag when a side is
    empty or every value is the same."""
    values = np.asarray(values, np.float64)
    positives, negatives = values[labels], values[~labels]
    if not len(positives) or not len(negatives):
        return Score(method, 0.5, 0.5, 0.5, len(values), "no_tokens")
    flags = "constant_prediction" if np.ptp(values) <= 1e-9 else ""
    low, high = auroc_interval(positives, negatives, seed)
    return Score(method, auroc(positives, negatives), low, high, len(values), flags)


def rated_score(task: str, rater: Backend, text: str, examples: Sequence[Example], seed: int) -> Score:
    """The detection (task `detect`) or fuzzing (`fuzz`) score of an explanation by a rater."""
    items, labels = rating_items(task, examples, seed)
    method = "detection" if task == "detect" else "fuzzing"
    if not items:
        return Score(method, 0.5, 0.5, 0.5, 0, "no_tokens")
    shift = rater.rate(task, text, items) - rater.rate(task, NEUTRAL_EXPLANATION, items)
    return auroc_score(method, shift, labels, seed)


def embedding_score(embedder: Embedder, text: str, examples: Sequence[Example], seed: int) -> Score:
    """The embedding score: AUROC of cosine similarity between the explanation and the firing against the silent
    excerpts' text."""
    texts = ["".join(e.tokens) for e in examples]
    fires = firing_excerpts(examples)
    positives = [t for t, f in zip(texts, fires) if f]
    negatives = [t for t, f in zip(texts, fires) if not f]
    if not positives or not negatives:
        return Score("embedding", 0.5, 0.5, 0.5, len(texts), "no_tokens")
    value, low, high = embedding.similarity_auroc(embedder, text, positives, negatives, seed)
    return Score("embedding", value, low, high, len(texts))
