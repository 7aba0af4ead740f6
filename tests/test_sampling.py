"""Tests for core/sampling.py and core/accumulate.py against brute-force references (summaries: test_summaries.py).

Random activations [N, T, F] are streamed through LayerAccumulator in uneven, shuffled batches; every
record sampler, statistic and histogram is then recomputed from the whole tensor with plain numpy and
compared. Ties (quantised and all-zero neurons) check that results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sampling_data import CPU, KINDS, LAYER, SETTINGS, accumulate, feed, make_data, quantile_samples

from neuronscope.core.collection.accumulate import LayerAccumulator
from neuronscope.core.collection.sampling import hash_keys
from neuronscope.core.collection.summarize import summarize
from neuronscope.core.layerdata import CELL_EDGES, CELL_K, CELLS, HIST_EDGES, LayerResult, dequantize, quantize
from neuronscope.core.records import CollectSettings

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
        got = result.samples[kind]
        for j, pos in enumerate(expected[kind]):
            want_ids = np.where(pos >= 0, ids[pos], -1)
            assert np.array_equal(got.ids[j], want_ids), (kind, j, got.ids[j], want_ids)
            # the activations as the store keeps them: the exact rows, quantised
            want_scales, want_codes = quantize(np.where((pos >= 0)[:, None], acts[pos][:, :, j], 0.0))
            assert np.array_equal(got.scales[j], want_scales) and np.array_equal(got.codes[j], want_codes), (kind, j)


def assert_same_result(a: LayerResult, b: LayerResult) -> None:
    """Identical samples and counts; sums equal up to float summation order."""
    assert a.layer == b.layer and a.count == b.count
    for kind in KINDS:
        assert np.array_equal(a.samples[kind].ids, b.samples[kind].ids), kind
        assert np.array_equal(a.samples[kind].scales, b.samples[kind].scales), kind
        assert np.array_equal(a.samples[kind].codes, b.samples[kind].codes), kind
    for name in ("max", "min", "min_excerpt_max", "histogram", "cell_counts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-5, atol=1e-6 * np.abs(a.sums).max())



# -- record samplers ----------------------------------------------------------------------------------

def test_samplers_match_brute_force(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    check_samples(sampled_state, acts, ids, SETTINGS)
    # Spelled out for one tied neuron: the top maxima are all 1.5, so the top-k are the smallest ids.
    clipped = acts[:, :, 2].max(1) == 1.5
    assert clipped.sum() > SETTINGS.top_k
    assert list(sampled_state.samples["top"].ids[2]) == sorted(ids[clipped])[: SETTINGS.top_k]
    # All-zero neuron: every key ties, so top and bottom are both the smallest ids.
    assert list(sampled_state.samples["top"].ids[0]) == sorted(ids)[: SETTINGS.top_k]
    assert list(sampled_state.samples["bottom"].ids[0]) == sorted(ids)[: SETTINGS.bottom_k]


def test_shapes_and_fixed_stats(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    n, t, f = acts.shape
    assert sampled_state.layer == LAYER and sampled_state.count == n * t
    assert sampled_state.sums.shape == (5, f) and sampled_state.sums.dtype == np.float64
    assert sampled_state.samples["top"].ids.shape == (f, SETTINGS.top_k)
    assert sampled_state.samples["top"].acts.shape == (f, SETTINGS.top_k, t)
    assert sampled_state.samples["cell"].ids.shape == (f, CELLS * CELL_K)
    assert np.array_equal(sampled_state.max, acts.max((0, 1)))
    assert np.array_equal(sampled_state.min, acts.min((0, 1)))
    assert np.array_equal(sampled_state.min_excerpt_max, acts.max(1).min(0))
    a = acts.astype(np.float64)
    want = np.stack([a.sum((0, 1)), (a**2).sum((0, 1)), (a**3).sum((0, 1)), (a**4).sum((0, 1)), (a > 0).sum((0, 1))])
    tolerance = 2e-5 * np.abs(want) + 1e-5 * np.abs(want).max(1, keepdims=True)
    assert (np.abs(sampled_state.sums - want) <= tolerance).all()
    assert np.array_equal(sampled_state.sums[4], (acts > 0).sum((0, 1)))


def test_histogram_and_cell_counts(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, _ = sampled
    n, t, f = acts.shape
    strided = acts[:, :: SETTINGS.hist_stride, :]
    per_neuron = n * math.ceil(t / SETTINGS.hist_stride)
    assert sampled_state.histogram.shape == (f, len(HIST_EDGES) + 1)
    assert np.array_equal(sampled_state.histogram.sum(1), np.full(f, per_neuron))
    assert np.array_equal(sampled_state.cell_counts.sum(1), np.full(f, n))
    ex_max = acts.max(1)
    for j in range(f):
        bins = np.searchsorted(HIST_EDGES, strided[:, :, j].ravel(), side="left")
        assert np.array_equal(sampled_state.histogram[j], np.bincount(bins, minlength=len(HIST_EDGES) + 1)), j
        cells = np.searchsorted(CELL_EDGES, ex_max[:, j], side="left")
        assert np.array_equal(sampled_state.cell_counts[j], np.bincount(cells, minlength=CELLS)), j
    # The all-zero neuron lands in the bin just below the 0 edge (bucketize: edges[i-1] < x <= edges[i]).
    assert sampled_state.histogram[0, int(np.searchsorted(HIST_EDGES, 0.0))] == per_neuron


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
    assert quantile_samples(summary)[0].shape == (6, len(settings.quantiles) - 1, 2)


def test_bfloat16_activations() -> None:
    acts, ids = make_data(80, 8, 6, seed=4)
    rounded = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    settings = CollectSettings(length=8, top_k=4, bottom_k=4, random_k=3, quantile_k=2, seed=5, hist_stride=2)
    acc = feed(LayerAccumulator(LAYER, 6, settings, torch.bfloat16, CPU), acts, ids, (9, 30), dtype=torch.bfloat16)
    check_samples(acc.result(), rounded, ids, settings)


# -- determinism: order, batching, shards -------------------------------------------------------------

def test_order_and_batching_independence(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    order = np.random.default_rng(9).permutation(len(ids))
    other = accumulate(acts, ids, SETTINGS, sizes=(64, 3, 100), order=order)
    assert_same_result(sampled_state, other)
    one_batch = accumulate(acts, ids, SETTINGS, sizes=(len(ids),))
    assert_same_result(sampled_state, one_batch)
    a, b = summarize(sampled_state, SETTINGS), summarize(other, SETTINGS)
    assert np.array_equal(a.quantile_edges, b.quantile_edges)
    assert np.array_equal(quantile_samples(a)[0], quantile_samples(b)[0])
    assert np.array_equal(quantile_samples(a)[1], quantile_samples(b)[1])


def test_shard_merge_equals_single_run(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    rng = np.random.default_rng(21)
    in_a = rng.random(len(ids)) < 0.4
    shard_a = accumulate(acts[in_a], ids[in_a], SETTINGS, sizes=(17, 5))
    shard_b = accumulate(acts[~in_a], ids[~in_a], SETTINGS, sizes=(40,), order=rng.permutation((~in_a).sum()))
    for first, second in ((shard_a, shard_b), (shard_b, shard_a)):
        merged = LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU)
        merged.absorb(first)
        merged.absorb(second)
        assert_same_result(merged.result(), sampled_state)
    # Absorbing into a live accumulator (not a fresh one) gives the same; so does streaming on after it (a resumed
    # checkpoint: the CPU's merges rebuild their heaps from the keys the absorbed shard changed).
    part = np.flatnonzero(in_a)
    live = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU), acts[part[::2]],
                ids[part[::2]], (50,))
    live.absorb(shard_b)
    merged_result = feed(live, acts[part[1::2]], ids[part[1::2]], (9, 30)).result()
    assert_same_result(merged_result, sampled_state)
    a, b = summarize(merged_result, SETTINGS), summarize(sampled_state, SETTINGS)
    assert np.array_equal(quantile_samples(a)[0], quantile_samples(b)[0])
    np.testing.assert_allclose(a.kurtosis, b.kurtosis, rtol=1e-6)


def test_three_shards_and_empty_shard(sampled: tuple[np.ndarray, np.ndarray], sampled_state: LayerResult) -> None:
    acts, ids = sampled
    parts = np.array_split(np.random.default_rng(5).permutation(len(ids)), 3)
    merged = LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU)
    merged.absorb(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU).result())  # nothing seen
    for part in parts:
        merged.absorb(accumulate(acts[part], ids[part], SETTINGS, sizes=(33,)))
    assert_same_result(merged.result(), sampled_state)



def test_layers_updated_together_equal_layers_updated_apart() -> None:
    """The GPU path joins layers into one unit axis; it must keep exactly what per-layer updates keep."""
    from neuronscope.core.collection.accumulate import Accumulator
    from neuronscope.core.collection.batching import layer_groups

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

def test_fixed_shape_updates_keep_exactly_what_filtered_updates_keep(sampled: tuple[np.ndarray, np.ndarray],
                                                                      sampled_state: LayerResult) -> None:
    """The GPU's fixed-shape merges keep the same entries, activations and extremes as the CPU's compiled merges,
    whatever the order and batch sizes; so do layers joined into one unit axis."""
    acts, ids = sampled
    order = np.random.default_rng(3).permutation(len(ids))
    for sizes in ((7, 13, 1, 32), (len(ids),)):
        acc = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU, fixed=True), acts, ids,
                   sizes, order)
        fixed = acc.result()
        assert_same_result(sampled_state, fixed)
        for kind in KINDS:
            assert np.array_equal(sampled_state.samples[kind].maxes, fixed.samples[kind].maxes), kind
            assert np.array_equal(sampled_state.samples[kind].mins, fixed.samples[kind].mins), kind
    check_samples(fixed, acts, ids, SETTINGS)
    # Absorbing a shard into a fixed-shape accumulator mid-stream (a checkpoint on a GPU) is exact too.
    half = len(ids) // 2
    live = feed(LayerAccumulator(LAYER, acts.shape[2], SETTINGS, torch.float32, CPU, fixed=True), acts[:half],
                ids[:half], (50,))
    live.absorb(accumulate(acts[half:], ids[half:], SETTINGS))
    assert_same_result(live.result(), sampled_state)


def test_fixed_shape_merges_offer_what_a_narrowed_merge_left_out() -> None:
    """Once few candidates pass, a fixed-shape merge takes only each unit's first few; when a later batch brings more
    (here excerpts 1,000 times larger than all before), the rest are offered once the counts are read: the records are
    still exactly the brute-force ones, and the CPU path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    acts, ids = make_data(400, 10, 12, seed=5)
    scale = np.concatenate([np.linspace(1.0, 0.1, 352), np.full(48, 1000.0)]).astype(np.float32)
    acts = acts * scale[:, None, None]
    sizes = (16,) * 22 + (48,)
    filtered = feed(LayerAccumulator(LAYER, 12, SETTINGS, torch.float32, CPU, fixed=False), acts, ids, sizes).result()
    acc = feed(LayerAccumulator(LAYER, 12, SETTINGS, torch.float32, CPU, fixed=True), acts, ids, sizes)

    class Ops(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        fixed = acc.result()  # the last batch's rows are copied, and its left-out candidates offered, here
    assert "nonzero" in Ops.seen  # the overflow's offer ran
    assert_same_result(filtered, fixed)
    for kind in KINDS:
        assert np.array_equal(filtered.samples[kind].maxes, fixed.samples[kind].maxes), kind
    check_samples(fixed, acts, ids, SETTINGS)


def test_fixed_shape_updates_never_read_the_device_back() -> None:
    """A GPU waits for all queued work whenever the host reads a value back (nonzero, unique, bincount, .item(),
    boolean indexing): the fixed-shape update issues none of them, where the filtered merges issue many."""
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
    acc = LayerAccumulator(LAYER, 10, settings, torch.float32, CPU, fixed=True)
    batches = [(torch.from_numpy(acts[i : i + 32]), torch.from_numpy(ids[i : i + 32])) for i in range(0, 96, 32)]
    acc.update(*batches[0])
    with Ops() as ops:
        for batch in batches[1:]:
            acc.update(*batch)  # also copies the previous batch's rows in here
    assert not ops.seen & (reads_back | {"boolean index"}), ops.seen
    assert "nonzero_static" in ops.seen and "topk" in ops.seen
    # The filtered merges (a GPU's with NEURONSCOPE_FIXED_SHAPES=0) are seen reading back.
    top = LayerAccumulator(LAYER, 10, settings, torch.float32, CPU).samplers["top"]
    with Ops() as ops:
        for _ in range(2):
            top.offer_blocks(torch.arange(10 * 32).view(10, 32), torch.zeros((10 * 32, 2)))
    assert {"nonzero", "_local_scalar_dense"} <= ops.seen


def test_the_collectors_quantizer_gives_the_stores_codes() -> None:
    """Records leave the accumulator quantised on its device (accumulate.quantize_rows): the codes and scales are
    those of the store's numpy quantize, halves rounded to even, zero, NaN and infinite rows included."""
    from neuronscope.core.collection.accumulate import quantize_rows

    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((300, 64)) * rng.choice([1e-30, 1e-3, 1.0, 1e4], (300, 1))).astype(np.float32)
    rows[0] = 0.0
    rows[1, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5]  # scale 127: the codes are these halves, rounded to even
    rows[1, 6:] = 0.0
    rows[2, 3] = np.nan
    rows[3, 7] = -np.inf
    rows[4] = np.float32(1e-45)  # subnormal
    for dtype in (torch.float32, torch.bfloat16):
        as_stored = torch.from_numpy(rows).to(dtype)
        want_scales, want_codes = quantize(as_stored.float().numpy())
        scales, codes = quantize_rows(as_stored)
        assert np.array_equal(scales.numpy(), want_scales, equal_nan=True), dtype
        assert np.array_equal(codes.numpy(), want_codes), dtype
    assert want_codes[1, :6].tolist() == [127, 0, 2, 2, 0, -2] and want_scales[0] == 0 and not want_codes[0].any()
    assert np.isnan(want_scales[2]) and np.isinf(want_scales[3])


def test_the_collectors_dequantizer_gives_the_stores_values() -> None:
    """A shard's or a checkpoint's records go back into an accumulator through accumulate.dequantize_rows: the values
    layerdata.dequantize gives, bit for bit, extreme codes exactly +-scale, NaN and infinite scales included."""
    from neuronscope.core.collection.accumulate import dequantize_rows

    rng = np.random.default_rng(6)
    codes = rng.integers(-127, 128, (500, 64)).astype(np.int8)
    codes[:, 0] = 127
    scales = (rng.random(500) * 10.0 ** rng.integers(-30, 30, 500)).astype(np.float32)
    scales[:3] = [0.0, np.nan, np.inf]
    got = dequantize_rows(torch.from_numpy(scales), torch.from_numpy(codes), chunk=64).numpy()
    want = dequantize(scales, codes)
    assert np.array_equal(got, want, equal_nan=True) and (got[3:, 0] == scales[3:]).all()
