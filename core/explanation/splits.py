"""Deterministic, interleaved splits of a neuron's records for one tail.

The tail's ranked records (top records for the positive tail, bottom records for the negative one)
are dealt in a repeating pattern of four: train, test, train, select. Explanations see only train
records; candidates are chosen on select; the headline score is measured on test. Random records
alternate test, select. Every split is disjoint from the others, and the same records always land
in the same split, so scores are reproducible and comparable across explainers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuronscope.core.choices import TAILS
from neuronscope.core.llm.prompts import Example
from neuronscope.core.records import ActivationRecord

_PATTERN = ("train", "test", "train", "select")


@dataclass(frozen=True)
class SplitSizes:
    """How many excerpts each split takes."""

    train: int = 10
    """Top excerpts shown to the explainer."""
    top: int = 5
    """Top excerpts in each of select and test."""
    random: int = 5
    """Random excerpts in each of select and test."""


@dataclass(frozen=True)
class NeuronSplits:
    """A neuron's excerpts for one tail, split."""

    train: tuple[Example, ...]
    """Explanation examples."""
    select: tuple[Example, ...]
    """For choosing among candidate explanations."""
    test: tuple[Example, ...]
    """For the headline score."""

    @property
    def scale_max(self) -> float:
        """The largest target value in the train excerpts (the top of the 0-9 scale)."""
        return max((float(np.max(e.target)) for e in self.train if len(e.target)), default=0.0)


def tail_target(activations: Sequence[float], tail: str) -> np.ndarray:
    """What a tail explains: max(a, 0) for pos, max(-a, 0) for neg."""
    a = np.asarray(activations, np.float32)
    return np.maximum(a, 0) if tail == "pos" else np.maximum(-a, 0)


def needed_ranks(tail: str, sizes: SplitSizes) -> dict[str, int]:
    """How many of a neuron's best-ranked records of each kind `split_records` can use for a tail: a job reads no
    more (the ranked ones are dealt train, test, train, select; the random ones test, select)."""
    ranked = max(2 * sizes.train, 4 * sizes.top)
    return {"top" if tail == "pos" else "bottom": ranked, "random": 2 * sizes.random}


def split_records(records: Sequence[ActivationRecord], tail: str, sizes: SplitSizes = SplitSizes()) -> NeuronSplits:
    """Split a neuron's records (as `Store.records` returns them) for a tail."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}")
    ranked_kind = "top" if tail == "pos" else "bottom"
    ranked = sorted((r for r in records if r.kind == ranked_kind), key=lambda r: r.rank)
    randoms = sorted((r for r in records if r.kind == "random"), key=lambda r: r.rank)

    def example(record: ActivationRecord, kind: str) -> Example:
        return Example(record.excerpt_id, kind, record.tokens, tail_target(record.activations, tail))

    parts: dict[str, list[Example]] = {"train": [], "select": [], "test": []}
    for i, record in enumerate(ranked):
        parts[_PATTERN[i % len(_PATTERN)]].append(example(record, "top"))
    rand: dict[str, list[Example]] = {"test": [], "select": []}
    for i, record in enumerate(randoms):
        rand["test" if i % 2 == 0 else "select"].append(example(record, "random"))
    return NeuronSplits(
        train=tuple(parts["train"][: sizes.train]),
        select=tuple(parts["select"][: sizes.top] + rand["select"][: sizes.random]),
        test=tuple(parts["test"][: sizes.top] + rand["test"][: sizes.random]),
    )
