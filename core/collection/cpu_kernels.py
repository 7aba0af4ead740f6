"""The three compiled passes (numba) that fold a batch into an accumulator on a CPU: statistics, records, rows.

1. statistics (cpu_statistics.py): every excerpt's power sums about each unit's last value, positive count, extremes
   and histogram bins, read once, into a batch-sized scratch.
2. offers: threads take blocks of BLOCK units, fold the batch into their statistics (excerpt by excerpt, each
   excerpt's across the block's units), write the candidates' composites and cells into a scratch of the block's
   own (kept in the cache: no batch-wide candidate arrays), and offer them to every sampler at once, listing the
   rows that changed.
3. copy_rows: threads take excerpts and copy the listed rows, each excerpt's activations read into the cache once.
   A compiled function of its own: inside offers's, its loop ran three to five times slower.

A unit's groups, rows and counts are written by one thread alone in each pass. Arrays are indexed through slices
(see cpu_statistics._widen) or, in the row copy, flat views by unsigned offsets, and a hook's activations with the
model's prefix sliced off are read in place as a contiguous array (cpu_update._contiguous): numba vectorises neither
strided arrays nor an index it cannot prove non-negative (a span's were 7-8 times slower).

Everything but the power sums is exactly what compute_token_stats (token_stats.py) and the samplers' other merges give:
the bins, cells and hashes are the same integer operations on the same float32 bits. The power sums agree to float32
rounding (each excerpt's sums about its last value, summed in another order), as the compiled kernel's do with
eager's.

The records are found per unit by a heap over each group's slots instead of tensor-wide sorts: the same entries as
SmallestK.offer keeps (the k smallest composites of each group, sampling.py), but a unit whose candidates are all
worse than its groups' worst entries costs one scan of a dense array. Each slot's activation row is written once a
batch, whatever happens to it during the batch.

cpu_update.py drives them and has them compiled on a one-excerpt batch before a CPU collection starts
(compile_passes). numba is imported by these three modules alone (its import and a cached compile take about a
second; a first compile, 15-20 s as first measured and about a minute on an AMX Xeon, is cached beside this file or
in the user's cache).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from neuronscope.core.collection.sampling import _MUL2, EMPTY, INF_BITS, NAN_BITS
from neuronscope.core.collection.token_stats import _SQRT2_MANTISSA
from neuronscope.core.layerdata import HIST_EDGES

#: Units per task of the record pass (offers).
BLOCK = 32
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
def _offer(cand, cell_of, r, cells, comp, keys, slots, sizes, worst, fresh, ext, reduced, base, u,  # type: ignore[no-untyped-def]
           moved, touched, out_row, out_b, out_u, n):
    """Offer unit u's candidates cand[:, r] (its column of the block's scratch) to its groups of comp [groups, k]:
    group u, or with cells > 1 the group (u, cell_of[b, r]) of each. A group's kept entries are also a max-heap
    (the first sizes[g] of keys and slots; then its free slots; built from comp when `fresh`): a candidate takes a
    free slot while there is one, then is compared with the group's worst at once. worst[g] is that worst while the
    group is full (EMPTY before): one dense array, which a late batch, whose candidates nearly all fail, reads alone.
    Lists a row to copy from out_*[n] per slot that changed, whatever happened to it in between (moved: -1 per slot,
    and left so), and sets its (max, min) in ext from the batch's statistics (`reduced`)."""
    k, batch = comp.shape[1], cand.shape[0]
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
            worst[g] = keys[g, 0] if size == k else EMPTY
    changed = 0
    for b in range(batch):
        g = first + cell_of[b, r] if cells > 1 else first
        if cand[b, r] >= worst[g]:  # no better than a full group's worst entry
            continue
        size = sizes[g]
        if size < k:  # a free slot (a run's first batches): the candidate takes it
            slot = slots[g, size]
            comp[g, slot] = keys[g, size] = cand[b, r]
            _sift_up(keys, slots, g, size)
            sizes[g] = size + 1
            if size + 1 == k:
                worst[g] = keys[g, 0]
        else:  # better than the group's worst entry: it takes that slot
            slot = slots[g, 0]
            comp[g, slot] = keys[g, 0] = cand[b, r]
            _sift_down(keys, slots, g, k, 0)
            worst[g] = keys[g, 0]
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
        ext[g, slot, 0] = reduced[b, 6, u]  # the excerpt's (max, min), from the batch's statistics
        ext[g, slot, 1] = reduced[b, 7, u]
        out_row[n + i], out_b[n + i], out_u[n + i] = base + g * k + slot, b, u
    return changed


