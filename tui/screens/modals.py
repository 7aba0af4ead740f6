"""Small modal screens: a message (errors, failed neurons), a yes/no question, and the help of every key."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from neuronscope.core.ids import NeuronId

MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{ width: 90%; max-width: 110; height: auto; max-height: 90%; border: thick $error 80%;
    background: $surface; padding: 0 1; }}
{name} .modal-title {{ text-style: bold; padding-bottom: 1; }}
{name} .modal-keys {{ color: $text-muted; padding-top: 1; }}
{name} VerticalScroll {{ height: auto; max-height: 20; }}
"""


class MessageScreen(ModalScreen[bool]):
    """A title, lines of untrusted text shown literally, and the keys that close it. With `question`, enter
    answers True and escape False; otherwise either closes it."""

    DEFAULT_CSS = MODAL_CSS.format(name="MessageScreen")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,y", "answer(True)", "OK", show=False),
        Binding("escape,n,q", "answer(False)", "Close", show=False),
    ]

    def __init__(self, title: str, lines: Sequence[Text | str], *, question: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.lines = [line if isinstance(line, Text) else Text(line) for line in lines]
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text), classes="modal-title")
            with VerticalScroll():
                for line in self.lines:
                    yield Static(line)
            keys = "enter: yes   escape: no" if self.question else "enter or escape: close"
            yield Static(keys, classes="modal-keys")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer if self.question else True)


class HelpScreen(ModalScreen[None]):
    """Every key of the app, grouped by where it works."""

    DEFAULT_CSS = MODAL_CSS.format(name="HelpScreen").replace("$error", "$primary")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def __init__(self, groups: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> None:
        super().__init__()
        self.groups = [(title, list(keys)) for title, keys in groups]

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for title, keys in self.groups:
            table.add_row(Text(title, style="bold underline"), "")
            for key, description in keys:
                table.add_row(key, description)
            table.add_row("", "")
        with Vertical():
            yield Static("neuronscope keys", classes="modal-title")
            with VerticalScroll():
                yield Static(table)
            yield Static("escape: close", classes="modal-keys")


class RelatedScreen(ModalScreen[NeuronId | None]):
    """A neuron's related neurons (upstream and downstream, through the weights) to pick one to open."""

    DEFAULT_CSS = MODAL_CSS.format(name="RelatedScreen").replace("$error", "$primary") + \
        "RelatedScreen OptionList { height: auto; max-height: 24; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,g", "close", "Close")]

    def __init__(self, title: str, neurons: Sequence[tuple[str, int, int, float]]) -> None:
        """neurons: (list label, layer, neuron, weight) each, as the store's related lists hold them."""
        super().__init__()
        self.title_text = title
        self.neurons = list(neurons)

    def compose(self) -> ComposeResult:
        from textual.widgets import OptionList

        with Vertical():
            yield Static(Text(self.title_text), classes="modal-title")
            yield OptionList(*(Text(f"{label:13} {NeuronId(layer, neuron)}  {weight:+.3g}")
                               for label, layer, neuron, weight in self.neurons))
            yield Static("enter: open   escape: close", classes="modal-keys")

    def on_option_list_option_selected(self, event: object) -> None:
        index = getattr(event, "option_index", 0)
        _, layer, neuron, _ = self.neurons[index]
        self.dismiss(NeuronId(layer, neuron))

    def action_close(self) -> None:
        self.dismiss(None)
