"""Addresses: one neuron address (`NeuronId`) and one grammar for layer ranges, used by every command, the
app's command palette and the job engine."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from neuronscope.core.errors import InputError

#: LAYER then INDEX, separated by `/`, `:` or spaces, each optionally prefixed (`L12/N345`, `L12N345`, `12:345`).
_NEURON = re.compile(r"\s*l?(-1|\d+)\s*(?:[/:]|\s|(?=n))\s*n?(\d+)\s*", re.IGNORECASE)
NEURON_FORMS = "12/345, L12/N345, L12N345 or 12:345"


class NeuronId(NamedTuple):
    """A neuron: one unit of the input of a layer's MLP output projection. A tuple, so it orders,
    hashes and unpacks like the `(layer, index)` rows the store returns."""

    layer: int
    """Transformer block, from 0."""
    neuron: int
    """Index in the MLP hidden activation (`neuron`, not `index`, which a tuple already has as a method)."""

    def __str__(self) -> str:
        return f"L{self.layer}/N{self.neuron}"

    @classmethod
    def parse(cls, text: str, layers: Sequence[int] | None = None) -> NeuronId:
        """`12/345`, `L12/N345`, `L12N345`, `12:345` or `12 345` -> NeuronId(12, 345), and `-1/345` the last of
        `layers` (a run's); InputError otherwise."""
        match = _NEURON.fullmatch(text)
        if not match:
            raise InputError(f"cannot read the neuron {text!r}: write LAYER/INDEX, e.g. {NEURON_FORMS}")
        if match.group(1) == "-1":
            if not layers:
                raise InputError(f"{text.strip()!r}: layer -1 means the last layer, which is not known here: name it")
            return cls(max(layers), int(match.group(2)))
        return cls(int(match.group(1)), int(match.group(2)))

    @staticmethod
    def written(text: str) -> bool:
        """Whether a text is written as a neuron (`parse` reads it, given the layers)."""
        return _NEURON.fullmatch(text) is not None


def layers_text(layers: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5': the form parse_layers reads."""
    spans: list[list[int]] = []
    for layer in sorted(set(layers)):
        if spans and spans[-1][1] == layer - 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)


def parse_layers(text: str | None, known: Sequence[int] | None, *, option: str = "--layers") -> tuple[int, ...] | None:
    """`0-5,12` -> (0, 1, 2, 3, 4, 5, 12); `-1` is the last known layer. None, '' or 'all' -> every known layer
    (None when none are known). `known` is what the model or run holds (None: not known yet, e.g. a folder
    not yet read). A reversed range, a layer outside `known`, or `-1` with nothing known is an InputError."""
    if text is None or text.strip() in ("", "all"):
        return tuple(known) if known is not None else None
    have = sorted(set(known)) if known is not None else None
    where = f" (the layers here: {layers_text(have)})" if have else ""
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-1|\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match.group(1) == "-1" and match.group(2) is not None):
            raise InputError(f"cannot read {option} {text!r}: write layers like 0-5,12 (-1 is the last layer){where}")
        if match.group(1) == "-1":
            if not have:
                raise InputError(f"{option} -1 means the last layer, which is not known here: name the layer")
            lo = hi = have[-1]
        else:
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise InputError(f"{option} {part.strip()!r} is a reversed range: write it low-high, e.g. {hi}-{lo}")
        missing = [layer for layer in range(lo, hi + 1) if have is not None and layer not in have]
        if missing:
            raise InputError(f"{option} names layer {missing[0]}, which is not here{where}")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))