@njit(cache=True, inline="always")
def _fold(reduced, bins, counted, excerpt_ids, excerpt_hashes, unit_hashes, sums, maxes, mins, min_excerpt_max,  # type: ignore[no-untyped-def]
          hist, top, bottom, random, cell_of, u0, w):
    """Units u0 .. u0 + w - 1: the batch's statistics (cpu_statistics._excerpt_statistics's) folded in excerpt by
    excerpt, each excerpt's across the units (contiguous values, through slices: see cpu_statistics._widen): power sums,
    extremes, histogram; and the candidates' composites and cells written into the block's scratch top, bottom, random,
    cell_of [B, w], exactly as compute_token_stats gives them. Each loop over the units reads and writes two to six
    arrays: LLVM vectorises a loop only where a few run-time checks show that its arrays do not overlap (written as one
    loop, this fold took 1.8 times as long)."""
    nt = np.float64(counted)
    bits = reduced.view(np.int32)
    key = np.empty(w, np.float32)
    key_bits = key.view(np.int32)
    sum0, sum1, sum2 = sums[0, u0 : u0 + w], sums[1, u0 : u0 + w], sums[2, u0 : u0 + w]
    sum3, sum4 = sums[3, u0 : u0 + w], sums[4, u0 : u0 + w]
    high, low, lowest_high = maxes[u0 : u0 + w], mins[u0 : u0 + w], min_excerpt_max[u0 : u0 + w]
    counts = hist[u0 * _BINS : (u0 + w) * _BINS]
    hashes = unit_hashes[u0 : u0 + w]
    for b in range(reduced.shape[0]):
        shift, s1, s2 = reduced[b, 0, u0 : u0 + w], reduced[b, 1, u0 : u0 + w], reduced[b, 2, u0 : u0 + w]
        s3, s4, positive = reduced[b, 3, u0 : u0 + w], reduced[b, 4, u0 : u0 + w], reduced[b, 5, u0 : u0 + w]
        his, los = reduced[b, 6, u0 : u0 + w], reduced[b, 7, u0 : u0 + w]
        hi_bits, lo_bits = bits[b, 6, u0 : u0 + w], bits[b, 7, u0 : u0 + w]
        for i in range(w):
            sum0[i] += nt * np.float64(shift[i]) + np.float64(s1[i])
        for i in range(w):
            m = np.float64(shift[i])
            sum1[i] += nt * m * m + 2 * m * np.float64(s1[i]) + np.float64(s2[i])
        for i in range(w):
            m = np.float64(shift[i])
            sum2[i] += nt * m * m * m + 3 * m * m * np.float64(s1[i]) + 3 * m * np.float64(s2[i]) + np.float64(s3[i])
        for i in range(w):
            m = np.float64(shift[i])
            m2 = m * m
            a1, a2, a3, a4 = np.float64(s1[i]), np.float64(s2[i]), np.float64(s3[i]), np.float64(s4[i])
            sum3[i] += nt * m2 * m2 + 4 * m2 * m * a1 + 6 * m2 * a2 + 4 * m * a3 + a4
        for i in range(w):
            sum4[i] += np.float64(positive[i])
        for i in range(w):
            high[i] = his[i] if (his[i] > high[i]) | (his[i] != his[i]) else high[i]
        for i in range(w):
            low[i] = los[i] if (los[i] < low[i]) | (los[i] != los[i]) else low[i]
        for i in range(w):
            lowest_high[i] = his[i] if (his[i] < lowest_high[i]) | (his[i] != his[i]) else lowest_high[i]
        for n in range(bins.shape[1]):
            row = bins[b, n, u0 : u0 + w]
            for i in range(w):  # each unit its own counts: no increment waits for the one before
                counts[i * _BINS + row[i]] += 1
        eid, mixer = excerpt_ids[b], excerpt_hashes[b]
        tops, bottoms, randoms, cells = top[b], bottom[b], random[b], cell_of[b]
        for i in range(w):
            tops[i] = _composite(np.int64(hi_bits[i]) ^ _SIGN, eid)
        for i in range(w):
            bottoms[i] = _composite(np.int64(lo_bits[i]), eid)
        for i in range(w):
            key[i] = np.float32((((hashes[i] ^ mixer) * _MUL2) >> 40) & 0xFFFFFF) / np.float32(1 << 24)
        for i in range(w):
            randoms[i] = _composite(np.int64(key_bits[i]), eid)
        for i in range(w):
            cells[i] = _half_powers(np.int64(hi_bits[i]), -10, 25)[0] if his[i] > 0 else 0


