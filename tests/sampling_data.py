"""Shared by the sampler and summary tests: awkward random activations, streaming them through LayerAccumulator in
uneven batches (conftest.py's fixtures `sampled` and `sampled_state` are made of them)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neuronscope.core.collection.accumulate import LayerAccumulator
from neuronscope.core.layerdata import LayerResult, LayerSummary
from neuronscope.core.records import CollectSettings

CPU = torch.device("cpu")
LAYER = 4
KINDS = ("top", "bottom", "random", "cell")


# -- data and feeding ---------------------------------------------------------------------------------

def make_data(n: int, t: int, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n, t, f] float32 with awkward neurons first, and distinct shuffled excerpt ids [n].

    neuron 0: all zero; 1: quantised to halves (many tied maxima and minima); 2: clipped at 1.5 (most
    excerpt maxima exactly 1.5); 3: sparse and positive (GELU-like); 4: heavy-tailed; rest: normal
    with scales spread over several cells of excerpt maxima.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, f))
    scales = 2.0 ** rng.uniform(-5, 5, f)
    acts = x * scales
    acts[:, :, 0] = 0.0
    acts[:, :, 1] = np.round(x[:, :, 1] * 2) / 2
    acts[:, :, 2] = np.minimum(x[:, :, 2], 1.5)
    acts[:, :, 3] = np.maximum(x[:, :, 3] - 2.0, 0.0) * 5
    acts[:, :, 4] = rng.standard_t(3, (n, t))
    ids = rng.choice(50 * n, size=n, replace=False).astype(np.int64)
    return acts.astype(np.float32), ids


def feed(acc: LayerAccumulator, acts: np.ndarray, ids: np.ndarray, sizes: Sequence[int],
         order: np.ndarray | None = None, dtype: torch.dtype = torch.float32) -> LayerAccumulator:
    """Stream the excerpts (in `order`) through acc in batches of the given sizes, cycling; last one partial."""
    order = np.arange(len(ids)) if order is None else order
    start, i = 0, 0
    while start < len(order):
        sel = order[start : start + sizes[i % len(sizes)]]
        acc.update(torch.from_numpy(acts[sel]).to(dtype), torch.from_numpy(ids[sel]))
        start += len(sel)
        i += 1
    return acc


def accumulate(acts: np.ndarray, ids: np.ndarray, settings: CollectSettings, sizes: Sequence[int] = (7, 13, 1, 32),
               order: np.ndarray | None = None) -> LayerResult:
    acc = LayerAccumulator(LAYER, acts.shape[2], settings, torch.float32, CPU)
    return feed(acc, acts, ids, sizes, order).result()



SETTINGS = CollectSettings(length=10, top_k=80, bottom_k=5, random_k=6, quantile_k=3,
                           quantiles=(0.0, 0.5, 0.9, 0.99), seed=11, hist_stride=3)



def quantile_samples(summary: LayerSummary) -> tuple[np.ndarray, np.ndarray]:
    """Quantile samples as [F, bins, k] ids and [F, bins, k, T] activations."""
    bins = summary.quantile_edges.shape[1] - 1
    ids, acts = summary.quantile.ids, summary.quantile.acts
    f = ids.shape[0]
    return ids.reshape(f, bins, -1), acts.reshape(f, bins, ids.shape[1] // bins, -1)
