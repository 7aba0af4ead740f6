"""AUROC and its bootstrap interval, shared by the detection, fuzzing and embedding scorers.

AUROC here is the Mann–Whitney statistic: the chance that a random positive scores above a random
negative, ties counting one half (0.5 is chance, 1.0 perfect separation, 0.0 perfectly inverted).
An empty side has no AUROC: both functions raise ValueError rather than invent 0.5, because the
scorers choose their own excerpts and an empty side is a bug in the caller, not a neuron at chance.
Pure numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Most cells (resamples x negatives) one bootstrap block holds, to bound memory on large inputs.
_BLOCK_CELLS = 1 << 22


def _sides(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUROC needs both sides: got {pos.size} positives and {neg.size} negatives")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("AUROC of NaN scores is undefined: drop or fix them first")
    return pos, neg


def _below_and_ties(pos: np.ndarray, neg_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each positive, the index into neg_sorted of the first negative >= it and the first > it."""
    return np.searchsorted(neg_sorted, pos, "left"), np.searchsorted(neg_sorted, pos, "right")


def auroc(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> float:
    """P(positive > negative) + P(positive == negative) / 2, exactly, in O((p + n) log n)."""
    pos, neg = _sides(positives, negatives)
    lo, hi = _below_and_ties(pos, np.sort(neg))
    # negatives strictly below each positive = lo; ties = hi - lo; below + ties / 2 = (lo + hi) / 2.
    return float((lo.sum() + hi.sum()) / (2.0 * pos.size * neg.size))


def auroc_interval(
    positives: Sequence[float] | np.ndarray,
    negatives: Sequence[float] | np.ndarray,
    seed: int,
    n: int = 1000,
) -> tuple[float, float]:
    """95 % percentile interval of the AUROC over n stratified bootstrap resamples.

    Positives and negatives are resampled separately (each keeps its size), so every resample has
    both sides. A resample is drawn as multinomial counts over the original values, and its AUROC is
    read from cumulative negative counts at each positive's rank: no loop over resamples (only over
    memory-bounded blocks of them). The same inputs and seed give the same interval.
    """
    if n < 1:
        raise ValueError(f"the bootstrap needs at least one resample, not {n}")
    pos, neg = _sides(positives, negatives)
    neg_sorted = np.sort(neg)
    lo, hi = _below_and_ties(pos, neg_sorted)
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    block = max(1, _BLOCK_CELLS // (neg.size + pos.size + 1))
    for start in range(0, n, block):
        m = min(block, n - start)
        pos_counts = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=m)  # [m, p]
        neg_counts = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=m)  # [m, n], sorted order
        cum = np.zeros((m, neg.size + 1))
        np.cumsum(neg_counts, axis=1, out=cum[:, 1:])  # cum[:, k] = resampled negatives among the k smallest
        twice_below = cum[:, lo] + cum[:, hi]  # [m, p]: 2 * (below + ties / 2) for each original positive
        stats[start:start + m] = (pos_counts * twice_below).sum(axis=1) / (2.0 * pos.size * neg.size)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)
