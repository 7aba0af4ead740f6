"""Scores of a simulation against the real activations, with bootstrap intervals.

Methods (each a row in the store's `scores` table):
- `all`: Pearson correlation pooled over every token of the held-out top and random excerpts (the headline);
- `top`, `random`: the same over the top-only or random-only excerpts;
- `r2`: centred r², 1 - sum((a' - p')^2) / sum(a'^2) where a' is the target on the prompt's 0-9 scale and
  p' the prediction, each minus its mean: like correlation it ignores an offset, unlike it it also
  rewards predicting the right size of a peak (it can be negative).
- `contrast`: the `all` correlation of the prediction minus the simulator's prediction for a neutral explanation
  on the same excerpts, which cancels what the simulator predicts from the text alone (a small simulator's
  prior for salient tokens), leaving what the explanation itself changes.
A constant prediction or target has no correlation: the score is 0 with a flag, never a crash.
Intervals: percentile bootstrap over excerpts (tokens within an excerpt are not independent),
resampling top and random excerpts separately, from per-excerpt sums so it is one matrix product. A resample whose
prediction is constant (it drew none of the excerpts where the explanation predicts anything) scores 0, as the whole
sample would: an interval that reaches 0 says that the score rests on a few excerpts. Leaving such resamples out
would give a narrow interval conditional on the rare excerpts being drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

from neuronscope.core.records import TOP
from neuronscope.core.results import Score

METHODS = ("all", "top", "random", "r2")
#: Bootstrap resamples.
BOOTSTRAP = 1000


def _sums(targets: Sequence[np.ndarray], predictions: Sequence[np.ndarray]) -> np.ndarray:
    """Per-excerpt sufficient statistics [excerpts, 6] = [n, Σa, Σp, Σa², Σp², Σap] in float64."""
    lengths = np.fromiter((len(t) for t in targets), np.int64, len(targets))
    if not lengths.sum():
        return np.zeros((len(targets), 6))
    a = np.concatenate([np.asarray(t, np.float64) for t in targets])
    p = np.concatenate([np.asarray(x, np.float64) for x in predictions])
    excerpt = np.repeat(np.arange(len(targets)), lengths)

    def per_excerpt(values: np.ndarray) -> np.ndarray:
        return np.bincount(excerpt, values, minlength=len(targets))

    return np.stack([lengths.astype(np.float64), per_excerpt(a), per_excerpt(p), per_excerpt(a * a),
                     per_excerpt(p * p), per_excerpt(a * p)], axis=1)


def _from_sums(s: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, constant prediction mask, constant target mask) for stacked sums [..., method, 6]; `r2` [method]
    says which methods are the centred r², the rest being correlations."""
    n = np.maximum(s[..., 0], 1)
    saa = s[..., 3] - s[..., 1] ** 2 / n
    spp = s[..., 4] - s[..., 2] ** 2 / n
    sap = s[..., 5] - s[..., 1] * s[..., 2] / n
    eps = 1e-9
    flat_p = spp <= eps * s[..., 4]  # relative: the spread is nothing next to the values themselves
    flat_a = saa <= eps * s[..., 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(r2, 1.0 - (saa + spp - 2 * sap) / saa, sap / np.sqrt(saa * spp))
    value = np.clip(np.where(flat_a | (flat_p & ~r2), 0.0, value), -1e6, 1.0)
    return np.where(np.isnan(value), 0.0, value), flat_p, flat_a


@lru_cache(maxsize=64)
def _weights(kinds: tuple[str, ...], seed: int, resamples: int) -> np.ndarray:
    """Bootstrap weights [resamples, excerpts]: each stratum (top, random) resampled within itself, as multinomial
    counts. A neuron's explanation and controls are scored on the same excerpts with the same seed, so they share
    one draw (kept read-only)."""
    kinds_arr = np.asarray(kinds)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(kinds)))
    for kind in np.unique(kinds_arr):
        members = np.flatnonzero(kinds_arr == kind)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), resamples)
    weights.flags.writeable = False
    return weights


def score(kinds: Sequence[str], targets: Sequence[np.ndarray], predictions: Sequence[np.ndarray], *,
          scale_max: float, seed: int = 0, resamples: int = BOOTSTRAP) -> dict[str, Score]:
    """Every method's score of predictions (0-9 scale) against targets (raw activations of the tail), per
    excerpt; `kinds` says which excerpts are top and which random; scale_max puts targets on the 0-9 scale
    for r². Every method's bootstrap is one product of the same stratified weights (`top` and `random` read
    only their stratum's columns, which is the same as resampling that stratum alone)."""
    scale = TOP / scale_max if scale_max > 0 else 1.0
    kinds_arr = np.asarray(kinds)
    plain = _sums(targets, predictions)
    scaled = plain * np.array([1.0, scale, 1.0, scale * scale, 1.0, scale])  # r² reads targets on the 0-9 scale
    picks = {"all": np.ones(len(kinds), bool), "top": kinds_arr == "top", "random": kinds_arr == "random",
             "r2": np.ones(len(kinds), bool)}
    r2 = np.array([m == "r2" for m in METHODS])
    # [excerpts, method, 6]: each method's per-excerpt sums, zero outside its excerpts
    stacked = np.stack([(scaled if m == "r2" else plain) * picks[m][:, None] for m in METHODS], axis=1)
    weights = _weights(tuple(kinds), seed, resamples)
    boot = (weights @ stacked.reshape(len(kinds), len(METHODS) * 6)).reshape(resamples, len(METHODS), 6)
    intervals = np.percentile(_from_sums(boot, r2)[0], [2.5, 97.5], axis=0)  # [2, method]
    totals = stacked.sum(axis=0)
    values, flats_p, flats_a = _from_sums(totals, r2)
    out = {}
    for k, method in enumerate(METHODS):
        if not picks[method].any() or totals[k, 0] == 0:
            out[method] = Score(method, 0.0, 0.0, 0.0, 0, "no_tokens")
            continue
        low, high = intervals[:, k]
        flags = ",".join(f for f, on in (("constant_prediction", flats_p[k] and method != "r2"),
                                         ("constant_target", flats_a[k])) if on)
        out[method] = Score(method, float(values[k]), float(low), float(high), int(totals[k, 0]), flags)
    return out


def contrast(kinds: Sequence[str], targets: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
             neutral: Sequence[np.ndarray], *, seed: int = 0, resamples: int = BOOTSTRAP) -> Score:
    """The `contrast` score: Pearson r (pooled, with its bootstrap interval) of predictions minus a neutral
    explanation's predictions on the same excerpts."""
    shifted = [np.asarray(p, np.float64) - np.asarray(n, np.float64) for p, n in zip(predictions, neutral)]
    pooled = score(kinds, targets, shifted, scale_max=1.0, seed=seed, resamples=resamples)["all"]
    return replace(pooled, method="contrast")
