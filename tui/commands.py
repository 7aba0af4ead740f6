"""The command palette (ctrl+p): go to a neuron by typing `L12/N3071` (or `12/3071`, `L12N3071`, `12:3071`, `12 3071`)."""

from __future__ import annotations

from functools import partial
from typing import Any

from rich.text import Text
from textual.command import DiscoveryHit, Hit, Hits, Provider

from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId


def parse_neuron_text(text: str) -> NeuronId | None:
    """A neuron in any form NeuronId.parse reads (`L12/N3071`, `12/3071`, `12 3071`, ...); None for anything else."""
    try:
        return NeuronId.parse(text)
    except InputError:
        return None


class NeuronCommands(Provider):
    """Opens the neuron the query names, if the run has it."""

    async def discover(self) -> Hits:
        yield DiscoveryHit("Go to a neuron…", self._hint, help="type its layer and index, e.g. L3/N71 or 3/71")

    async def search(self, query: str) -> Hits:
        app: Any = self.app
        target = parse_neuron_text(query)
        if target is None:
            if "go to a neuron".startswith(query.strip().lower()):
                yield Hit(0.5, "Go to a neuron…", self._hint, help="type its layer and index, e.g. L3/N71")
            return
        layer, neuron = target
        name = str(target)
        if app.has_neuron(layer, neuron):
            yield Hit(1.0, Text(f"Open {name}"), partial(app.open_neuron, layer, neuron), text=f"Open {name}",
                      help="its statistics, explanations and excerpts")
        else:
            yield Hit(0.1, Text(f"{name} is not in this run ({app.layers_text})"), self._hint,
                      text=f"{name} is not in this run")

    def _hint(self) -> None:
        self.app.notify("type a neuron into the command palette (ctrl+p), e.g. L3/N71 or 3/71")
