"""A batch's candidates offered to every sampler of an accumulator at once, compiled for the CPU (numba).

The same entries as SmallestK.offer keeps (the k smallest composites of each group, sampling.py), found per unit by a
heap over its slots instead of tensor-wide sorts: on a CPU, the tensor operations of a batch's merges (each a pass over
[units, k + B] arrays, with temporaries) cost more than the forward pass can hide, while here a unit whose candidates
are all worse than its kept entries costs one scan of its keys. Each slot's activation row is written once a batch,
whatever happens to it during the batch, and the rows of a block of units are written excerpt by excerpt, so that an
excerpt's activations for the block stay in the L1 cache while they are. Threads take blocks of units; a unit's
groups, rows and counts are written by its block's thread alone.

numba is imported here alone, when a CPU collection first updates (its import and a cached compile take about a
second; a first compile, some 10 s, is cached beside this file or in the user's cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import config as numba_config
from numba import get_num_threads, njit, prange, set_num_threads

if TYPE_CHECKING:
    from neuronscope.core.collection.sampling import SmallestK

#: Units per block (per thread task): a block's rows for one excerpt are BLOCK x length activations.
BLOCK = 32
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@njit(cache=True, inline="always")
def _sift_down(keys, slots, g, k, i):  # type: ignore[no-untyped-def]
    """Restore group g's max-heap (keys[g] in heap order, the worst first; slots[g] the slot of each) below i."""
    key, slot = keys[g, i], slots[g, i]
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if child + 1 < k and keys[g, child + 1] > keys[g, child]:
            child += 1
        if keys[g, child] <= key:
            break
        keys[g, i], slots[g, i] = keys[g, child], slots[g, child]
        i = child
    keys[g, i], slots[g, i] = key, slot


