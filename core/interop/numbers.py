"""Numbers as the exports write them: no more digits than the store holds.

- Values the store keeps as float32 (maxima, boundaries, related weights, simulations) are written as their
  shortest float32 text: 2.267, not the float64 expansion 2.2669999599456787 of the same float32.
- float32 values written on another scale (simulations, stored on our 0-9 scale, written on the release's 0-10) to
  SCALED_DIGITS significant digits: 0.198, not 0.19800001.
- Activations the store keeps as int8 codes times a per-record scale (neuronscope.core.layerdata.quantize) are
  written to ACTIVATION_DIGITS significant digits of the record's largest |activation|, finer than the int8 step
  (1/127 of it): -0.054, not the decoded -0.05355118215084076. The record's peak itself, stored exactly (the
  scale), keeps its float32 value.

Unknown numbers (NaN, infinities) are None: JSON has no NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Significant digits, relative to a record's largest |activation|, that exported activations keep.
ACTIVATION_DIGITS = 4
#: Significant digits of a float32 value written on another scale (float32 holds 7; the scaling may cost one).
SCALED_DIGITS = 6


def shortest32(values: Sequence[float] | np.ndarray) -> list[float | None]:
    """Each value as the shortest decimal that reads back as the same float32 (None where not finite)."""
    array = np.asarray(values, np.float32)
    if not array.size:
        return []
    finite = np.isfinite(array)
    text = array.astype(str)
    return [float(t) if ok else None for t, ok in zip(text.tolist(), finite.tolist())]


def float32(value: float | None) -> float | None:
    """One value as `shortest32` writes it."""
    return float(str(np.float32(value))) if value is not None and math.isfinite(value) else None


def activations(values: Sequence[float] | np.ndarray) -> list[float | None]:
    """A record's decoded activations at the precision the store has (ACTIVATION_DIGITS significant digits of its
    largest |activation|; the peak as its float32 value; None where not finite)."""
    array = np.asarray(values, np.float64)
    if not array.size:
        return []
    finite = np.isfinite(array)
    peak = float(np.abs(array[finite]).max()) if finite.any() else 0.0
    if not peak > 0:
        return shortest32(array)
    decimals = ACTIVATION_DIGITS - 1 - math.floor(math.log10(peak))
    out: list[float | None] = (np.round(np.where(finite, array, 0.0), decimals) + 0.0).tolist()  # (-0.0 as 0.0)
    for i in np.flatnonzero(~finite | (np.abs(array) == peak)).tolist():
        out[i] = float32(float(array[i]))
    return out


def scaled(values: Sequence[float], factor: float) -> list[float | None]:
    """float32 values times `factor`, to SCALED_DIGITS significant digits (None where not finite)."""
    return [float(f"{v * factor:.{SCALED_DIGITS}g}") if math.isfinite(v) else None for v in values]
