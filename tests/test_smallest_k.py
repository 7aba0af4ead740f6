"""The sampler primitive and its keys: SmallestK, composite keys, hash_keys."""


from __future__ import annotations

import numpy as np
import torch

from neuronscope.core.collection.sampling import EMPTY, SmallestK, composite, composite_ids, hash_keys

CPU = torch.device("cpu")
LAYER = 4
KINDS = ("top", "bottom", "random", "cell")


# -- SmallestK directly -------------------------------------------------------------------------------

def test_composite_orders_like_key_then_id() -> None:
    rng = np.random.default_rng(8)
    keys = np.concatenate([rng.standard_normal(300) * 10.0 ** rng.integers(-30, 30, 300),
                           [np.inf, -np.inf, 0.0, 1.0, 1.0, -1.0, -1.0, 0.5, 0.5]]).astype(np.float32)
    ids = rng.integers(0, 2**31 - 1, len(keys))
    ids[-6:] = [7, 3, 9, 2, 5, 5]
    comp = composite(torch.from_numpy(keys), torch.from_numpy(ids)).numpy()
    assert np.array_equal(np.argsort(comp, kind="stable"), np.lexsort((ids, keys)))
    assert np.array_equal(composite_ids(torch.from_numpy(comp)).numpy(), ids)


def test_smallest_k_with_ties_and_what_it_takes() -> None:
    sampler = SmallestK(groups=2, k=3, length=2, dtype=torch.float32, device=CPU)
    admitted: list[list[int]] = []

    def offer(group: list[int], key: list[float], ids: list[int]) -> None:
        acts = torch.tensor([[float(i), -float(i)] for i in ids])
        extremes = torch.stack([acts[:, 0], acts[:, 1]], 1)
        taken = sampler.offer(torch.tensor(group), composite(torch.tensor(key), torch.tensor(ids)), extremes)
        admitted.append(sorted(ids[p] for p in taken.positions.tolist()))
        sampler.storage.index_copy_(0, taken.slots, acts[taken.positions])

    offer([0, 0, 0, 1], [0.5, 0.5, 0.5, 0.2], [9, 4, 7, 1])
    offer([0, 0, 1, 1], [0.5, 0.1, 0.9, 0.2], [2, 8, 3, 0])
    offer([0], [0.5], [5])  # ties the worst key, larger id than the worst kept -> rejected
    ids, acts, ext, scales = sampler.sorted()
    assert scales is None  # rows in the sampler's dtype
    assert ids.tolist() == [[8, 2, 4], [0, 1, 3]]
    assert acts[0, :, 0].tolist() == [8.0, 2.0, 4.0] and acts[1, :, 1].tolist() == [-0.0, -1.0, -3.0]
    assert torch.equal(ext, acts)  # the extremes offered, beside their rows
    assert admitted == [[1, 4, 7, 9], [0, 2, 3, 8], []]  # 9 is evicted by 2 and 8 in the second offer

    # Samplers sharing one storage write disjoint rows of it.
    storage = torch.zeros((2 * 3 + 4 * 1, 1))
    first = SmallestK(2, 3, 1, torch.float32, CPU, storage, 0)
    second = SmallestK(4, 1, 1, torch.float32, CPU, storage, 6)
    one = torch.ones(2, 2)
    assert first.offer(torch.tensor([1, 1]), composite(torch.tensor([0.0, 1.0]), torch.tensor([3, 4])),
                       one).slots.tolist() == [3, 4]
    assert second.offer(torch.tensor([2]), composite(torch.tensor([0.0]), torch.tensor([5])),
                        one).slots.tolist() == [8]
    empty_ids, empty_acts, *_ = SmallestK(groups=2, k=2, length=1, dtype=torch.float32, device=CPU).sorted()
    assert (empty_ids == -1).all() and (empty_acts == 0).all()


