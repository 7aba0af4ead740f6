"""A release neuron's parsed files as our rows: statistics, records whose excerpts are shared by content, and the
release's explanations as results scored again (neuronscope.core.interop.importer writes them)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from neuronscope.core.explanation.score import score
from neuronscope.core.interop.release import RELEASE_SCALE, ReleaseExplanation, ReleaseNeuron
from neuronscope.core.interop.sidecar import Authorship
from neuronscope.core.records import TOP, ActivationRecord, NeuronStats
from neuronscope.core.results import NeuronResult, Score, ScoredExplanation, Simulation, SplitScores

#: How imported explanations and their simulations are named.
RELEASE_EXPLAINER = "openai-release"


def _selectivity(n: ReleaseNeuron) -> float:
    if not n.random or not n.variance > 0:
        return math.nan
    top = np.mean([max(e.activations) for e in n.top])
    median = np.median([max(e.activations) for e in n.random])
    return float((top - median) / math.sqrt(n.variance))


def stats(n: ReleaseNeuron) -> NeuronStats:
    """A release neuron's statistics: its moments, max and min over its records, selectivity as a collection
    defines it (the median excerpt maximum from the random sample); token count and density unknown."""
    every = [a for group in (n.top, n.random, *n.quantile) for e in group for a in e.activations]
    return NeuronStats(layer=n.layer, index=n.neuron, count=0, mean=n.mean, variance=n.variance, skewness=n.skewness,
                       kurtosis=n.kurtosis, max=max(every), min=min(every), density=math.nan,
                       selectivity=_selectivity(n), quantile_edges=n.boundaries)


def _excerpt_key(tokens: tuple[str, ...]) -> bytes:
    return hashlib.blake2b(json.dumps(tokens).encode(), digest_size=16).digest()  # unambiguous for any tokens


class ExcerptPool:
    """Excerpt ids by content: a sequence that several records hold (the release draws every neuron's records from
    one set of sequences) is stored once. A resumed import first tells the pool the excerpts the run holds
    (`known`), so its records point at those instead of storing them again."""

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        self._ids: dict[bytes, int] = {}
        self.new: dict[int, tuple[str, ...]] = {}
        """Excerpts first seen since the last `take_new`."""

    def known(self, excerpt_id: int, tokens: tuple[str, ...]) -> None:
        """An excerpt the store already holds (written by an earlier session of the import)."""
        self._ids.setdefault(_excerpt_key(tokens), excerpt_id)

    def id_of(self, tokens: tuple[str, ...]) -> int:
        key = _excerpt_key(tokens)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = self.next_id
            self.new[found] = tokens
            self.next_id += 1
        return found

    def take_new(self) -> dict[int, tuple[str, ...]]:
        new, self.new = self.new, {}
        return new


def neuron_records(n: ReleaseNeuron, pool: ExcerptPool) -> tuple[ActivationRecord, ...]:
    """A release neuron's top, random and quantile-bin records, their excerpts taken from the pool by content."""
    groups = [("top", -1, n.top), ("random", -1, n.random)]
    groups += [("quantile", b, bin_) for b, bin_ in enumerate(n.quantile)]
    out = []
    ranks: dict[str, int] = {}
    for kind, bin_, excerpts in groups:
        for e in excerpts:
            rank = ranks.get(kind, 0)
            ranks[kind] = rank + 1
            out.append(ActivationRecord(kind=kind, rank=rank, excerpt_id=pool.id_of(e.tokens), tokens=e.tokens,
                                        activations=e.activations, bin=bin_, exact_max=max(e.activations),
                                        exact_min=min(e.activations)))
    return tuple(out)


def results(n: ReleaseNeuron, records: tuple[ActivationRecord, ...], explanations: list[ReleaseExplanation],
             pool: ExcerptPool, authors: list[Authorship]) -> tuple[NeuronResult, tuple[ActivationRecord, ...]]:
    """The release's explanations as our results (by `openai-release`, the best by its published score selected,
    unless `authors`, from our export, says who wrote each), and records of kind 'scored' for the sequences their
    simulations cover that no record holds (so every simulation's true activations stay in the store)."""
    by_tokens = {r.tokens: r for r in records}
    weakest_top = min((r.max for r in records if r.kind == "top"), default=math.inf)
    scale_max = max((r.max for r in records if r.kind == "top"), default=0.0)
    scored: list[ActivationRecord] = []
    out = []
    best = max(range(len(explanations)), key=lambda i: (np.nan_to_num(explanations[i].score, nan=-2.0), -i),
               default=0)
    for i, e in enumerate(explanations):
        sims, kinds, targets, predictions = [], [], [], []
        for s in e.sequences:
            record = by_tokens.get(s.tokens)
            if record is None:
                record = ActivationRecord(kind="scored", rank=len(scored), excerpt_id=pool.id_of(s.tokens),
                                          tokens=s.tokens, activations=s.true, exact_max=max(s.true),
                                          exact_min=min(s.true))
                scored.append(record)
                by_tokens[s.tokens] = record
            strong = record.kind == "top" or (record.kind == "scored" and record.max >= weakest_top)
            kind = "top" if strong else "random"
            predicted = tuple(v * TOP / RELEASE_SCALE for v in s.expected)
            sims.append(Simulation(record.excerpt_id, kind, "test", predicted))
            kinds.append(kind)
            targets.append(np.maximum(np.asarray(s.true, np.float64), 0.0))
            predictions.append(np.asarray(predicted, np.float64))
        seed = n.layer * 100_003 + n.neuron
        ours = list(score(kinds, targets, predictions, scale_max=scale_max, seed=seed).values()) if sims else []
        published = Score("published", e.score, math.nan, math.nan, sum(len(s.tokens) for s in e.sequences),
                          "" if math.isfinite(e.score) else "undefined")
        by = authors[i] if authors else Authorship(RELEASE_EXPLAINER, "candidate", i, i == best, RELEASE_EXPLAINER)
        out.append(ScoredExplanation(
            text=e.text, explainer=by.explainer, role=by.role, sample=by.sample, selected=by.selected,
            simulations=tuple(sims),
            splits=(SplitScores("test", by.simulator or RELEASE_EXPLAINER, (*ours, published)),)))
    return NeuronResult(n.layer, n.neuron, "pos", tuple(out)), tuple(scored)


