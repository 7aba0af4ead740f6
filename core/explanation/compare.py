"""Comparing two sets of explanations on the neurons both scored: the paired difference of their headline scores
(B − A), with a percentile bootstrap interval over neurons, and how many neurons B wins, loses and ties."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from neuronscope.core.ids import NeuronId

#: Bootstrap resamples of the neurons.
RESAMPLES = 10_000
#: Fewer paired neurons than this give no meaningful bootstrap interval (a resample of one neuron is that neuron).
MIN_PAIRS = 5
#: Resampled neuron indices a thread holds at once (with the differences they pick: 2 MB), whatever the number of
#: neurons: time grows as resamples × neurons, memory stays within _WORKERS × this (16 MB).
_CHUNK = 125_000
#: Resamples drawn from one stream of the seed (a unit of work for a thread).
_BLOCK = 100
#: At most this many threads; a bootstrap of fewer draws (resamples × neurons) than _THREADED runs in the caller's.
_WORKERS, _THREADED = 8, 20_000_000


@dataclass(frozen=True)
class Comparison:
    """Two sets' headline scores on the neurons both have, and what they say together."""

    neurons: tuple[NeuronId, ...]
    """The paired neurons, by layer and index."""
    a: np.ndarray
    """Set A's scores, in the order of `neurons`."""
    b: np.ndarray
    """Set B's scores."""
    deltas: np.ndarray
    """B − A per paired neuron."""
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

    def by_change(self) -> np.ndarray:
        """Indices of the paired neurons, largest |B − A| first, equal changes in neuron order (O(n log n))."""
        return np.argsort(-np.abs(self.deltas), kind="stable")

    @property
    def interval_meaningful(self) -> bool:
        """Whether enough neurons are paired (MIN_PAIRS) for the bootstrap interval to say anything."""
        return len(self.neurons) >= MIN_PAIRS


def paired_interval(deltas: np.ndarray, *, seed: int = 0, resamples: int = RESAMPLES, confidence: float = 0.95,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences: neurons resampled with replacement. Blocks of
    _BLOCK resamples, each from its own stream of the seed, run on the CPU's cores (numpy leaves the GIL for the
    draws and sums), so the interval depends on the seed and the differences alone, not on the machine's cores.
    `progress("bootstrap", done, resamples)` as blocks finish."""
    values = np.asarray(deltas, dtype=np.float64)  # [n]
    if len(values) == 0:
        return float("nan"), float("nan")
    starts = range(0, resamples, _BLOCK)
    streams = np.random.SeedSequence(seed).spawn(len(starts))
    sums = np.empty(resamples)  # [resamples] each resample's sum of n drawn differences

    def block(i: int) -> int:
        count = min(_BLOCK, resamples - starts[i])
        sums[starts[i]:starts[i] + count] = _resample_sums(values, np.random.default_rng(streams[i]), count)
        return count

    # Worker threads even when one will do: glibc gives the main thread's freed chunks back to the system, and
    # faulting them in again doubled the time.
    workers = min(os.cpu_count() or 1, _WORKERS, len(starts)) if len(values) * resamples >= _THREADED else 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bootstrap")
    done = 0
    try:
        for future in as_completed([pool.submit(block, i) for i in range(len(starts))]):
            done += future.result()
            if progress is not None:
                progress("bootstrap", done, resamples)
    finally:  # on Ctrl-C the blocks not started are dropped, not run
        pool.shutdown(wait=True, cancel_futures=True)
    tail = (1 - confidence) / 2
    low, high = np.quantile(sums / len(values), [tail, 1 - tail])
    return float(low), float(high)


def _resample_sums(values: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """[count] sums of `count` resamples of `values` (n draws each, with replacement), at most _CHUNK draws held at
    once: several resamples a chunk, or one resample in parts when n exceeds _CHUNK."""
    n = len(values)
    sums = np.zeros(count)
    rows = max(1, _CHUNK // n)
    for start in range(0, count, rows):
        if n <= _CHUNK:
            k = min(rows, count - start)
            sums[start:start + k] = np.take(values, rng.integers(0, n, size=(k, n))).sum(axis=1)  # [k, n] drawn
        else:
            for part in range(0, n, _CHUNK):
                sums[start] += np.take(values, rng.integers(0, n, size=min(_CHUNK, n - part))).sum()
    return sums


def compare_scores(a: Mapping[NeuronId, float], b: Mapping[NeuronId, float], *, tie: float = 0.01, seed: int = 0,
                   resamples: int = RESAMPLES, confidence: float = 0.95,
                   progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """Pair two sets' scores by neuron and compare them (B − A); `progress` as paired_interval's."""
    neurons = tuple(sorted(a.keys() & b.keys()))
    a_scores = np.fromiter((a[n] for n in neurons), dtype=np.float64, count=len(neurons))
    b_scores = np.fromiter((b[n] for n in neurons), dtype=np.float64, count=len(neurons))
    deltas = b_scores - a_scores
    low, high = paired_interval(deltas, seed=seed, resamples=resamples, confidence=confidence, progress=progress)
    return Comparison(
        neurons=neurons, a=a_scores, b=b_scores, deltas=deltas, only_a=len(a) - len(neurons),
        only_b=len(b) - len(neurons), difference=float(deltas.mean()) if len(deltas) else float("nan"), ci_low=low,
        ci_high=high, wins=int((deltas > tie).sum()), losses=int((deltas < -tie).sum()),
        ties=int((np.abs(deltas) <= tie).sum()))
