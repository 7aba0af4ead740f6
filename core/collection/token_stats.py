"""The statistics kernel of a batch: everything one batch contributes before records are chosen (power sums, extremes,
histogram indices, the candidates' composites and cells), as torch elementwise operations and reductions that compile
to a few fused loops; and whether a collection compiles it (torch.compile).

A GPU's collection runs it (accumulate.py), as does a CPU's with NEURONSCOPE_FIXED_SHAPES=1; a CPU collection
otherwise takes the same values in cpu_update.py's compiled passes, which read the same float32 bits with the same
integer operations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from neuronscope.core.collection.sampling import composite, excerpt_hash, keys_from

#: The mantissa bits of float32 sqrt(2), for _half_powers.
_SQRT2_MANTISSA = int(np.array([np.sqrt(2)], np.float32).view(np.int32)[0]) & 0x7FFFFF


def compute_token_stats(
    acts: torch.Tensor, excerpt_ids: torch.Tensor, unit_hash: torch.Tensor, hist_stride: int, hist_offsets: torch.Tensor,
    tokens: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Everything one batch contributes before records are chosen, in one function of elementwise operations and
    reductions (so it compiles to a few fused loops): acts [B, T, F], excerpt_ids [B], unit_hash [F] (sampling.py) ->

    - sums [5, F]: sums of a, a^2, a^3, a^4 and a > 0 (float64);
    - the batch's max and min, and its smallest excerpt max [F];
    - for every hist_stride-th token, its index in the flat histogram, hist_offsets [F] plus its bin [B, T/stride, F]
      (int32, as the offsets are);
    - per candidate (unit u, excerpt b), in [F, B] order (candidate p = u * B + b): its (max, min) [F * B, 2], its
      composites for the top, bottom and random samplers [F, B], and the cell of its max [F, B].

    The power sums are kept in float64 (raw sums cancel badly in the central moments when |mean| >> std), but
    computed in float32, at twice float64's vector width: each excerpt's powers about its own mean m, whose
    sums are exact enough because they are small, then sum (m + d)^p expanded in float64.

    `tokens` is the tokens' dimension: 1 as hooks give the activations, or 2 for acts [B, F, T] (then the histogram
    indices are [B, F, T/stride]); bench/collect.py --profile times both layouts on a GPU.
    """
    x = acts.float()
    t = x.shape[tokens]
    mean = x.mean(tokens, keepdim=True)  # [B, 1, F] (or [B, F, 1])
    d = x - mean
    d2 = d * d
    # [B, F] each; stacked, the seven reductions compile to one loop (apart, the extremes took a pass of their own)
    reduced = torch.stack(
        [d.sum(tokens), d2.sum(tokens), (d2 * d).sum(tokens), (d2 * d2).sum(tokens), (x > 0).float().sum(tokens),
         x.amax(tokens), x.amin(tokens)])
    (s1, s2, s3, s4, positive), ex_max, ex_min = reduced[:5].double(), reduced[5], reduced[6]
    m = mean.squeeze(tokens).double()
    m2 = m * m
    sums = torch.stack([(t * m + s1).sum(0),
                        (t * m2 + 2 * m * s1 + s2).sum(0),
                        (t * m2 * m + 3 * m2 * s1 + 3 * m * s2 + s3).sum(0),
                        (t * m2 * m2 + 4 * m2 * m * s1 + 6 * m2 * s2 + 4 * m * s3 + s4).sum(0),
                        positive.sum(0)])
    maxes, mins = ex_max.t(), ex_min.t()  # [F, B]
    if tokens == 1:
        hist_index = hist_bins(x[:, ::hist_stride, :]) + hist_offsets
    else:
        hist_index = hist_bins(x[:, :, ::hist_stride]) + hist_offsets[:, None]
    ids = excerpt_ids[None, :]
    random = composite(keys_from(unit_hash[:, None], excerpt_hash(excerpt_ids)[None, :]), ids)
    return (sums, ex_max.amax(0), ex_min.amin(0), ex_max.amin(0), hist_index,
            torch.stack([maxes, mins], 2).reshape(-1, 2), composite(-maxes, ids), composite(mins, ids), random,
            cell_bins(maxes).contiguous())


