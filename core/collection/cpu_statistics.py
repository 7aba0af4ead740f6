"""Pass 1 of the CPU's compiled bookkeeping (cpu_kernels.py describes all three): every excerpt's statistics, threads
taking (excerpt, span of up to SPAN units) tasks and reading the excerpt's activations a token at a time, contiguous
values that the prefetcher streams and the loops vectorise over, once: power sums about each unit's last value,
positive count, extremes and histogram bins, into a batch-sized scratch (about 5 MB for 64 excerpts of SmolLM2) that
cpu_kernels.offers folds in. Imported with numba, when a CPU collection first updates."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from neuronscope.core.collection.token_stats import _SQRT2_MANTISSA

#: Units per task of a batch's statistics, read token by token (an excerpt's sums for a span, 28 bytes a unit, stay
#: in the L2 cache).
SPAN = 2048


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
def _widen(vals, bf16, b, t, u0, w, out_bits):  # type: ignore[no-untyped-def]
    """Units u0 .. u0 + w - 1 of token t of excerpt b as float32 bits (bf16's are float32's upper half). Read
    through a slice: indexed by u0 + i, numba's negative-index check keeps the loop from vectorising."""
    src = vals[b, t, u0 : u0 + w]
    if bf16:
        for i in range(w):
            out_bits[i] = np.int32(src[i]) << 16
    else:
        for i in range(w):
            out_bits[i] = src[i]


