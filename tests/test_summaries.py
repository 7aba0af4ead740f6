"""Tests for core/summarize.py (moments, quantile edges and quantile samples) against plain numpy, on states
streamed through LayerAccumulator (tests/sampling_data.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sampling_data import SETTINGS, accumulate, make_data, quantile_samples

from neuronscope.core.collection.sampling import hash_keys
from neuronscope.core.collection.summarize import moments, quantile_edges, summarize
from neuronscope.core.layerdata import CELL_EDGES, LayerResult, dequantize, quantize
from neuronscope.core.records import CollectSettings


def reference_moments(acts: np.ndarray) -> tuple[np.ndarray, ...]:
    a = acts.astype(np.float64).reshape(-1, acts.shape[2])
    mean = a.mean(0)
    c = a - mean
    var = (c**2).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(var > 0, (c**3).mean(0) / var**1.5, 0.0)
        kurt = np.where(var > 0, (c**4).mean(0) / var**2, 0.0)
    return mean, var, skew, kurt, (a > 0).mean(0)


def test_moments_match_numpy(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, _ = sampled
    summary = summarize(sampled_state, SETTINGS)
    mean, var, skew, kurt, density = reference_moments(acts)
    scale = np.sqrt(var) + 1e-30
    np.testing.assert_allclose(summary.mean / scale, mean / scale, atol=1e-5)
    np.testing.assert_allclose(summary.variance, var, rtol=1e-4)
    np.testing.assert_allclose(summary.skewness, skew, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(summary.kurtosis, kurt, rtol=1e-3)
    assert np.array_equal(summary.density, density)
    # The all-zero neuron: no division by zero.
    assert (summary.mean[0], summary.variance[0], summary.skewness[0], summary.kurtosis[0]) == (0, 0, 0, 0)
    assert summary.density[0] == 0
    assert np.isfinite(summary.selectivity).all()
    # moments() on hand-made sums: values 1, 2, 3, 6 -> mean 3, var 3.5.
    v = np.array([1.0, 2.0, 3.0, 6.0])
    sums = np.array([[(v**p).sum()] for p in (1, 2, 3, 4)] + [[4.0]])
    m, var1, sk, ku, de = moments(sums, 4)
    assert m[0] == 3.0 and var1[0] == 3.5 and de[0] == 1.0
    assert math.isclose(sk[0], ((v - 3) ** 3).mean() / 3.5**1.5) and math.isclose(ku[0], ((v - 3) ** 4).mean() / 3.5**2)


def test_moments_precise_for_offset_neurons() -> None:
    """A neuron whose mean is large against its spread (e.g. a constant offset) still gets its moments.

    Mean 100 std (an almost constant neuron), default length 64, 64 excerpts a batch: power sums kept in
    float32 cancel catastrophically in the central moments (kurtosis came out negative)."""
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((512, 64, 3)) * np.array([1.0, 0.1, 0.1]) + np.array([0.0, 1.0, 10.0]))
    acts = acts.astype(np.float32)
    settings = CollectSettings(length=64, top_k=2, bottom_k=2, random_k=2, quantile_k=1, seed=0, hist_stride=4)
    result = accumulate(acts, np.arange(512), settings, sizes=(64,))
    summary = summarize(result, settings)
    _, var, skew, kurt, _ = reference_moments(acts)
    np.testing.assert_allclose(summary.variance, var, rtol=1e-3)
    np.testing.assert_allclose(summary.skewness, skew, atol=1e-2)
    assert (summary.kurtosis >= 1).all(), summary.kurtosis  # kurtosis >= 1 for any distribution
    np.testing.assert_allclose(summary.kurtosis, kurt, rtol=1e-2)


def test_quantile_edges_and_samples(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    n, _, f = acts.shape
    summary = summarize(sampled_state, SETTINGS)
    edges, (q_ids, q_acts) = summary.quantile_edges, quantile_samples(summary)
    bins = len(SETTINGS.quantiles) - 1
    assert edges.shape == (f, len(SETTINGS.quantiles))
    assert q_ids.shape == (f, bins, SETTINGS.quantile_k)
    assert q_acts.shape == (f, bins, SETTINGS.quantile_k, SETTINGS.length)
    ex_max = acts.max(1)
    where = {int(e): i for i, e in enumerate(ids)}
    assert (np.diff(edges, axis=1) >= 0).all()
    assert np.array_equal(edges[:, 0], ex_max.min(0))
    for j in range(f):
        ordered = np.sort(ex_max[:, j])
        for qi, q in enumerate(SETTINGS.quantiles[1:], 1):
            rank = math.floor((1 - q) * n)
            if rank < SETTINGS.top_k:  # exact: the rank-th largest excerpt max, from the top-k list
                assert edges[j, qi] == ordered[::-1][rank], (j, q)
            else:  # interpolated, but inside the cell that holds the true quantile
                true = ordered[math.ceil(q * n) - 1]
                cell = np.searchsorted(CELL_EDGES, true, side="left")
                lo = CELL_EDGES[cell - 1] if cell > 0 else -np.inf
                hi = CELL_EDGES[cell] if cell < len(CELL_EDGES) else np.inf
                lo, hi = max(lo, ordered[0]), min(hi, ordered[-1])
                assert lo <= edges[j, qi] <= hi, (j, q, lo, edges[j, qi], hi)
        chosen = q_ids[j][q_ids[j] >= 0]
        assert len(np.unique(chosen)) == len(chosen), j  # no excerpt twice within a neuron
        for b in range(bins):
            for s, e in enumerate(q_ids[j, b]):
                if e < 0:
                    assert (q_acts[j, b, s] == 0).all()
                    continue
                pos = where[int(e)]
                assert edges[j, b] <= ex_max[pos, j] < edges[j, b + 1], (j, b, e)
                assert np.array_equal(q_acts[j, b, s], dequantize(*quantize(acts[pos, :, j][None]))[0])  # as stored
            filled = (q_ids[j, b] >= 0).sum()
            # The bin's kept candidates (cell, random and top records) with the smallest hash keys, ties by id.
            kept = np.unique(np.concatenate([sampled_state.samples[kind].ids[j] for kind in ("cell", "random", "top")]))
            kept = kept[kept >= 0]
            kept_max = ex_max[[where[int(e)] for e in kept], j]
            kept = kept[(edges[j, b] <= kept_max) & (kept_max < edges[j, b + 1])]
            keys = hash_keys(SETTINGS.seed, sampled_state.layer, torch.tensor(j), torch.from_numpy(kept)).numpy()
            assert np.array_equal(q_ids[j, b, :filled], kept[np.lexsort((kept, keys))][: SETTINGS.quantile_k]), (j, b)
            # Slots fill in order; a bin holding at least quantile_k excerpts is full unless it is
            # degenerate (ties making it empty: the all-zero and quantised neurons).
            assert (q_ids[j, b, :filled] >= 0).all() and (q_ids[j, b, filled:] < 0).all()
            in_bin = ((ex_max[:, j] >= edges[j, b]) & (ex_max[:, j] < edges[j, b + 1])).sum()
            assert filled <= in_bin
            if j >= 3:
                assert filled == SETTINGS.quantile_k, (j, b, in_bin)
    assert (edges[0] == 0).all() and (q_ids[0] == -1).all()  # the all-zero neuron: every bin is [0, 0)


def test_quantile_edges_exact_without_top_k() -> None:
    """With top_k = 0 the edges come from the cell counts only, and still stay ordered and in range."""
    acts, ids = make_data(300, 6, 8, seed=6)
    settings = CollectSettings(length=6, top_k=0, bottom_k=0, random_k=4, quantile_k=2, seed=1, hist_stride=2)
    result = accumulate(acts, ids, settings)
    edges = quantile_edges(result, settings.quantiles)
    assert (np.diff(edges, axis=1) >= 0).all()
    assert (edges >= result.min_excerpt_max[:, None]).all() and (edges <= result.max[:, None]).all()
    summary = summarize(result, settings)
    assert quantile_samples(summary)[0].shape == (8, len(settings.quantiles) - 1, 2)
    assert np.isfinite(summary.selectivity).all()


def test_moments_precise_behind_a_massive_first_position() -> None:
    """A CPU collection sums each excerpt's powers in float32 about one of its own values, in one read. Many models
    put a massive activation at the first position (skip_positions defaults to 0): sums about that value came out
    two orders of magnitude less precise than sums about the excerpt's mean (a second read), offset neuron or not."""
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((256, 64, 3)) * 0.1 + np.array([0.0, 10.0, 100.0])
    acts[:, 0, :] += 5.0  # the first position
    acts = acts.astype(np.float32)
    settings = CollectSettings(length=64, top_k=2, bottom_k=2, random_k=2, quantile_k=1, seed=0, hist_stride=4)
    summary = summarize(accumulate(acts, np.arange(256), settings, sizes=(64,)), settings)
    _, var, skew, kurt, _ = reference_moments(acts)
    for got, want in ((summary.variance, var), (summary.skewness, skew), (summary.kurtosis, kurt)):
        np.testing.assert_allclose(got, want, rtol=2e-7)  # about the mean: 1e-8; about the first value: 3e-6