#: A CPU collection compiles its statistics kernel when it reads at least this many activations (excerpts x length x
#: units, summed over layers): some 340 excerpts through all 30 layers of SmolLM2-135M, 51 through GPT-2 XL's 48.
COMPILE_ELEMENTS = 1_000_000_000

_COMPILED: dict[str, Callable[..., Any]] = {}


def stats_compiled(device: torch.device, elements: int) -> bool:
    """Whether a collection that reads `elements` activations compiles its per-batch statistics kernel: on a GPU, or
    for a CPU run long enough to repay the compile (17 s the first time on a 2-core AMD EPYC, about 2 s once torch's
    on-disk cache has it). Eager, the kernel's float32 temporaries cost some 6 ns an activation more at SmolLM2's
    width (44 against 3.7 ms a layer and batch of 64 x 64 tokens) and 14 ns at GPT-2 XL's, where each is larger than
    the allocator keeps (389 against 13 ms). NEURONSCOPE_COMPILE=0/1 forces either way. (A CPU collection takes its
    statistics in cpu_update.py's compiled passes instead, unless NEURONSCOPE_FIXED_SHAPES=1: the kernel is then
    never called, so never compiled.)"""
    wanted = os.environ.get("NEURONSCOPE_COMPILE", "auto")
    return wanted == "1" or (wanted == "auto" and (device.type == "cuda" or elements >= COMPILE_ELEMENTS))


def token_stats_fn(device: torch.device, elements: int) -> Callable[..., Any]:
    """compute_token_stats, compiled where stats_compiled says so (eager where no compiler works)."""
    if not stats_compiled(device, elements):
        return compute_token_stats
    if "stats" not in _COMPILED:
        _COMPILED["stats"] = torch.compile(compute_token_stats, dynamic=False)

    def run(*args: Any) -> Any:
        if _COMPILED["stats"] is not compute_token_stats:
            try:
                return _COMPILED["stats"](*args)
            except Exception:  # noqa: BLE001 - no working compiler here: eager is correct, only slower
                _COMPILED["stats"] = compute_token_stats
        return compute_token_stats(*args)

    return run


def _half_powers(x: torch.Tensor, lowest: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the edges 2^(j/2), j = lowest .. lowest + count - 1 (as float32), lie below |x|, and how many
    at or below it, for float32 x; read off x's exponent and mantissa bits so that it compiles to plain vector
    code (no logarithm, no gathered edges), and exact for every value.

    For |x| = 2^e (1 + m / 2^23), the edges below |x| are those with j < 2e, then 2^e itself when m > 0, and
    2^e sqrt(2) (as float32: 2^e times float32 sqrt(2), whose mantissa is _SQRT2_MANTISSA) when m is above that
    mantissa; at or below differs only in its ties. 0 and subnormals lie below every edge."""
    bits = x.view(torch.int32)
    j = 2 * (((bits >> 23) & 0xFF) - 127) - lowest  # 2e, counted from the lowest edge
    m = bits & 0x7FFFFF
    below = torch.clamp(j + (m > 0).int() + (m > _SQRT2_MANTISSA).int(), 0, count)
    at_or_below = torch.clamp(j + 1 + (m >= _SQRT2_MANTISSA).int(), 0, count)
    return below, at_or_below


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """torch.bucketize(x, HIST_EDGES) for float32 x (edges 0 and +-2^(j/2), j = -16..14; bin i holds
    edges[i-1] < x <= edges[i]), exactly, infinities included; NaN lands with 0. As int32."""
    below, at_or_below = _half_powers(x, -16, 31)
    # Above 0, the 31 negative edges and 0 lie below x; below 0, the negative edges below x are -2^(j/2) < x.
    return torch.where(x > 0, below + 32, torch.where(x < 0, 31 - at_or_below, 31)).int()


def cell_bins(x: torch.Tensor) -> torch.Tensor:
    """torch.bucketize(x, CELL_EDGES) for float32 x (edges 2^(j/2), j = -10..14), exactly; NaN lands in cell 0."""
    return torch.where(x > 0, _half_powers(x, -10, 25)[0], 0).long()