@njit(cache=True, inline="always")
def _excerpt_statistics(vals, bf16, first, skip, stride, b, u0, w, reduced, bins):  # type: ignore[no-untyped-def]
    """Excerpt b's statistics of units u0 .. u0 + w - 1 (its tokens from `first` on, the first `skip` of them left
    out), in one read, a token's values at a time (contiguous, which the prefetcher streams): the power sums about a
    shift, each unit's last value, and its positive count in reduced[b, 0..5] (float32: the shift, then the sums), its
    (max, min) in reduced[b, 6..7], and the histogram bin of every stride-th token in bins[b].

    Sums about the excerpt's mean would take a second read (and 1.4 times as long). About its last value they are
    as precise unless that value is far from the others: not the first, where many models put a massive activation
    (summed about it, the moments came out a hundred times less precise; tests/test_summaries.py). A unit whose
    fourth-power sum is not finite (an infinity or a NaN among its values, or values some 10^9 apart) is taken again
    by _centred_statistics, whose extremes keep a NaN as amax does: only then could a NaN be among them."""
    counted = vals.shape[1] - first - skip
    if counted <= 0:
        _centred_statistics(vals, bf16, first, skip, b, u0, w, reduced)
        _excerpt_bins(vals, bf16, first + skip, stride, b, u0, w, bins)
        return
    row = np.empty((4, w), np.float32)
    row_bits = row.view(np.int32)
    shift = np.empty(w, np.float32)
    _widen(vals, bf16, b, vals.shape[1] - 1, u0, w, shift.view(np.int32))
    s1, s2, s3, s4 = np.zeros(w, np.float32), np.zeros(w, np.float32), np.zeros(w, np.float32), np.zeros(w, np.float32)
    positive = np.zeros(w, np.int32)
    high, low = np.full(w, -np.inf, np.float32), np.full(w, np.inf, np.float32)
    rest = first + skip + (counted // 4) * 4
    for t in range(first + skip, rest, 4):  # four tokens a step: the sums are loaded and stored a quarter as often
        for j in range(4):
            _widen(vals, bf16, b, t + j, u0, w, row_bits[j])
        for i in range(w):
            m = shift[i]
            x0, x1, x2, x3 = row[0, i], row[1, i], row[2, i], row[3, i]
            d0, d1, d2, d3 = x0 - m, x1 - m, x2 - m, x3 - m
            q0, q1, q2, q3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
            s1[i] += (d0 + d1) + (d2 + d3)
            s2[i] += (q0 + q1) + (q2 + q3)
            s3[i] += (q0 * d0 + q1 * d1) + (q2 * d2 + q3 * d3)
            s4[i] += (q0 * q0 + q1 * q1) + (q2 * q2 + q3 * q3)
            positive[i] += (np.int32(x0 > 0) + np.int32(x1 > 0)) + (np.int32(x2 > 0) + np.int32(x3 > 0))
            most, least = max(max(x0, x1), max(x2, x3)), min(min(x0, x1), min(x2, x3))
            high[i] = most if most > high[i] else high[i]
            low[i] = least if least < low[i] else low[i]
    for t in range(rest, vals.shape[1]):
        _widen(vals, bf16, b, t, u0, w, row_bits[0])
        _add_token(row[0], shift, s1, s2, s3, s4, positive, high, low)
    _store(reduced, b, u0, shift, s1, s2, s3, s4, positive, high, low)
    for i in range(w):
        if not np.isfinite(s4[i]):
            _centred_statistics(vals, bf16, first, skip, b, u0 + i, 1, reduced)
    _excerpt_bins(vals, bf16, first + skip, stride, b, u0, w, bins)


@njit(cache=True)
def _centred_statistics(vals, bf16, first, skip, b, u0, w, reduced):  # type: ignore[no-untyped-def]
    """_excerpt_statistics's reduced[b, 0..7] for units u0 .. u0 + w - 1 in two reads: the excerpt's mean, then the
    power sums about it, and extremes that keep a NaN (as amax keeps it). For the rare units whose values one read
    cannot sum about their last (infinities, NaNs)."""
    row = np.empty(w, np.float32)
    mean = np.zeros(w, np.float32)
    for t in range(first + skip, vals.shape[1]):
        _widen(vals, bf16, b, t, u0, w, row.view(np.int32))
        for i in range(w):
            mean[i] += row[i]
    for i in range(w):
        mean[i] /= np.float32(vals.shape[1] - first - skip)
    s1, s2, s3, s4 = np.zeros(w, np.float32), np.zeros(w, np.float32), np.zeros(w, np.float32), np.zeros(w, np.float32)
    positive = np.zeros(w, np.int32)
    high, low = np.full(w, -np.inf, np.float32), np.full(w, np.inf, np.float32)
    for t in range(first + skip, vals.shape[1]):
        _widen(vals, bf16, b, t, u0, w, row.view(np.int32))
        _add_token(row, mean, s1, s2, s3, s4, positive, high, low)
    _store(reduced, b, u0, mean, s1, s2, s3, s4, positive, high, low)


@njit(cache=True, inline="always")
def _add_token(row, shift, s1, s2, s3, s4, positive, high, low):  # type: ignore[no-untyped-def]
    """One token's values (row) added to the power sums about `shift`, the positive counts and the extremes (NaN
    kept)."""
    for i in range(row.shape[0]):
        x = row[i]
        d = x - shift[i]
        q = d * d
        s1[i] += d
        s2[i] += q
        s3[i] += q * d
        s4[i] += q * q
        positive[i] += np.int32(x > 0)
        high[i] = _highest(high[i], x, x)
        low[i] = _lowest(low[i], x, x)


@njit(cache=True, inline="always")
def _store(reduced, b, u0, shift, s1, s2, s3, s4, positive, high, low):  # type: ignore[no-untyped-def]
    """An excerpt's statistics of units u0 .. u0 + len(shift) - 1 into reduced[b, 0..7] (float32; the positive
    counts are exact below 2^24 tokens an excerpt)."""
    w = shift.shape[0]
    for k, values in enumerate((shift, s1, s2, s3, s4)):
        out = reduced[b, k, u0 : u0 + w]
        for i in range(w):
            out[i] = values[i]
    out = reduced[b, 5, u0 : u0 + w]
    for i in range(w):
        out[i] = positive[i]
    for k, values in enumerate((high, low)):
        out = reduced[b, 6 + k, u0 : u0 + w]
        for i in range(w):
            out[i] = values[i]


@njit(cache=True, inline="always")
def _excerpt_bins(vals, bf16, start, stride, b, u0, w, bins):  # type: ignore[no-untyped-def]
    """The histogram bin (token_stats.hist_bins) of units u0 .. u0 + w - 1 of excerpt b's every stride-th token from
    `start`, in bins[b]."""
    row_bits = np.empty(w, np.int32)
    row = row_bits.view(np.float32)
    for n, t in enumerate(range(start, vals.shape[1], stride)):
        _widen(vals, bf16, b, t, u0, w, row_bits)
        out = bins[b, n, u0 : u0 + w]
        for i in range(w):
            x, bits = row[i], row_bits[i]
            half = 2 * (((bits >> 23) & 0xFF) - 127) + 16  # _half_powers(bits, -16, 31), written to vectorise
            mantissa = bits & 0x7FFFFF
            below = min(max(half + (mantissa > 0) + (mantissa > _SQRT2_MANTISSA), 0), 31)
            at_or_below = min(max(half + 1 + (mantissa >= _SQRT2_MANTISSA), 0), 31)
            out[i] = below + 32 if x > 0 else (31 - at_or_below if x < 0 else 31)


@njit(cache=True, parallel=True)
def statistics(vals, bf16, first, skip, stride):  # type: ignore[no-untyped-def]
    """Pass 1: every excerpt's statistics (_excerpt_statistics), a span of units at a time, threads taking (excerpt,
    span) tasks. vals [B, first + length, units]."""
    batch, length, units = vals.shape
    counted = length - first - skip
    reduced = np.empty((batch, 8, units), np.float32)
    bins = np.empty((batch, (counted + stride - 1) // stride, units), np.uint8)
    spans = (units + SPAN - 1) // SPAN
    span = (units + spans - 1) // spans
    for task in prange(batch * spans):
        b, u0 = task // spans, (task % spans) * span
        _excerpt_statistics(vals, bf16, first, skip, stride, b, u0, min(units, u0 + span) - u0, reduced, bins)
    return reduced, bins
