"""Tests for core/sampling.py, core/accumulate.py and core/summarize.py against brute-force references.

Random activations [N, T, F] are streamed through LayerAccumulator in uneven, shuffled batches; every
record sampler, statistic and histogram is then recomputed from the whole tensor with plain numpy and
compared. Ties (quantised and all-zero neurons) check that results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from neuronscope.core.collection.accumulate import LayerAccumulator
from neuronscope.core.collection.sampling import hash_keys
from neuronscope.core.collection.summarize import moments, quantile_edges, summarize
from neuronscope.core.layerdata import CELL_EDGES, CELL_K, CELLS, HIST_EDGES, LayerResult
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


# -- brute-force references ---------------------------------------------------------------------------

def smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest (key, id), in that order."""
    return np.lexsort((ids, keys))[:k]


def rand_keys(settings: CollectSettings, neuron: int, ids: np.ndarray) -> np.ndarray:
    return hash_keys(settings.seed, LAYER, torch.tensor(neuron), torch.from_numpy(ids)).numpy()


def reference_samples(acts: np.ndarray, ids: np.ndarray, settings: CollectSettings) -> dict[str, list[np.ndarray]]:
    """kind -> per neuron, the positions (into acts) expected in each slot, -1 for an empty slot."""
    n, _, f = acts.shape
    ex_max, ex_min = acts.max(1), acts.min(1)
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}

    def pad(pos: np.ndarray, k: int) -> np.ndarray:
        return np.concatenate([pos, np.full(k - len(pos), -1)]).astype(np.int64)

    for j in range(f):
        out["top"].append(pad(smallest(-ex_max[:, j], ids, settings.top_k), settings.top_k))
        out["bottom"].append(pad(smallest(ex_min[:, j], ids, settings.bottom_k), settings.bottom_k))
        keys = rand_keys(settings, j, ids)
        out["random"].append(pad(smallest(keys, ids, settings.random_k), settings.random_k))
        cells = np.searchsorted(CELL_EDGES, ex_max[:, j], side="left")
        per_cell = []
        for c in range(CELLS):
            inside = np.nonzero(cells == c)[0]
            per_cell.append(pad(inside[smallest(keys[inside], ids[inside], CELL_K)], CELL_K))
        out["cell"].append(np.concatenate(per_cell))
    return out


def check_samples(result: LayerResult, acts: np.ndarray, ids: np.ndarray, settings: CollectSettings) -> None:
    expected = reference_samples(acts, ids, settings)
    for kind in KINDS:
        got_ids, got_acts = result.samples[kind].ids, result.samples[kind].acts
        for j, pos in enumerate(expected[kind]):
            want_ids = np.where(pos >= 0, ids[pos], -1)
            assert np.array_equal(got_ids[j], want_ids), (kind, j, got_ids[j], want_ids)
            want_acts = np.where((pos >= 0)[:, None], acts[pos][:, :, j], 0.0)
            assert np.array_equal(got_acts[j], want_acts), (kind, j)


