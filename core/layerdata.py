"""Numpy-only shapes of a collected layer, shared by the collector, the summariser and the store.

Kept free of torch so that opening a store (info, show, the app) never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Token-activation histogram edges: 0 and +-2^(j/2) for j in -16..14 (64 bins, symmetric log scale).
HIST_EDGES = np.array(
    [-(2.0 ** (j / 2)) for j in range(14, -17, -1)] + [0.0] + [2.0 ** (j / 2) for j in range(-16, 15)],
    dtype=np.float32,
)
#: Cells of the excerpt-max distribution that quantile sampling stratifies by: 2^(j/2), j in -10..14.
CELL_EDGES = np.array([2.0 ** (j / 2) for j in range(-10, 15)], dtype=np.float32)
CELLS = len(CELL_EDGES) + 1
#: Candidates kept per cell for the quantile-bin samples.
CELL_K = 3


@dataclass(frozen=True)
class Samples:
    """One kind of kept records for every neuron of a layer, their activations as the store keeps them: int8 codes
    with a scale per record (quantize), taken on the collector's device before they leave it."""

    ids: np.ndarray
    """[F, k] excerpt ids, -1 for an empty slot."""
    scales: np.ndarray
    """[F, k] float32: each record's largest |activation| (0 for an empty slot)."""
    codes: np.ndarray
    """[F, k, length] int8 activations, round(127 a / scale)."""
    maxes: np.ndarray
    """[F, k] exact excerpt maxima (the sampler's keys; activations are quantised)."""
    mins: np.ndarray
    """[F, k] exact excerpt minima."""

    @classmethod
    def of(cls, ids: np.ndarray, acts: np.ndarray, maxes: np.ndarray, mins: np.ndarray) -> Samples:
        """Samples of float activations acts [F, k, length], quantised."""
        f, k, length = acts.shape
        scales, codes = quantize(acts.reshape(f * k, length))
        return cls(ids, scales.reshape(f, k), codes.reshape(f, k, length), maxes, mins)

    @property
    def acts(self) -> np.ndarray:
        """[F, k, length] float32: the activations the codes stand for (dequantize, computed at each access)."""
        f, k, length = self.codes.shape
        return dequantize(self.scales.reshape(-1), self.codes.reshape(f * k, length)).reshape(f, k, length)


def quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n, T] float32 -> (scale [n] = max |a|, int8 codes [n, T] = round(127 a / scale), half to even).
    In float32 throughout, so that a collector's torch quantize on any device gives the same codes; a NaN code
    (a NaN or infinite activation) is 0, its scale NaN or infinite."""
    rows = np.asarray(rows, np.float32)
    scale = np.abs(rows).max(1) if rows.size else np.zeros(len(rows), np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)[:, None]
    with np.errstate(invalid="ignore"):  # an infinity over its infinite scale: NaN, then code 0
        codes = np.rint(rows / safe * np.float32(127.0)).clip(-127, 127)
    return scale.astype(np.float32), np.nan_to_num(codes, nan=0.0).astype(np.int8)


def dequantize(scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Inverse of quantize; the extreme codes map back to exactly +-scale, so re-quantising is a no-op."""
    with np.errstate(invalid="ignore"):  # a record of infinite scale (it held an infinity): NaN but at its extremes
        values = codes.astype(np.float32) * (scale[:, None] / np.float32(127.0))
        extreme = np.abs(codes) == 127
        return np.where(extreme, np.sign(codes) * scale[:, None], values).astype(np.float32)


@dataclass(frozen=True)
class LayerResult:
    """A finished layer, as numpy arrays ready for the store.  Row order: neuron index."""

    layer: int
    """Layer index."""
    sums: np.ndarray
    """[5, F] float64: sum a, a^2, a^3, a^4, count a > 0."""
    count: int
    """Tokens seen."""
    max: np.ndarray
    """[F] largest activation."""
    min: np.ndarray
    """[F] most negative activation."""
    min_excerpt_max: np.ndarray
    """[F] smallest excerpt maximum (lower edge of the quantile range)."""
    histogram: np.ndarray
    """[F, len(HIST_EDGES)+1] int64 token counts (subsampled by hist_stride)."""
    cell_counts: np.ndarray
    """[F, CELLS] int64 excerpt counts per cell of excerpt maxima."""
    samples: dict[str, Samples]
    """top, bottom, random and cell samples."""


@dataclass(frozen=True)
class LayerSummary:
    """Per-neuron columns of one layer, row i = neuron i."""

    mean: np.ndarray
    """[F] mean activation."""
    variance: np.ndarray
    """[F] population variance."""
    skewness: np.ndarray
    """[F] standardised third moment."""
    kurtosis: np.ndarray
    """[F] standardised fourth moment."""
    density: np.ndarray
    """[F] share of tokens > 0."""
    selectivity: np.ndarray
    """[F] (mean top-k excerpt max - median excerpt max) / token std."""
    quantile_edges: np.ndarray
    """[F, Q] excerpt-max value at each of the settings' quantiles."""
    quantile: Samples
    """[F, (Q-1) * quantile_k] samples; slot j is in bin j // quantile_k; id -1 where a bin had too few."""
    first_peak: np.ndarray
    """[F] share of the top records whose peak is at the first position counted (after settings.skip_positions)."""
