"""Comparing two sets of explanations on the neurons both scored: the paired difference of their headline scores
(B − A), with a percentile bootstrap interval over neurons, and how many neurons B wins, loses and ties."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from neuronscope.core.ids import NeuronId

#: Bootstrap resamples of the neurons.
RESAMPLES = 10_000
#: Resampled neuron indices held at once (resamples × neurons), so a comparison over every neuron of GPT-2 XL stays
#: within a few hundred MB.
_CHUNK = 20_000_000


@dataclass(frozen=True)
class Comparison:
    """Two sets' headline scores on the neurons both have, and what they say together."""

    neurons: tuple[NeuronId, ...]
    """The paired neurons, by layer and index."""
    a: np.ndarray
    """Set A's scores, in the order of `neurons`."""
    b: np.ndarray
    """Set B's scores."""
    only_a: int
    """Neurons only A scored (left out of the pairing)."""
    only_b: int
    """Neurons only B scored."""
    difference: float
    """Mean of B − A over the paired neurons."""
    ci_low: float
    """Lower end of the bootstrap interval of `difference`."""
    ci_high: float
    """Upper end."""
    wins: int
    """Neurons where B beats A by more than the tie margin."""
    losses: int
    """Neurons where A beats B by more than the tie margin."""
    ties: int
    """Neurons within the tie margin."""

    @property
    def deltas(self) -> np.ndarray:
        return self.b - self.a


def paired_interval(deltas: np.ndarray, *, seed: int = 0, resamples: int = RESAMPLES,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences: neurons resampled with replacement."""
    n = len(deltas)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        means[start:start + count] = deltas[rng.integers(0, n, size=(count, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def compare_scores(a: Mapping[NeuronId, float], b: Mapping[NeuronId, float], *, tie: float = 0.01, seed: int = 0,
                   resamples: int = RESAMPLES, confidence: float = 0.95) -> Comparison:
    """Pair two sets' scores by neuron and compare them (B − A)."""
    neurons = tuple(sorted(set(a) & set(b)))
    a_scores = np.array([a[n] for n in neurons], dtype=np.float64)
    b_scores = np.array([b[n] for n in neurons], dtype=np.float64)
    deltas = b_scores - a_scores
    low, high = paired_interval(deltas, seed=seed, resamples=resamples, confidence=confidence)
    return Comparison(
        neurons=neurons, a=a_scores, b=b_scores, only_a=len(set(a) - set(b)), only_b=len(set(b) - set(a)),
        difference=float(deltas.mean()) if len(deltas) else float("nan"), ci_low=low, ci_high=high,
        wins=int((deltas > tie).sum()), losses=int((deltas < -tie).sum()), ties=int((np.abs(deltas) <= tie).sum()))
