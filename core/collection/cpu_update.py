"""A batch folded into an accumulator on a CPU in one compiled pass (numba): statistics, histogram and records.

Threads take blocks of BLOCK units. For each excerpt, a block's activations (length x BLOCK values, a few kilobytes)
are read once into a float32 tile that stays in the L1 cache while everything is taken from it: the power sums, the
positive count and the extremes (vectorised across the block's units), the histogram counts, and, once the block has
seen the whole batch, the candidates' composites and cells. (A long run, which repays torch.compile, takes all that
from the compiled statistics kernel instead: token_stats.stats_compiled.) Then the block's candidates go to every
sampler at once. A unit's groups, rows and counts are written by its block's thread alone.

Everything but the power sums is exactly what compute_token_stats (token_stats.py) and the samplers' other merges give:
the bins, cells and hashes are the same integer operations on the same float32 bits. The power sums agree to float32
rounding (each excerpt's sums about its own mean, summed in another order), as the compiled kernel's do with eager's.

The records are found per unit by a heap over each group's slots instead of tensor-wide sorts: the same entries as
SmallestK.offer keeps (the k smallest composites of each group, sampling.py), but a unit whose candidates are all
worse than its kept entries costs one scan of its keys. Each slot's activation row is written once a batch, whatever
happens to it during the batch, and a block's rows are written excerpt by excerpt, so that an excerpt's activations
for the block stay in the cache while they are.

numba is imported here alone, when a CPU collection first updates (its import and a cached compile take about a
second; a first compile, some 15-20 s, is cached beside this file or in the user's cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import config as numba_config
from numba import get_num_threads, njit, prange, set_num_threads

from neuronscope.core.collection.sampling import _MUL2, EMPTY, INF_BITS, NAN_BITS, excerpt_hash
from neuronscope.core.collection.token_stats import _SQRT2_MANTISSA
from neuronscope.core.layerdata import HIST_EDGES

if TYPE_CHECKING:
    from neuronscope.core.collection.accumulate import Accumulator

#: Units per block (per thread task): a block's tile for one excerpt is length x BLOCK float32 values.
BLOCK = 32
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BINS = len(HIST_EDGES) + 1
_SIGN = -(1 << 31)  # a float32's sign bit, in a sign-extended int64 of its bits


@njit(cache=True, inline="always")
def _half_powers(bits, lowest, count):  # type: ignore[no-untyped-def]
    """token_stats._half_powers for one float32's bits: how many edges 2^(j/2), j >= lowest, lie below |x| and at or
    below it."""
    j = 2 * (((bits >> 23) & 0xFF) - 127) - lowest
    m = bits & 0x7FFFFF
    below = j + (1 if m > 0 else 0) + (1 if m > _SQRT2_MANTISSA else 0)
    at_or_below = j + 1 + (1 if m >= _SQRT2_MANTISSA else 0)
    return min(max(below, 0), count), min(max(at_or_below, 0), count)


@njit(cache=True, inline="always")
def _composite(bits, excerpt_id):  # type: ignore[no-untyped-def]
    """sampling.composite for a float32 key given as its bits (a sign-extended int64)."""
    if bits == _SIGN:  # -0.0, which composite's + 0.0 makes +0.0
        bits = 0
    if bits & 0x7FFFFFFF > INF_BITS:  # any NaN: one NaN, the worst
        bits = NAN_BITS
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return (bits << 32) + excerpt_id


@njit(cache=True, inline="always")
def _highest(high, a, b):  # type: ignore[no-untyped-def]
    """The largest of three float32 values, NaN if any is (as amax gives), written to vectorise."""
    high = a if (a > high) | (a != a) else high
    return b if (b > high) | (b != b) else high


@njit(cache=True, inline="always")
def _lowest(low, a, b):  # type: ignore[no-untyped-def]
    """The smallest of three float32 values, NaN if any is (as amin gives), written to vectorise."""
    low = a if (a < low) | (a != a) else low
    return b if (b < low) | (b != b) else low


@njit(cache=True, inline="always")
def _sift_down(keys, slots, g, size, i):  # type: ignore[no-untyped-def]
    """Restore group g's max-heap of `size` entries (keys[g] in heap order, the worst first; slots[g] the slot of
    each) below i."""
    key, slot = keys[g, i], slots[g, i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and keys[g, child + 1] > keys[g, child]:
            child += 1
        if keys[g, child] <= key:
            break
        keys[g, i], slots[g, i] = keys[g, child], slots[g, child]
        i = child
    keys[g, i], slots[g, i] = key, slot


@njit(cache=True, inline="always")
def _sift_up(keys, slots, g, i):  # type: ignore[no-untyped-def]
    """Restore group g's max-heap above i, where a new entry was put (a random one rises about one level)."""
    key, slot = keys[g, i], slots[g, i]
    while i > 0:
        parent = (i - 1) // 2
        if keys[g, parent] >= key:
            break
        keys[g, i], slots[g, i] = keys[g, parent], slots[g, parent]
        i = parent
    keys[g, i], slots[g, i] = key, slot