def test_offer_blocks_keeps_what_offer_keeps() -> None:
    """A block of candidates for every group (a GPU run's filtered merges, NEURONSCOPE_FIXED_SHAPES=0) keeps what
    offering them one by one keeps, while most candidates pass (whole blocks merged) and once few do (compacted)."""
    rng = np.random.default_rng(3)
    groups, k, block = 40, 5, 16
    blockwise, onewise = (SmallestK(groups, k, 1, torch.float32, CPU) for _ in range(2))
    for step in range(12):
        keys = torch.from_numpy(np.round(rng.standard_normal((groups, block)), 1).astype(np.float32))  # ties
        ids = torch.from_numpy(rng.choice(1 << 30, (groups, block), replace=False))
        comp = composite(keys, ids)
        extremes = torch.stack([keys.reshape(-1), -keys.reshape(-1)], 1)
        for sampler, taken in ((blockwise, blockwise.offer_blocks(comp, extremes)),
                               (onewise, onewise.offer(torch.arange(groups).repeat_interleave(block), comp.reshape(-1),
                                                       extremes))):
            sampler.storage.index_copy_(0, taken.slots, ids.reshape(-1, 1)[taken.positions].float())
        for got, want in zip(blockwise.sorted()[:3], onewise.sorted()[:3]):
            assert torch.equal(got, want), step
    assert (blockwise.sorted()[0] >= 0).all()


# -- hash_keys ----------------------------------------------------------------------------------------

def test_hash_keys_range_determinism_uniformity() -> None:
    neurons = torch.arange(10)[:, None]
    ids = torch.arange(10_000)[None, :]
    keys = hash_keys(3, 7, neurons, ids)
    assert keys.shape == (10, 10_000) and keys.dtype == torch.float32
    assert (keys >= 0).all() and (keys < 1).all()
    assert torch.equal(keys, hash_keys(3, 7, neurons, ids))
    assert torch.equal(keys[4, 123:124], hash_keys(3, 7, torch.tensor(4), torch.tensor([123])))
    flat = keys.double().reshape(-1)
    assert abs(flat.mean().item() - 0.5) < 0.005
    assert abs(flat.var().item() - 1 / 12) < 0.002
    share = torch.histc(flat, bins=20, min=0, max=1) / flat.numel()
    assert (share - 0.05).abs().max().item() < 0.005
    assert len(torch.unique(flat)) > 0.99 * flat.numel()
    # Independent across neurons and neighbouring excerpts.
    assert abs(np.corrcoef(keys[0].numpy(), keys[1].numpy())[0, 1]) < 0.05
    assert abs(np.corrcoef(keys[0, :-1].numpy(), keys[0, 1:].numpy())[0, 1]) < 0.05
    # Huge excerpt ids are fine too.
    big = hash_keys(3, 7, torch.tensor(2), torch.arange(2**40, 2**40 + 10_000))
    assert (big >= 0).all() and (big < 1).all() and abs(big.double().mean().item() - 0.5) < 0.02


def test_hash_keys_differ_by_seed_layer_and_role() -> None:
    neurons = torch.arange(20)[:, None]
    ids = torch.arange(500)[None, :]
    base = hash_keys(0, 0, neurons, ids)
    for other in (hash_keys(1, 0, neurons, ids), hash_keys(0, 1, neurons, ids), hash_keys(1, 1, neurons, ids),
                  hash_keys(0, 0, ids.t(), neurons.t()).t()):  # neuron and excerpt swapped
        off_diagonal = neurons != ids  # a swap leaves (i, i) unchanged
        assert (other == base)[off_diagonal].double().mean().item() < 0.001
        assert abs(np.corrcoef(other.reshape(-1).numpy(), base.reshape(-1).numpy())[0, 1]) < 0.05


def test_hash_keys_never_reach_one() -> None:
    """[0, 1) as documented: a 52-bit fraction rounded to float32 can become exactly 1.0."""
    key = hash_keys(0, 0, torch.tensor([0]), torch.tensor([37856820]))
    assert key.item() < 1.0, key.item()


def test_smallest_columns_pairwise_and_by_topk_agree() -> None:
    """Narrow rows (the cell sampler's) are ranked pair by pair, wide ones by topk: both take a row's k smallest
    values, whose columns come back unique and ascending; among EMPTY ties either may take any."""
    from neuronscope.core.collection.sampling import PAIRWISE_WIDTH, _smallest_columns

    gen = torch.Generator().manual_seed(3)
    for width in (1, 2, 6, PAIRWISE_WIDTH, PAIRWISE_WIDTH + 1, 40):
        values = torch.randperm(500 * width, generator=gen).view(500, width).to(torch.int64)
        values[torch.rand(values.shape, generator=gen) < 0.3] = EMPTY
        for k in {1, min(3, width), width}:
            got = _smallest_columns(values, k)
            want = torch.topk(values, k, dim=1, largest=False).values.sort(dim=1).values
            assert got.shape == (500, k) and got.is_contiguous()
            assert bool((got[:, 1:] > got[:, :-1]).all()), (width, k)
            assert torch.equal(torch.gather(values, 1, got).sort(dim=1).values, want), (width, k)
