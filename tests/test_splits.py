"""Splits of a neuron's records (core/splits.py): interleaved, disjoint, deterministic, sized; the negative
tail from bottom records."""

from __future__ import annotations

import random

import numpy as np
import pytest

from neuronscope.core.explanation.splits import SplitSizes, needed_ranks, split_records, tail_target
from neuronscope.core.records import ActivationRecord

# -- splits ----------------------------------------------------------------------------------------------------

def record(kind: str, rank: int, excerpt_id: int, activations: list[float] | None = None) -> ActivationRecord:
    acts = tuple(activations) if activations is not None else (float(excerpt_id % 7) - 3.0, 1.0, -2.0)
    return ActivationRecord(kind, rank, excerpt_id, tuple(f"t{excerpt_id}_{j}" for j in range(len(acts))), acts)


def neuron_records(top: int = 40, bottom: int = 40, rand: int = 20, quantile: int = 5) -> list[ActivationRecord]:
    out = [record("top", r, 1000 + r) for r in range(top)]
    out += [record("bottom", r, 2000 + r) for r in range(bottom)]
    out += [record("random", r, 3000 + r) for r in range(rand)]
    out += [record("quantile", r, 4000 + r) for r in range(quantile)]
    return out


@pytest.mark.parametrize("tail", ["pos", "neg"])
@pytest.mark.parametrize("sizes", [SplitSizes(), SplitSizes(3, 7, 2), SplitSizes(25, 1, 9), SplitSizes(1, 1, 1)])
def test_the_records_a_job_reads_are_all_the_split_needs(tail: str, sizes: SplitSizes) -> None:
    """A job reads only the best needed_ranks records of each kind: the splits are the same as from all of them."""
    everything = neuron_records(top=120, bottom=120, rand=40)
    limits = needed_ranks(tail, sizes)
    read = [r for r in everything if r.rank < limits.get(r.kind, 0)]
    assert len(read) < len(everything)
    got, want = split_records(read, tail, sizes), split_records(everything, tail, sizes)
    for name in ("train", "select", "test"):
        assert [(e.excerpt_id, e.kind, e.tokens, e.target.tolist()) for e in getattr(got, name)] == \
            [(e.excerpt_id, e.kind, e.tokens, e.target.tolist()) for e in getattr(want, name)]


@pytest.mark.parametrize("tail", ["pos", "neg"])
def test_split_is_interleaved_disjoint_and_sized(tail: str) -> None:
    base = 1000 if tail == "pos" else 2000
    splits = split_records(neuron_records(), tail)
    ids = {name: [e.excerpt_id - base if e.kind == "top" else e.excerpt_id for e in getattr(splits, name)]
           for name in ("train", "select", "test")}
    # Ranked records dealt train, test, train, select; randoms test, select.
    assert ids["train"] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert ids["test"] == [1, 5, 9, 13, 17, 3000, 3002, 3004, 3006, 3008]
    assert ids["select"] == [3, 7, 11, 15, 19, 3001, 3003, 3005, 3007, 3009]
    all_ids = [e.excerpt_id for name in ("train", "select", "test") for e in getattr(splits, name)]
    assert len(all_ids) == len(set(all_ids)) == 30
    assert all(e.kind == "top" for e in splits.train)
    assert [e.kind for e in splits.test] == ["top"] * 5 + ["random"] * 5
    assert not any(4000 <= i < 5000 for i in all_ids)  # quantile records are not used
    if tail == "pos":
        assert not any(2000 <= i < 3000 for i in all_ids)
    else:
        assert not any(1000 <= i < 2000 for i in all_ids)


def test_split_respects_sizes() -> None:
    splits = split_records(neuron_records(), "pos", SplitSizes(train=3, top=2, random=1))
    assert [e.excerpt_id for e in splits.train] == [1000, 1002, 1004]
    assert [e.excerpt_id for e in splits.test] == [1001, 1005, 3000]
    assert [e.excerpt_id for e in splits.select] == [1003, 1007, 3001]
    few = split_records(neuron_records(top=5, rand=1), "pos")
    assert [e.excerpt_id for e in few.train] == [1000, 1002, 1004]
    assert [e.excerpt_id for e in few.test] == [1001, 3000]
    assert [e.excerpt_id for e in few.select] == [1003]
    empty = split_records([], "pos")
    assert empty.train == empty.select == empty.test == () and empty.scale_max == 0.0


def test_split_is_deterministic_whatever_the_order() -> None:
    records = neuron_records()
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    for tail in ("pos", "neg"):
        a, b = split_records(records, tail), split_records(shuffled, tail)
        for name in ("train", "select", "test"):
            left, right = getattr(a, name), getattr(b, name)
            assert [(e.excerpt_id, e.kind, e.tokens) for e in left] == [(e.excerpt_id, e.kind, e.tokens) for e in right]
            assert all(np.array_equal(x.target, y.target) for x, y in zip(left, right))


def test_tails_and_targets() -> None:
    acts = [-3.0, -0.5, 0.0, 0.25, 2.0]
    assert tail_target(acts, "pos").tolist() == [0.0, 0.0, 0.0, 0.25, 2.0]
    assert tail_target(acts, "neg").tolist() == [3.0, 0.5, 0.0, 0.0, 0.0]
    assert tail_target(acts, "neg").dtype == np.float32
    records = [record("top", 0, 1, [1.0, -1.0, 4.0]), record("bottom", 0, 2, [-6.0, 2.0, -0.5]),
               record("top", 1, 3, [0.5]), record("bottom", 1, 4, [-1.0]), record("top", 2, 5, [8.0]),
               record("bottom", 2, 6, [-7.0, -9.0]), record("random", 0, 7, [-2.0, 3.0])]
    pos, neg = split_records(records, "pos"), split_records(records, "neg")
    assert [e.excerpt_id for e in pos.train] == [1, 5] and pos.scale_max == 8.0
    assert [e.excerpt_id for e in neg.train] == [2, 6] and neg.scale_max == 9.0
    assert neg.train[0].target.tolist() == [6.0, 0.0, 0.5] and neg.train[0].kind == "top"
    assert neg.test[0].target.tolist() == [1.0] and neg.test[1].kind == "random"
    assert neg.test[1].target.tolist() == [2.0, 0.0] and pos.test[1].target.tolist() == [0.0, 3.0]


def test_split_rejects_an_unknown_tail() -> None:
    with pytest.raises(ValueError, match="tail"):
        split_records(neuron_records(), "both")