@njit(cache=True, inline="always")
def _offer(cand, cell_of, cells, comp, keys, slots, sizes, fresh, ext, extremes, base, u, moved,  # type: ignore[no-untyped-def]
           touched, out_row, out_b, out_u, n):
    """Offer unit u's candidates cand[u] to its groups of comp [groups, k]: group u, or with cells > 1 the group
    (u, cell_of[u, b]) of each. A group's kept entries are also a max-heap (the first sizes[g] of keys and slots;
    then its free slots; built from comp when `fresh`): a candidate takes a free slot while there is one, then is
    compared with the group's worst at once. Lists a row to copy from out_*[n] per slot that changed, whatever
    happened to it in between (moved: -1 per slot, and left so)."""
    k, batch = comp.shape[1], cand.shape[1]
    if k == 0:
        return 0
    first = u * cells
    if fresh:
        for g in range(first, first + cells):
            size = 0
            for i in range(k):
                if comp[g, i] != EMPTY:
                    keys[g, size], slots[g, size] = comp[g, i], i
                    size += 1
            free = size
            for i in range(k):
                if comp[g, i] == EMPTY:
                    keys[g, free], slots[g, free] = EMPTY, i
                    free += 1
            sizes[g] = size
            for i in range(size // 2 - 1, -1, -1):
                _sift_down(keys, slots, g, size, i)
    changed = 0
    for b in range(batch):
        g = first + cell_of[u, b] if cells > 1 else first
        size = sizes[g]
        if size < k:  # a free slot (a run's first batches): the candidate takes it
            slot = slots[g, size]
            comp[g, slot] = keys[g, size] = cand[u, b]
            _sift_up(keys, slots, g, size)
            sizes[g] = size + 1
        elif cand[u, b] < keys[g, 0]:  # better than the group's worst entry: it takes that slot
            slot = slots[g, 0]
            comp[g, slot] = keys[g, 0] = cand[u, b]
            _sift_down(keys, slots, g, k, 0)
        else:
            continue
        at = (g - first) * k + slot
        if moved[at] < 0:
            touched[changed] = at
            changed += 1
        moved[at] = b
    for i in range(changed):
        at = touched[i]
        b = moved[at]
        moved[at] = -1
        g, slot = first + at // k, at % k
        ext[g, slot, 0] = extremes[u, b, 0]
        ext[g, slot, 1] = extremes[u, b, 1]
        out_row[n + i], out_b[n + i], out_u[n + i] = base + g * k + slot, b, u
    return changed


@njit(cache=True, inline="always")
def _block_statistics(vals, bf16, skip, stride, excerpt_ids, excerpt_hashes, unit_hashes,  # type: ignore[no-untyped-def]
                      sums, maxes, mins, min_excerpt_max, hist, top, bottom, random, cell_of, extremes, u0, w):
    """Units u0 .. u0 + w - 1 of a batch: fold their statistics in (power sums, extremes, histogram) and write their
    candidates' composites, cells and (max, min) into top, bottom, random, cell_of [units, B] and extremes
    [units, B, 2], exactly as compute_token_stats gives them."""
    batch, length = vals.shape[0], vals.shape[1]
    counted = length - skip
    tile_bits = np.zeros((length, BLOCK), np.int32)  # a partial block's other lanes are computed on, unused
    tile = tile_bits.view(np.float32)
    mean = np.empty(BLOCK, np.float32)
    s1 = np.empty(BLOCK, np.float32)
    s2 = np.empty(BLOCK, np.float32)
    s3 = np.empty(BLOCK, np.float32)
    s4 = np.empty(BLOCK, np.float32)
    high = np.empty(BLOCK, np.float32)
    low = np.empty(BLOCK, np.float32)
    positive = np.empty(BLOCK, np.float32)  # exact below 2^24 tokens an excerpt
    bins = np.empty(BLOCK, np.int32)
    ex = np.empty((BLOCK, batch, 2), np.float32)  # per candidate (unit of the block, excerpt): (max, min)
    ex_bits = ex.view(np.int32)
    key = np.empty(1, np.float32)
    key_bits = key.view(np.int32)
    for b in range(batch):
        if bf16 and w == BLOCK:  # (loops of a constant width vectorise best; a last, partial block is rare)
            for t in range(length):
                for i in range(BLOCK):
                    tile_bits[t, i] = np.int32(vals[b, t, u0 + i]) << 16
        elif w == BLOCK:
            for t in range(length):
                for i in range(BLOCK):
                    tile_bits[t, i] = vals[b, t, u0 + i]
        else:
            for t in range(length):
                for i in range(w):
                    tile_bits[t, i] = np.int32(vals[b, t, u0 + i]) << 16 if bf16 else vals[b, t, u0 + i]
        mean[:] = 0.0
        for t in range(skip, length):
            for i in range(BLOCK):
                mean[i] += tile[t, i]
        for i in range(BLOCK):
            mean[i] /= np.float32(counted)
        s1[:] = 0.0
        s2[:] = 0.0
        s3[:] = 0.0
        s4[:] = 0.0
        positive[:] = 0.0
        high[:] = -np.inf
        low[:] = np.inf
        rest = skip + (counted // 4) * 4
        for t in range(skip, rest, 4):  # four tokens a step: the block's sums are loaded and stored a quarter as often
            for i in range(BLOCK):
                m = mean[i]
                x0, x1, x2, x3 = tile[t, i], tile[t + 1, i], tile[t + 2, i], tile[t + 3, i]
                d0, d1, d2, d3 = x0 - m, x1 - m, x2 - m, x3 - m
                q0, q1, q2, q3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
                s1[i] += (d0 + d1) + (d2 + d3)
                s2[i] += (q0 + q1) + (q2 + q3)
                s3[i] += (q0 * d0 + q1 * d1) + (q2 * d2 + q3 * d3)
                s4[i] += (q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)
                positive[i] += (np.float32(x0 > 0) + np.float32(x1 > 0)) + (np.float32(x2 > 0) + np.float32(x3 > 0))
                high[i] = _highest(_highest(high[i], x0, x1), x2, x3)
                low[i] = _lowest(_lowest(low[i], x0, x1), x2, x3)
        for t in range(rest, length):
            for i in range(BLOCK):
                x = tile[t, i]
                d = x - mean[i]
                q = d * d
                s1[i] += d
                s2[i] += q
                s3[i] += q * d
                s4[i] += q * q
                positive[i] += np.float32(x > 0)
                high[i] = _highest(high[i], x, x)
                low[i] = _lowest(low[i], x, x)
        for i in range(w):
            u, m, nt = u0 + i, np.float64(mean[i]), np.float64(counted)
            m2 = m * m
            a1, a2, a3, a4 = np.float64(s1[i]), np.float64(s2[i]), np.float64(s3[i]), np.float64(s4[i])
            sums[0, u] += nt * m + a1
            sums[1, u] += nt * m2 + 2 * m * a1 + a2
            sums[2, u] += nt * m2 * m + 3 * m2 * a1 + 3 * m * a2 + a3
            sums[3, u] += nt * m2 * m2 + 4 * m2 * m * a1 + 6 * m2 * a2 + 4 * m * a3 + a4
            sums[4, u] += np.float64(positive[i])
            ex[i, b, 0], ex[i, b, 1] = high[i], low[i]
        for t in range(skip, length, stride):  # token_stats.hist_bins, computed for the block's row at once
            for i in range(BLOCK):
                x, bits = tile[t, i], tile_bits[t, i]
                half = 2 * (((bits >> 23) & 0xFF) - 127) + 16  # _half_powers(bits, -16, 31), written to vectorise
                mantissa = bits & 0x7FFFFF
                below = min(max(half + (mantissa > 0) + (mantissa > _SQRT2_MANTISSA), 0), 31)
                at_or_below = min(max(half + 1 + (mantissa >= _SQRT2_MANTISSA), 0), 31)
                bins[i] = below + 32 if x > 0 else (31 - at_or_below if x < 0 else 31)
            for i in range(w):
                hist[(u0 + i) * _BINS + bins[i]] += 1
    # The block has seen the whole batch: its candidates.
    for i in range(w):
        u = u0 + i
        for c in range(batch):
            hi, lo = ex[i, c, 0], ex[i, c, 1]
            if hi > maxes[u] or hi != hi:
                maxes[u] = hi
            if lo < mins[u] or lo != lo:
                mins[u] = lo
            if hi < min_excerpt_max[u] or hi != hi:
                min_excerpt_max[u] = hi
            eid = excerpt_ids[c]
            extremes[u, c, 0], extremes[u, c, 1] = hi, lo
            top[u, c] = _composite(np.int64(ex_bits[i, c, 0]) ^ _SIGN, eid)
            bottom[u, c] = _composite(np.int64(ex_bits[i, c, 1]), eid)
            mixed = (unit_hashes[u] ^ excerpt_hashes[c]) * _MUL2
            key[0] = np.float32((mixed >> 40) & 0xFFFFFF) / np.float32(1 << 24)
            random[u, c] = _composite(np.int64(key_bits[0]), eid)
            cell_of[u, c] = _half_powers(np.int64(ex_bits[i, c, 0]), -10, 25)[0] if hi > 0 else 0


@njit(cache=True, parallel=True)
def _update(compute, vals, bf16, raw, skip, stride, excerpt_ids, excerpt_hashes, unit_hashes,  # type: ignore[no-untyped-def]
            sums, maxes, mins, min_excerpt_max, hist, top, bottom, random, cell_of, extremes, cell_counts, rows,
            top_comp, top_keys, top_slots, top_sizes, top_fresh, top_ext, top_base,
            bottom_comp, bottom_keys, bottom_slots, bottom_sizes, bottom_fresh, bottom_ext, bottom_base,
            random_comp, random_keys, random_slots, random_sizes, random_fresh, random_ext, random_base,
            cell_comp, cell_keys, cell_slots, cell_sizes, cell_fresh, cell_ext, cell_base):
    batch, length, units = raw.shape
    cells = cell_comp.shape[0] // units
    blocks = (units + BLOCK - 1) // BLOCK
    width = max(top_comp.shape[1], bottom_comp.shape[1], random_comp.shape[1], cells * cell_comp.shape[1])
    per_unit = top_comp.shape[1] + bottom_comp.shape[1] + random_comp.shape[1] + cells * cell_comp.shape[1]
    for block in prange(blocks):
        u0 = block * BLOCK
        w = min(units, u0 + BLOCK) - u0
        if compute:
            _block_statistics(vals, bf16, skip, stride, excerpt_ids, excerpt_hashes, unit_hashes, sums, maxes, mins,
                              min_excerpt_max, hist, top, bottom, random, cell_of, extremes, u0, w)
        for u in range(u0, u0 + w):
            for b in range(batch):
                cell_counts[u * cells + cell_of[u, b]] += 1
        moved = np.full(width, -1, np.int64)  # per slot of a unit's groups: the excerpt that took it
        touched = np.empty(width, np.int64)
        out_row = np.empty(BLOCK * per_unit, np.int64)
        out_b = np.empty(BLOCK * per_unit, np.int64)
        out_u = np.empty(BLOCK * per_unit, np.int64)
        n = 0
        for u in range(u0, u0 + w):
            n += _offer(top, cell_of, 1, top_comp, top_keys, top_slots, top_sizes, top_fresh, top_ext, extremes,
                        top_base, u, moved, touched, out_row, out_b, out_u, n)
            n += _offer(bottom, cell_of, 1, bottom_comp, bottom_keys, bottom_slots, bottom_sizes, bottom_fresh,
                        bottom_ext, extremes, bottom_base, u, moved, touched, out_row, out_b, out_u, n)
            n += _offer(random, cell_of, 1, random_comp, random_keys, random_slots, random_sizes, random_fresh,
                        random_ext, extremes, random_base, u, moved, touched, out_row, out_b, out_u, n)
            n += _offer(random, cell_of, cells, cell_comp, cell_keys, cell_slots, cell_sizes, cell_fresh, cell_ext,
                        extremes, cell_base, u, moved, touched, out_row, out_b, out_u, n)
        # The block's rows in excerpt order (a counting sort): raw[b, :, block] is read while it is in the cache.
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
                rows[row, t] = raw[b, t, u]


def update(acc: Accumulator, acts: torch.Tensor, excerpt_ids: torch.Tensor,
           candidates: tuple[torch.Tensor, ...] | None = None) -> None:
    """Fold a batch into a CPU accumulator's state: acts [B, length, units] (any strides) in any float dtype,
    excerpt_ids [B] int64. Updates the power sums, extremes and histogram (unless `candidates` are given: then they
    are compute_token_stats's top, bottom, random, cell_of and extremes, and the caller folded its statistics in),
    counts the cells, and offers the batch to the samplers "top", "bottom", "random" (groups: units) and "cell"
    (groups: unit x cell of the candidate's max, offered the "random" composites), whose keys, extremes and
    activation rows (acc.rows) change in place. Not the count."""
    settings, rows = acc.settings, acc.rows
    batch, units = acts.shape[0], acts.shape[2]
    bf16 = acts.dtype == torch.bfloat16  # its bits are float32's upper half: widened in the tile
    if candidates is not None:  # the statistics were taken: the pass reads the rows alone
        vals = torch.empty((0, 0, 0), dtype=torch.int16 if bf16 else torch.int32)
    else:
        vals = acts.view(torch.int16) if bf16 else acts.float().view(torch.int32)
    raw = acts if acts.dtype == rows.dtype else acts.to(rows.dtype)
    bits = _BITS[rows.element_size()]
    threads = min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if get_num_threads() != threads:
        set_num_threads(threads)
    state = []
    for kind in ("top", "bottom", "random", "cell"):
        sampler = acc.samplers[kind]
        fresh = sampler.heap is None
        if fresh:
            groups = sampler.comp.shape[0]
            sampler.heap = (np.empty(sampler.comp.shape, np.int64), np.empty(sampler.comp.shape, np.int32),
                            np.empty(groups, np.int32))
        state.append((sampler.comp.numpy(), *sampler.heap, fresh, sampler.ext.numpy(), sampler.base))
    if candidates is None:
        cands = [np.empty((units, batch), np.int64) for _ in range(4)]
        extremes = np.empty((units, batch, 2), np.float32)
    else:
        *given, given_extremes = candidates
        cands = [c.numpy() for c in given]
        extremes = given_extremes.view(units, batch, 2).numpy()
    ids = excerpt_ids.to(torch.int64)
    _update(candidates is None, vals.numpy(), bf16, raw.view(bits).numpy(), settings.skip_positions,  # type: ignore[call-arg]
            settings.hist_stride, ids.numpy(), excerpt_hash(ids).numpy(), acc._unit_hash.numpy(), acc.sums.numpy(),
            acc.max.numpy(), acc.min.numpy(), acc.min_excerpt_max.numpy(), acc.hist.numpy(), *cands, extremes,
            acc.cell_counts.numpy(), rows.view(bits).numpy(), *state[0], *state[1], *state[2], *state[3])
