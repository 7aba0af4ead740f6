"""Turn a finished layer's state into per-neuron statistics and quantile-bin samples (numpy)."""

from __future__ import annotations

import numpy as np

from neuronscope.core.layerdata import CELL_EDGES, LayerResult, LayerSummary, Samples
from neuronscope.core.records import CollectSettings


def moments(sums: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance, skewness, kurtosis and density from power sums [5, F]."""
    n = max(count, 1)
    m1, m2, m3, m4 = (sums[i] / n for i in range(4))
    var = np.maximum(m2 - m1**2, 0.0)
    c3 = m3 - 3 * m1 * m2 + 2 * m1**3
    c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
    tiny = var <= 1e-12 * np.maximum(m2, 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(tiny, 0.0, c3 / var**1.5)
        kurt = np.where(tiny, 0.0, c4 / var**2)
    return m1, var, skew, kurt, sums[4] / n


def quantile_edges(result: LayerResult, quantiles: tuple[float, ...]) -> np.ndarray:
    """Excerpt-max value at each quantile: exact from the top-k list where it reaches, else
    interpolated within the cell of the exact per-cell counts.  # [F, Q]"""
    counts = result.cell_counts.astype(np.float64)  # [F, C]
    total = counts.sum(1, keepdims=True)
    lo_all = result.min_excerpt_max[:, None].astype(np.float64)
    hi_all = result.max[:, None].astype(np.float64)
    lower = np.concatenate([np.full((counts.shape[0], 1), -np.inf), np.broadcast_to(CELL_EDGES, (counts.shape[0], len(CELL_EDGES)))], 1)
    upper = np.concatenate([np.broadcast_to(CELL_EDGES, (counts.shape[0], len(CELL_EDGES))), np.full((counts.shape[0], 1), np.inf)], 1)
    lower = np.clip(lower, lo_all, hi_all)
    upper = np.clip(upper, lo_all, hi_all)
    cum = np.cumsum(counts, 1)
    top = result.samples["top"]
    top_max = np.where(top.ids >= 0, top.maxes, np.nan)  # [F, k] descending
    edges = np.empty((counts.shape[0], len(quantiles)))
    rows = np.arange(counts.shape[0])
    for j, q in enumerate(quantiles):
        target = q * total[:, 0]
        cell = np.minimum((cum < target[:, None]).sum(1), counts.shape[1] - 1)
        before = np.where(cell > 0, cum[rows, np.maximum(cell - 1, 0)], 0.0)
        inside = counts[rows, cell]
        frac = np.where(inside > 0, (target - before) / np.maximum(inside, 1), 0.0)
        value = lower[rows, cell] + np.clip(frac, 0, 1) * (upper[rows, cell] - lower[rows, cell])
        # Exact order statistic where the top-k list reaches that rank.
        rank = np.floor((1.0 - q) * total[:, 0]).astype(np.int64)
        reach = (rank < top_max.shape[1]) & (total[:, 0] > 0) if top_max.shape[1] else np.zeros_like(rank, bool)
        if reach.any():
            exact = top_max[rows, np.clip(rank, 0, max(top_max.shape[1] - 1, 0))]
            value = np.where(reach & ~np.isnan(exact), exact, value)
        edges[:, j] = np.where(q <= 0, result.min_excerpt_max, value)
    return edges.astype(np.float32)


def quantile_samples(result: LayerResult, settings: CollectSettings, edges: np.ndarray) -> Samples:
    """Up to quantile_k excerpts per bin: the smallest hash keys among the kept candidates whose
    excerpt max lies in the bin.  Slot j of a neuron belongs to bin j // quantile_k."""
    import torch

    from neuronscope.core.collection.sampling import composite, hash_keys

    parts = [result.samples[kind] for kind in ("cell", "random", "top")]
    ids = np.concatenate([p.ids for p in parts], 1)  # [F, M]
    ex_max = np.concatenate([p.maxes for p in parts], 1)  # [F, M] exact, whatever the acts' precision
    ex_min = np.concatenate([p.mins for p in parts], 1)
    n_neurons, n_cand = ids.shape
    k = settings.quantile_k
    bins = len(settings.quantiles) - 1
    out = Samples(
        ids=np.full((n_neurons, bins * k), -1, np.int64),
        scales=np.zeros((n_neurons, bins * k), np.float32),
        codes=np.zeros((n_neurons, bins * k, parts[0].codes.shape[2]), np.int8),
        maxes=np.zeros((n_neurons, bins * k), np.float32),
        mins=np.zeros((n_neurons, bins * k), np.float32),
    )
    if n_cand == 0 or k == 0:
        return out
    # Each neuron's candidates in the order of (hash key, id), sorted once for every bin. An excerpt kept by more
    # than one sampler (a cell candidate and a random or top one) has the same key each time: the copies are
    # neighbours, and all but the first are dropped.
    cand = torch.from_numpy(ids)
    by_key = torch.sort(composite(hash_keys(settings.seed, result.layer, torch.arange(n_neurons)[:, None], cand), cand),
                        dim=1, stable=True)
    ordered, order = by_key.values.numpy(), by_key.indices.numpy()
    valid = np.take_along_axis(ids, order, 1) >= 0
    valid[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    ex_sorted = np.take_along_axis(ex_max, order, 1)
    picked = np.full((n_neurons, bins * k), -1, np.int64)  # [F, bins * k]: the chosen candidate, -1 for none
    for b in range(bins):  # the first k of the bin's candidates
        inside = valid & (ex_sorted >= edges[:, b : b + 1]) & (ex_sorted < edges[:, b + 1 : b + 2])
        rank = np.cumsum(inside, 1, dtype=np.int32)  # among the bin's candidates, from 1
        who, at = np.nonzero(inside & (rank <= k))
        picked[who, b * k + rank[who, at] - 1] = order[who, at]
    who, slot = np.nonzero(picked >= 0)
    chosen = picked[who, slot]
    out.ids[who, slot] = ids[who, chosen]
    out.maxes[who, slot] = ex_max[who, chosen]
    out.mins[who, slot] = ex_min[who, chosen]
    start = 0  # the activations from each kind's rows, without joining them (a layer's are megabytes)
    for part in parts:
        here = (chosen >= start) & (chosen < start + part.ids.shape[1])
        out.codes[who[here], slot[here]] = part.codes[who[here], chosen[here] - start]
        out.scales[who[here], slot[here]] = part.scales[who[here], chosen[here] - start]
        start += part.ids.shape[1]
    return out


def first_peaks(top: Samples, skip: int) -> np.ndarray:
    """[F] the share of each neuron's top records whose activation at the first position counted (`skip`) is above
    every later one, as stored: compared in codes, which order as the activations they stand for do (a record of
    NaN or infinite scale has no first peak; one of scale 0 is all zero codes)."""
    codes = top.codes[:, :, skip:]  # [F, k, T - skip]
    valid = top.ids >= 0
    if codes.shape[2] < 2 or not codes.shape[1]:
        return np.zeros(len(top.ids), np.float32)
    first = (codes[:, :, 0] > codes[:, :, 1:].max(2)) & valid & np.isfinite(top.scales)
    return (first.sum(1) / np.maximum(valid.sum(1), 1)).astype(np.float32)


def summarize(result: LayerResult, settings: CollectSettings) -> LayerSummary:
    """Statistics, quantile edges and quantile samples of one finished layer."""
    mean, var, skew, kurt, density = moments(result.sums, result.count)
    with_median = quantile_edges(result, (*settings.quantiles, 0.5))  # one pass for the bins and the median
    edges, median = with_median[:, :-1], with_median[:, -1]
    quantile = quantile_samples(result, settings, edges)
    top = result.samples["top"]
    top_max = np.where(top.ids >= 0, top.maxes, np.nan)
    mean_top = np.nanmean(top_max, 1) if top_max.shape[1] else np.zeros(len(mean))
    std = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        sel = np.where(std > 0, (mean_top - median) / std, 0.0)
    return LayerSummary(
        first_peak=first_peaks(top, settings.skip_positions),
        mean=mean,
        variance=var,
        skewness=skew,
        kurtosis=kurt,
        density=density,
        selectivity=np.nan_to_num(sel).astype(np.float32),
        quantile_edges=edges,
        quantile=quantile,
    )
