"""Activations on your own text: a text run through the subject, every collected unit's activation at every token,
and the units that fire most on each token and over the whole text.

A unit's activation is compared with the largest it reached over the run's corpus (its collected max), so units of
different layers and scales rank together: 1.0 means "as strongly as its strongest corpus excerpt".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from neuronscope.core.ids import NeuronId
from neuronscope.core.models.subject import SubjectError

if TYPE_CHECKING:
    from neuronscope.core.models.sparse import SparseCoder
    from neuronscope.core.models.subject import Subject


@dataclass(frozen=True)
class Probe:
    """A text's activations."""

    tokens: tuple[str, ...]
    """The text's tokens, decoded one by one (the model's own prefix, such as a BOS token, is not among them)."""
    layers: tuple[int, ...]
    """Layers read, in the order of `acts`' first axis."""
    acts: np.ndarray
    """[layers, tokens, neurons] float32."""

    def unit(self, unit: NeuronId) -> np.ndarray:
        """One unit's activation at every token."""
        if unit.layer not in self.layers or not 0 <= unit.neuron < self.acts.shape[2]:
            raise SubjectError(f"{unit} is not among the units probed (layers {self.layers[0]}-{self.layers[-1]}, "
                               f"neurons 0-{self.acts.shape[2] - 1})")
        return self.acts[self.layers.index(unit.layer), :, unit.neuron]


@dataclass(frozen=True)
class Firing:
    """A unit firing on a text (at a token, or at its peak over the text)."""

    unit: NeuronId
    activation: float
    relative: float
    """activation / the unit's collected max (nan where that max is not positive)."""
    position: int
    """The token (its peak over the text, for whole-text rankings)."""


def probe_text(subject: Subject, text: str, layers: tuple[int, ...], sparse: SparseCoder | None = None) -> Probe:
    """Run `text` through the subject and keep `layers`' activations (with `sparse`, that coder's latents at its
    layer instead); SubjectError for an empty or too long text."""
    import torch

    ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SubjectError("the text has no tokens: pass some text to probe")
    room = subject.context and subject.context - len(subject.prefix_ids)
    if room and len(ids) > room:
        raise SubjectError(f"the text is {len(ids):,} tokens, more than {subject.name} reads at once ({room:,}): "
                           "shorten it")
    if sparse is not None:
        hidden = subject.capture(torch.tensor([ids]), sparse.layer, sparse.point)
        latents = sparse.encode(hidden)[0].cpu().numpy()  # [T, d_sae]
        return Probe(tuple(subject.token_strings(ids)), (sparse.layer,), latents[None])
    acts = subject.activations(torch.tensor([ids]), layers)
    stacked = np.stack([acts[layer][0].float().cpu().numpy() for layer in layers])  # [layers, T, F]
    return Probe(tuple(subject.token_strings(ids)), tuple(layers), stacked)


def _relative(probe: Probe, maxima: np.ndarray) -> np.ndarray:
    """[layers, T, F] activations over each unit's collected max; -inf where that max is not positive."""
    scale = np.where(maxima > 0, maxima, np.nan)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(probe.acts / scale, nan=-np.inf)


def top_at_tokens(probe: Probe, maxima: np.ndarray, count: int) -> list[list[Firing]]:
    """For each token, the `count` units most active there relative to their collected max (`maxima` [layers, F])."""
    relative = _relative(probe, maxima)  # [L, T, F]
    n_layers, n_tokens, width = relative.shape
    flat = relative.transpose(1, 0, 2).reshape(n_tokens, n_layers * width)
    return [[_firing(probe, maxima, int(i), t) for i in row if np.isfinite(flat[t, i])]
            for t, row in enumerate(_best(flat, count))]


def top_over_text(probe: Probe, maxima: np.ndarray, count: int) -> list[Firing]:
    """The `count` units whose peak over the text is highest relative to their collected max."""
    relative = _relative(probe, maxima)
    peaks = relative.max(1)  # [L, F]
    where = relative.argmax(1)
    flat = peaks.reshape(-1)
    width = peaks.shape[1]
    return [_firing(probe, maxima, int(i), int(where[i // width, i % width]))
            for i in _best(flat[None, :], count)[0] if np.isfinite(flat[i])]


def _best(values: np.ndarray, count: int) -> np.ndarray:
    """Per row of `values` [rows, n], the indices of the `count` largest, largest first (ties: lower index first);
    a partial selection, then a sort of the few chosen."""
    count = min(count, values.shape[1])
    if count < values.shape[1]:
        chosen = np.argpartition(-values, count - 1, axis=1)[:, :count]
    else:
        chosen = np.broadcast_to(np.arange(count), values.shape).copy()
    keys = np.take_along_axis(values, chosen, 1)
    order = np.lexsort((chosen, -keys), axis=1)
    return np.take_along_axis(chosen, order, 1)


def _firing(probe: Probe, maxima: np.ndarray, flat_unit: int, position: int) -> Firing:
    width = probe.acts.shape[2]
    row, neuron = divmod(flat_unit, width)
    value = float(probe.acts[row, position, neuron])
    peak = float(maxima[row, neuron])
    return Firing(NeuronId(probe.layers[row], neuron), value, value / peak if peak > 0 else float("nan"), position)