def assert_same_result(a: LayerResult, b: LayerResult) -> None:
    """Identical samples and counts; sums equal up to float summation order."""
    assert a.layer == b.layer and a.count == b.count
    for kind in KINDS:
        assert np.array_equal(a.samples[kind].ids, b.samples[kind].ids), kind
        assert np.array_equal(a.samples[kind].acts, b.samples[kind].acts), kind
    for name in ("max", "min", "min_excerpt_max", "histogram", "cell_counts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-5, atol=1e-6 * np.abs(a.sums).max())


SETTINGS = CollectSettings(length=10, top_k=80, bottom_k=5, random_k=6, quantile_k=3,
                           quantiles=(0.0, 0.5, 0.9, 0.99), seed=11, hist_stride=3)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data(600, SETTINGS.length, 12, seed=1)


@pytest.fixture(scope="module")
def single(data: tuple[np.ndarray, np.ndarray]) -> LayerResult:
    acts, ids = data
    return accumulate(acts, ids, SETTINGS)


# -- record samplers ----------------------------------------------------------------------------------

def test_samplers_match_brute_force(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    check_samples(single, acts, ids, SETTINGS)
    # Spelled out for one tied neuron: the top maxima are all 1.5, so the top-k are the smallest ids.
    clipped = acts[:, :, 2].max(1) == 1.5
    assert clipped.sum() > SETTINGS.top_k
    assert list(single.samples["top"].ids[2]) == sorted(ids[clipped])[: SETTINGS.top_k]
    # All-zero neuron: every key ties, so top and bottom are both the smallest ids.
    assert list(single.samples["top"].ids[0]) == sorted(ids)[: SETTINGS.top_k]
    assert list(single.samples["bottom"].ids[0]) == sorted(ids)[: SETTINGS.bottom_k]


def test_shapes_and_fixed_stats(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    n, t, f = acts.shape
    assert single.layer == LAYER and single.count == n * t
    assert single.sums.shape == (5, f) and single.sums.dtype == np.float64
    assert single.samples["top"].ids.shape == (f, SETTINGS.top_k)
    assert single.samples["top"].acts.shape == (f, SETTINGS.top_k, t)
    assert single.samples["cell"].ids.shape == (f, CELLS * CELL_K)
    assert np.array_equal(single.max, acts.max((0, 1)))
    assert np.array_equal(single.min, acts.min((0, 1)))
    assert np.array_equal(single.min_excerpt_max, acts.max(1).min(0))
    a = acts.astype(np.float64)
    want = np.stack([a.sum((0, 1)), (a**2).sum((0, 1)), (a**3).sum((0, 1)), (a**4).sum((0, 1)), (a > 0).sum((0, 1))])
    tolerance = 2e-5 * np.abs(want) + 1e-5 * np.abs(want).max(1, keepdims=True)
    assert (np.abs(single.sums - want) <= tolerance).all()
    assert np.array_equal(single.sums[4], (acts > 0).sum((0, 1)))


def test_histogram_and_cell_counts(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, _ = data
    n, t, f = acts.shape
    strided = acts[:, :: SETTINGS.hist_stride, :]
    per_neuron = n * math.ceil(t / SETTINGS.hist_stride)
    assert single.histogram.shape == (f, len(HIST_EDGES) + 1)
    assert np.array_equal(single.histogram.sum(1), np.full(f, per_neuron))
    assert np.array_equal(single.cell_counts.sum(1), np.full(f, n))
    ex_max = acts.max(1)
    for j in range(f):
        bins = np.searchsorted(HIST_EDGES, strided[:, :, j].ravel(), side="left")
        assert np.array_equal(single.histogram[j], np.bincount(bins, minlength=len(HIST_EDGES) + 1)), j
        cells = np.searchsorted(CELL_EDGES, ex_max[:, j], side="left")
        assert np.array_equal(single.cell_counts[j], np.bincount(cells, minlength=CELLS)), j
    # The all-zero neuron lands in the bin just below the 0 edge (bucketize: edges[i-1] < x <= edges[i]).
    assert single.histogram[0, int(np.searchsorted(HIST_EDGES, 0.0))] == per_neuron


def test_fewer_excerpts_than_k_leaves_empty_slots() -> None:
    acts, ids = make_data(5, 6, 6, seed=2)
    settings = CollectSettings(length=6, top_k=8, bottom_k=5, random_k=0, quantile_k=2, seed=3, hist_stride=1)
    result = accumulate(acts, ids, settings, sizes=(2,))
    check_samples(result, acts, ids, settings)
    top_ids, top_acts = result.samples["top"].ids, result.samples["top"].acts
    assert (top_ids[:, 5:] == -1).all() and (top_acts[:, 5:] == 0).all()
    assert result.samples["random"].ids.shape == (6, 0)
    assert result.samples["random"].acts.shape == (6, 0, 6)
    merged = LayerAccumulator(LAYER, 6, settings, torch.float32, CPU)
    merged.absorb(result)
    assert_same_result(merged.result(), result)
    summary = summarize(result, settings)
    assert _q(summary)[0].shape == (6, len(settings.quantiles) - 1, 2)


def test_bfloat16_activations() -> None:
    acts, ids = make_data(80, 8, 6, seed=4)
    rounded = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    settings = CollectSettings(length=8, top_k=4, bottom_k=4, random_k=3, quantile_k=2, seed=5, hist_stride=2)
    acc = feed(LayerAccumulator(LAYER, 6, settings, torch.bfloat16, CPU), acts, ids, (9, 30), dtype=torch.bfloat16)
    check_samples(acc.result(), rounded, ids, settings)


# -- determinism: order, batching, shards -------------------------------------------------------------

def test_order_and_batching_independence(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    order = np.random.default_rng(9).permutation(len(ids))
    other = accumulate(acts, ids, SETTINGS, sizes=(64, 3, 100), order=order)
    assert_same_result(single, other)
    one_batch = accumulate(acts, ids, SETTINGS, sizes=(len(ids),))
    assert_same_result(single, one_batch)
    a, b = summarize(single, SETTINGS), summarize(other, SETTINGS)
    assert np.array_equal(a.quantile_edges, b.quantile_edges)
    assert np.array_equal(_q(a)[0], _q(b)[0])
    assert np.array_equal(_q(a)[1], _q(b)[1])


def test_shard_merge_equals_single_run(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    rng = np.random.default_rng(21)
    in_a = rng.random(len(ids)) < 0.4
    shard_a = accumulate(acts[in_a], ids[in_a], SETTINGS, sizes=(17, 5))
    shard_b = accumulate(acts[~in_a], ids[~in_a], SETTINGS, sizes=(40,), order=rng.permutation((~in_a).sum()))
    for first, second in ((shard_a, shard_b), (shard_b, shard_a)):
        merged = LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU)
        merged.absorb(first)
        merged.absorb(second)
        assert_same_result(merged.result(), single)
    # Absorbing into a live accumulator (not a fresh one) gives the same.
    live = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU), acts[in_a], ids[in_a], (50,))
    live.absorb(shard_b)
    merged_result = live.result()
    assert_same_result(merged_result, single)
    a, b = summarize(merged_result, SETTINGS), summarize(single, SETTINGS)
    assert np.array_equal(_q(a)[0], _q(b)[0])
    np.testing.assert_allclose(a.kurtosis, b.kurtosis, rtol=1e-6)


def test_three_shards_and_empty_shard(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    parts = np.array_split(np.random.default_rng(5).permutation(len(ids)), 3)
    merged = LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU)
    merged.absorb(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU).result())  # nothing seen
    for part in parts:
        merged.absorb(accumulate(acts[part], ids[part], SETTINGS, sizes=(33,)))
    assert_same_result(merged.result(), single)


# -- summaries ----------------------------------------------------------------------------------------

def reference_moments(acts: np.ndarray) -> tuple[np.ndarray, ...]:
    a = acts.astype(np.float64).reshape(-1, acts.shape[2])
    mean = a.mean(0)
    c = a - mean
    var = (c**2).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(var > 0, (c**3).mean(0) / var**1.5, 0.0)
        kurt = np.where(var > 0, (c**4).mean(0) / var**2, 0.0)
    return mean, var, skew, kurt, (a > 0).mean(0)


def test_moments_match_numpy(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, _ = data
    summary = summarize(single, SETTINGS)
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


def test_quantile_edges_and_samples(data: tuple[np.ndarray, np.ndarray], single: LayerResult) -> None:
    acts, ids = data
    n, _, f = acts.shape
    summary = summarize(single, SETTINGS)
    edges, (q_ids, q_acts) = summary.quantile_edges, _q(summary)
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
                assert np.array_equal(q_acts[j, b, s], acts[pos, :, j])
            filled = (q_ids[j, b] >= 0).sum()
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
    assert _q(summary)[0].shape == (8, len(settings.quantiles) - 1, 2)
    assert np.isfinite(summary.selectivity).all()


def _q(summary):  # type: ignore[no-untyped-def]
    """Quantile samples as [F, bins, k] ids and [F, bins, k, T] activations."""
    bins = summary.quantile_edges.shape[1] - 1
    ids, acts = summary.quantile.ids, summary.quantile.acts
    f = ids.shape[0]
    return ids.reshape(f, bins, -1), acts.reshape(f, bins, ids.shape[1] // bins, -1)


def test_layers_updated_together_equal_layers_updated_apart() -> None:
    """The GPU path joins layers into one unit axis; it must keep exactly what per-layer updates keep."""
    from neuronscope.core.collection.accumulate import Accumulator
    from neuronscope.core.collection.collect import layer_groups

    gen = torch.Generator().manual_seed(7)
    layers, f, t = (2, 5, 9), 6, 8
    settings = CollectSettings(length=t, top_k=3, bottom_k=2, random_k=2, quantile_k=2, seed=3)
    joined = Accumulator(layers, f, settings, torch.float32, CPU)
    apart = {layer: LayerAccumulator(layer, f, settings, torch.float32, CPU) for layer in layers}
    for start in range(0, 40, 8):
        acts = {layer: torch.randn(8, t, f, generator=gen) * (1 + layer) for layer in layers}
        ids = torch.arange(start, start + 8) * 3 + 1
        joined.update(torch.cat([acts[layer] for layer in layers], 2), ids)
        for layer in layers:
            apart[layer].update(acts[layer], ids)
    for got in joined.results():
        want = apart[got.layer].result()
        assert np.allclose(got.sums, want.sums) and got.count == want.count
        for name in ("max", "min", "min_excerpt_max", "histogram", "cell_counts"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
        for kind in ("top", "bottom", "random", "cell"):
            assert np.array_equal(got.samples[kind].ids, want.samples[kind].ids), kind
            assert np.array_equal(got.samples[kind].acts, want.samples[kind].acts), kind
    assert layer_groups((0, 1, 2, 3, 4), 10, 100, budget=2000) == [(0, 1), (2, 3), (4,)]
    assert layer_groups((0, 1, 2), 10, 100, budget=0) == [(0,), (1,), (2,)]


# -- fixed-shape updates (the GPU path) ---------------------------------------------------------------

def test_fixed_shape_updates_keep_exactly_what_filtered_updates_keep(data: tuple[np.ndarray, np.ndarray],
                                                                      single: LayerResult) -> None:
    """The GPU's fixed-shape merges keep the same entries, activations and extremes as the CPU's filtered offers,
    whatever the order and batch sizes; so do layers joined into one unit axis."""
    acts, ids = data
    order = np.random.default_rng(3).permutation(len(ids))
    for sizes in ((7, 13, 1, 32), (len(ids),)):
        acc = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU, fixed=True), acts, ids,
                   sizes, order)
        fixed = acc.result()
        assert_same_result(single, fixed)
        for kind in KINDS:
            assert np.array_equal(single.samples[kind].maxes, fixed.samples[kind].maxes), kind
            assert np.array_equal(single.samples[kind].mins, fixed.samples[kind].mins), kind
    check_samples(fixed, acts, ids, SETTINGS)
    # Absorbing a shard into a fixed-shape accumulator mid-stream (a checkpoint on a GPU) is exact too.
    half = len(ids) // 2
    live = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU, fixed=True), acts[:half],
                ids[:half], (50,))
    live.absorb(accumulate(acts[half:], ids[half:], SETTINGS))
    assert_same_result(live.result(), single)


def test_fixed_shape_updates_never_read_the_device_back() -> None:
    """A GPU waits for all queued work whenever the host reads a value back (nonzero, unique, bincount, .item(),
    boolean indexing): the fixed-shape update issues none of them, where the filtered one issues many."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads_back = {"nonzero", "_local_scalar_dense", "unique_consecutive", "_unique2", "bincount", "masked_select",
                  "repeat_interleave", "is_nonzero", "item"}

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if name.startswith("index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                for i in (args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ())):
                name = "boolean index"
            self.seen.add(name)
            return func(*args, **(kwargs or {}))

    acts, ids = make_data(96, 8, 10, seed=2)
    settings = CollectSettings(length=8, top_k=4, bottom_k=3, random_k=2, quantile_k=2, seed=1)
    for fixed in (True, False):
        acc = LayerAccumulator(LAYER, 10, settings, torch.float32, CPU, fixed=fixed)
        batches = [(torch.from_numpy(acts[i : i + 32]), torch.from_numpy(ids[i : i + 32])) for i in range(0, 96, 32)]
        acc.update(*batches[0])
        with Ops() as ops:
            for batch in batches[1:]:
                acc.update(*batch)  # the fixed path also copies the previous batch's rows in here
        found = ops.seen & (reads_back | {"boolean index"})
        if fixed:
            assert not found, found
            assert "nonzero_static" in ops.seen and "topk" in ops.seen
        else:
            assert {"nonzero", "bincount"} <= found
