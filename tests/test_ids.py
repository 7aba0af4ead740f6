"""One neuron address and one layer-range grammar, the same for every command, the palette and the job engine."""

from __future__ import annotations

import pytest

from neuronscope.core.errors import InputError, NeuronscopeError
from neuronscope.core.ids import NeuronId, layers_text, parse_layers
from neuronscope.tui.commands import parse_neuron_text


@pytest.mark.parametrize("text", ["12/345", "L12/N345", "l12/n345", "L12N345", "12:345", " 12 / 345 ", "12 345"])
def test_every_form_reads_the_same_neuron(text: str) -> None:
    assert NeuronId.parse(text) == NeuronId(12, 345) == (12, 345)
    assert parse_neuron_text(text) == NeuronId(12, 345)


@pytest.mark.parametrize("text", ["12345", "12/", "/345", "L12", "12/345/6", "x/y", "-2/3", "12/N", ""])
def test_bad_neuron_text_names_the_forms(text: str) -> None:
    with pytest.raises(InputError, match=r"write LAYER/INDEX, e\.g\. 12/345, L12/N345, L12N345 or 12:345"):
        NeuronId.parse(text)
    assert parse_neuron_text(text) is None


def test_layer_minus_one_is_the_last_of_the_layers_given() -> None:
    assert NeuronId.parse("-1/3", (0, 5, 2)) == NeuronId(5, 3) and NeuronId.parse("L-1/N3", range(12)) == (11, 3)
    with pytest.raises(InputError, match="layer -1 means the last layer, which is not known here"):
        NeuronId.parse("-1/3")


def test_a_neuron_prints_and_orders_as_one_address() -> None:
    assert str(NeuronId(3, 71)) == "L3/N71"
    layer, index = NeuronId(3, 71)
    assert (layer, index) == (3, 71)
    assert sorted([NeuronId(2, 9), NeuronId(1, 10)]) == [(1, 10), (2, 9)]


def test_layer_ranges() -> None:
    assert parse_layers(None, range(3)) == parse_layers("all", range(3)) == parse_layers("", range(3)) == (0, 1, 2)
    assert parse_layers(None, None) is None
    assert parse_layers("0-1,2", range(3)) == (0, 1, 2)
    assert parse_layers("2, 0", range(3)) == (0, 2)
    assert parse_layers("-1", range(30)) == (29,)
    assert parse_layers("-1", (3, 10, 17)) == (17,)  # the last layer a run holds
    assert parse_layers("5-7", None) == (5, 6, 7)  # nothing known yet: syntax and order are still checked
    assert layers_text((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8" and layers_text(()) == ""


@pytest.mark.parametrize(("text", "known", "message"), [
    ("10-3", range(30), r"--layers '10-3' is a reversed range: write it low-high, e\.g\. 3-10"),
    ("10-3", None, r"reversed range"),
    ("1-0", (0, 1), r"reversed range"),
    ("40", range(30), r"names layer 40, which is not here \(the layers here: 0-29\)"),
    ("4", (3, 10), r"names layer 4, which is not here \(the layers here: 3,10\)"),
    ("-1", None, r"-1 means the last layer, which is not known here: name the layer"),
    ("-2", range(30), r"cannot read --layers '-2': write layers like 0-5,12 \(-1 is the last layer\)"),
    ("x", range(3), r"cannot read --layers 'x'"),
    ("3-", range(30), r"cannot read --layers '3-'"),
])
def test_bad_layer_ranges_are_one_error(text: str, known: range | tuple[int, ...] | None, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        parse_layers(text, known)
    assert isinstance(caught.value, NeuronscopeError) and "\n" not in str(caught.value)