@njit(cache=True, parallel=True)
def offers(reduced, bins, counted, excerpt_ids, excerpt_hashes, unit_hashes,  # type: ignore[no-untyped-def]
            sums, maxes, mins, min_excerpt_max, hist, cell_counts,
            top_comp, top_keys, top_slots, top_sizes, top_worst, top_fresh, top_ext, top_base,
            bottom_comp, bottom_keys, bottom_slots, bottom_sizes, bottom_worst, bottom_fresh, bottom_ext,
            bottom_base, random_comp, random_keys, random_slots, random_sizes, random_worst, random_fresh, random_ext,
            random_base,
            cell_comp, cell_keys, cell_slots, cell_sizes, cell_worst, cell_fresh, cell_ext, cell_base):
    """Pass 2, per block of units: the statistics folded in, the cells counted, and the candidates offered to every
    sampler at once. Returns the rows to copy: per block, into out_row[block, i] from unit out_u[block, i] of excerpt b,
    for i from start[block, b] to start[block, b + 1]."""
    batch, units = reduced.shape[0], reduced.shape[2]
    cells = cell_comp.shape[0] // units
    blocks = (units + BLOCK - 1) // BLOCK
    width = max(top_comp.shape[1], bottom_comp.shape[1], random_comp.shape[1], cells * cell_comp.shape[1])
    per_unit = top_comp.shape[1] + bottom_comp.shape[1] + random_comp.shape[1] + cells * cell_comp.shape[1]
    out_row = np.empty((blocks, BLOCK * per_unit), np.int64)
    out_u = np.empty((blocks, BLOCK * per_unit), np.int64)
    start = np.zeros((blocks, batch + 1), np.int64)
    for block in prange(blocks):
        u0 = block * BLOCK
        w = min(units, u0 + BLOCK) - u0
        top, bottom = np.empty((batch, w), np.int64), np.empty((batch, w), np.int64)  # the block's candidates
        random, cell_of = np.empty((batch, w), np.int64), np.empty((batch, w), np.int64)
        _fold(reduced, bins, counted, excerpt_ids, excerpt_hashes, unit_hashes, sums, maxes, mins, min_excerpt_max,
              hist, top, bottom, random, cell_of, u0, w)
        for b in range(batch):
            for r in range(w):
                cell_counts[(u0 + r) * cells + cell_of[b, r]] += 1
        moved = np.full(width, -1, np.int64)  # per slot of a unit's groups: the excerpt that took it
        touched = np.empty(width, np.int64)
        rows_at = np.empty(BLOCK * per_unit, np.int64)
        from_b = np.empty(BLOCK * per_unit, np.int64)
        from_u = np.empty(BLOCK * per_unit, np.int64)
        n = 0
        for u in range(u0, u0 + w):
            n += _offer(top, cell_of, u - u0, 1, top_comp, top_keys, top_slots, top_sizes, top_worst, top_fresh, top_ext,
                        reduced, top_base, u, moved, touched, rows_at, from_b, from_u, n)
            n += _offer(bottom, cell_of, u - u0, 1, bottom_comp, bottom_keys, bottom_slots, bottom_sizes, bottom_worst,
                        bottom_fresh, bottom_ext, reduced, bottom_base, u, moved, touched, rows_at, from_b, from_u, n)
            n += _offer(random, cell_of, u - u0, 1, random_comp, random_keys, random_slots, random_sizes, random_worst,
                        random_fresh, random_ext, reduced, random_base, u, moved, touched, rows_at, from_b, from_u, n)
            n += _offer(random, cell_of, u - u0, cells, cell_comp, cell_keys, cell_slots, cell_sizes, cell_worst, cell_fresh,
                        cell_ext, reduced, cell_base, u, moved, touched, rows_at, from_b, from_u, n)
        for i in range(n):  # a counting sort by excerpt
            start[block, from_b[i] + 1] += 1
        for b in range(batch):
            start[block, b + 1] += start[block, b]
        at = start[block, :batch].copy()
        for i in range(n):
            out_row[block, at[from_b[i]]], out_u[block, at[from_b[i]]] = rows_at[i], from_u[i]
            at[from_b[i]] += 1
    return out_row, out_u, start


@njit(cache=True, parallel=True)
def copy_rows(raw, first, rows, out_row, out_u, start):  # type: ignore[no-untyped-def]
    """Pass 3: the rows `offers` lists, an excerpt at a time (its activations are read into the cache once). A
    compiled function of its own: inside offers's, this loop ran three to five times slower. Indexed through flat
    views by unsigned offsets: numba checks a signed index for negative values at every read and write, and with
    those checks (two-dimensional indexing) the copy took 1.2-1.7 times as long."""
    batch, length, units = raw.shape
    width, step = length - first, np.uint64(units)
    source, target = raw.reshape(-1), rows.reshape(-1)
    for b in prange(batch):
        for block in range(start.shape[0]):
            for i in range(start[block, b], start[block, b + 1]):
                at = np.uint64((b * length + first) * units + out_u[block, i])
                to = np.uint64(out_row[block, i] * width)
                for t in range(width):
                    target[to + np.uint64(t)] = source[at + np.uint64(t) * step]