@njit(cache=True, inline="always")
def _offer(cand, cell_of, cells, comp, keys, slots, fresh, ext, extremes, base, u, moved, touched, out_row, out_b,  # type: ignore[no-untyped-def]
           out_u, n):
    """Offer unit u's candidates cand[u] to its groups of comp [groups, k]: group u, or with cells > 1 the group
    (u, cell_of[u, b]) of each. A group's kept keys are also a max-heap (keys, slots; built from comp when `fresh`),
    so a candidate is compared with its group's worst at once. Lists a row to copy from out_*[n] per slot that
    changed, whatever happened to it in between (moved: -1 per slot, and left so)."""
    k, batch = comp.shape[1], cand.shape[1]
    if k == 0:
        return 0
    first = u * cells
    if fresh:
        for g in range(first, first + cells):
            for j in range(k):
                keys[g, j], slots[g, j] = comp[g, j], j
            for j in range(k // 2 - 1, -1, -1):
                _sift_down(keys, slots, g, k, j)
    changed = 0
    for b in range(batch):
        g = first + cell_of[u, b] if cells > 1 else first
        if cand[u, b] < keys[g, 0]:  # better than the group's worst entry: it takes that slot
            slot = slots[g, 0]
            comp[g, slot] = keys[g, 0] = cand[u, b]
            _sift_down(keys, slots, g, k, 0)
            at = (g - first) * k + slot
            if moved[at] < 0:
                touched[changed] = at
                changed += 1
            moved[at] = b
    for j in range(changed):
        at = touched[j]
        b = moved[at]
        moved[at] = -1
        g, slot = first + at // k, at % k
        ext[g, slot, 0] = extremes[u * batch + b, 0]
        ext[g, slot, 1] = extremes[u * batch + b, 1]
        out_row[n + j], out_b[n + j], out_u[n + j] = base + g * k + slot, b, u
    return changed


@njit(cache=True, parallel=True)
def _offer_batch(top, bottom, random, cell_of, extremes, acts, rows, cell_counts,  # type: ignore[no-untyped-def]
                 top_comp, top_keys, top_slots, top_fresh, top_ext, top_base,
                 bottom_comp, bottom_keys, bottom_slots, bottom_fresh, bottom_ext, bottom_base,
                 random_comp, random_keys, random_slots, random_fresh, random_ext, random_base,
                 cell_comp, cell_keys, cell_slots, cell_fresh, cell_ext, cell_base):
    units, batch = top.shape
    cells = cell_comp.shape[0] // units
    length = rows.shape[1]
    blocks = (units + BLOCK - 1) // BLOCK
    width = max(top_comp.shape[1], bottom_comp.shape[1], random_comp.shape[1], cells * cell_comp.shape[1])
    per_unit = top_comp.shape[1] + bottom_comp.shape[1] + random_comp.shape[1] + cells * cell_comp.shape[1]
    for block in prange(blocks):
        moved = np.full(width, -1, np.int64)  # per slot of a unit's groups: the excerpt that took it
        touched = np.empty(width, np.int64)
        out_row = np.empty(BLOCK * per_unit, np.int64)
        out_b = np.empty(BLOCK * per_unit, np.int64)
        out_u = np.empty(BLOCK * per_unit, np.int64)
        n = 0
        for u in range(block * BLOCK, min(units, (block + 1) * BLOCK)):
            for b in range(batch):
                cell_counts[u * cells + cell_of[u, b]] += 1
            n += _offer(top, cell_of, 1, top_comp, top_keys, top_slots, top_fresh, top_ext, extremes, top_base, u,
                        moved, touched, out_row, out_b, out_u, n)
            n += _offer(bottom, cell_of, 1, bottom_comp, bottom_keys, bottom_slots, bottom_fresh, bottom_ext, extremes,
                        bottom_base, u, moved, touched, out_row, out_b, out_u, n)
            n += _offer(random, cell_of, 1, random_comp, random_keys, random_slots, random_fresh, random_ext, extremes,
                        random_base, u, moved, touched, out_row, out_b, out_u, n)
            n += _offer(random, cell_of, cells, cell_comp, cell_keys, cell_slots, cell_fresh, cell_ext, extremes,
                        cell_base, u, moved, touched, out_row, out_b, out_u, n)
        # The block's rows in excerpt order (a counting sort): acts[b, :, block] is read while it is in the cache.
        start = np.zeros(batch + 1, np.int64)
        for i in range(n):
            start[out_b[i] + 1] += 1
        for b in range(batch):
            start[b + 1] += start[b]
        order = np.empty(n, np.int64)
        for i in range(n):
            order[start[out_b[i]]] = i
            start[out_b[i]] += 1
        for i in order:
            b, u, row = out_b[i], out_u[i], out_row[i]
            for t in range(length):
                rows[row, t] = acts[b, t, u]


def offer_batch(samplers: dict[str, SmallestK], cands: dict[str, torch.Tensor], cell_of: torch.Tensor,
                extremes: torch.Tensor, acts: torch.Tensor, rows: torch.Tensor, cell_counts: torch.Tensor) -> None:
    """Offer a batch to the samplers "top", "bottom", "random" (groups: units) and "cell" (groups: unit x cell of the
    candidate, offered the "random" candidates), which keep their activation rows in `rows` [rows, length]: cands
    [units, B] composites (candidate p = unit * B + b), cell_of [units, B], extremes [units * B, 2] float32, acts
    [B, length, units] (any strides). Updates keys, extremes and rows in place, and counts each candidate in its cell
    (cell_counts [units * cells])."""
    if acts.dtype != rows.dtype:
        acts = acts.to(rows.dtype)
    bits = _BITS[rows.element_size()]
    threads = min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if get_num_threads() != threads:
        set_num_threads(threads)
    state = []
    for kind in ("top", "bottom", "random", "cell"):
        sampler = samplers[kind]
        fresh = sampler.heap is None
        if fresh:
            sampler.heap = (np.empty(sampler.comp.shape, np.int64), np.empty(sampler.comp.shape, np.int32))
        state.append((sampler.comp.numpy(), *sampler.heap, fresh, sampler.ext.numpy(), sampler.base))
    _offer_batch(
        cands["top"].numpy(), cands["bottom"].numpy(), cands["random"].numpy(), cell_of.numpy(), extremes.numpy(),
        acts.view(bits).numpy(), rows.view(bits).numpy(), cell_counts.numpy(),
        *state[0], *state[1], *state[2], *state[3])
