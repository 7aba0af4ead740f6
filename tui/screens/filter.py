"""The filter form (`f`): a layer range, a score range, explained/unexplained, a tag and hiding first-position
neurons, applied to the table."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Input, Label, RadioButton, RadioSet, Static

from neuronscope.core.store.browse import BrowseQuery
from neuronscope.core.store.triage import tag_problem
from neuronscope.tui.widgets.field import Field

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
EXPLAINED = (("all neurons", None), ("explained", True), ("unexplained", False))


def parse_range(text: str, *, integer: bool) -> tuple[float, float] | None:
    """'3..10', '3-10' (integers), '0.2..', '..0.5', or one number: at least it for scores, exactly it for
    layers. '' means no condition. ValueError with a readable message otherwise."""
    text = text.strip()
    if not text:
        return None
    low_high = re.fullmatch(rf"({_NUMBER})?\s*\.\.\s*({_NUMBER})?", text)
    if integer and not low_high:
        low_high = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if low_high and (low_high.group(1) or low_high.group(2)):
        low = float(low_high.group(1)) if low_high.group(1) else float("-inf")
        high = float(low_high.group(2)) if low_high.group(2) else float("inf")
    elif re.fullmatch(_NUMBER, text):
        low = float(text)
        high = low if integer else float("inf")
    else:
        example = "3..10, 3-10 or 5" if integer else "0.3.., ..0.1, -0.2..0.5 or 0.3 (at least)"
        raise ValueError(f"cannot read {text!r}: write a range like {example}")
    if integer and any(v not in (float("inf"), float("-inf")) and v != int(v) for v in (low, high)):
        raise ValueError(f"layers are whole numbers, not {text!r}")
    if low > high:
        raise ValueError(f"{text!r} is empty: its lower end is above its upper end")
    return low, high


def _layer(value: int, last: int) -> int:
    """A layer as written, -1 being the last (`last`), -2 the one before it."""
    return last + 1 + value if value < 0 else value


def range_text(bounds: tuple[float, float] | None) -> str:
    """A range as the form shows it (the inverse of parse_range)."""
    if bounds is None:
        return ""
    low, high = bounds
    show = [("" if abs(v) == float("inf") else f"{v:g}") for v in (low, high)]
    return show[0] if low == high else f"{show[0]}..{show[1]}"


class FilterScreen(ModalScreen[None]):
    """Edit the table's filters; enter applies (wherever the focus is), escape leaves them as they were, ctrl+r
    clears the form."""

    DEFAULT_CSS = """
    FilterScreen { align: center middle; }
    FilterScreen > Vertical { width: 64; height: auto; border: thick $primary 80%; background: $surface; padding: 0 1; }
    FilterScreen Input { width: 100%; margin-bottom: 1; }
    FilterScreen RadioSet { width: 100%; margin-bottom: 1; }
    FilterScreen #filter-error { color: $error; height: auto; }
    FilterScreen .modal-keys { color: $text-muted; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "apply", "Apply", priority=True),
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+r", "clear", "Clear"),
    ]

    def __init__(self, query: BrowseQuery, layers: tuple[int, int],
                 apply: Callable[[BrowseQuery, Callable[[], None]], None]) -> None:
        super().__init__()
        self.query_spec = query
        self.layer_span = layers
        self.apply = apply
        """Shows the rows of a query, then calls its second argument: the form closes once they are read, so that
        the screen changes once."""

    def compose(self) -> ComposeResult:
        q = self.query_spec
        with Vertical():
            yield Static(Text("Filter neurons", style="bold"))
            yield Label(f"layers (the run has {self.layer_span[0]}..{self.layer_span[1]})")
            yield Field(range_text(q.layers and (float(q.layers[0]), float(q.layers[1]))),
                        placeholder="e.g. 3..10, 3-10 or 5; empty: all", id="layers",
                        compact=True)
            yield Label("headline score (Pearson r on the test split)")
            yield Field(range_text(q.score), placeholder="e.g. 0.3.. or -0.2..0.5; empty: any",
                        id="score", compact=True)
            yield Label("which neurons")
            with RadioSet(id="explained", compact=True):
                for label, value in EXPLAINED:
                    yield RadioButton(label, value=q.explained is value)
            yield Label("tagged (by anyone)")
            yield Field(q.tag or "", placeholder="e.g. wrong; empty: any", id="tag", compact=True)
            yield Checkbox("hide neurons that peak at the first position (artefacts)", q.first_position is False,
                           id="first-position", compact=True)
            yield Label("", id="filter-error")
            yield Static("enter: apply  escape: cancel  ctrl+r: clear  tab: next  space: choose", classes="modal-keys")

    def on_mount(self) -> None:
        self.query_one("#layers", Input).focus()

    def action_apply(self) -> None:
        """Enter, wherever the focus is. A priority binding runs as the key reaches the app, before the focused field
        has taken the keys typed just before it (they are on their way to it when keys come together): the form is
        read once it has."""
        if self.focused is not None:
            self.focused.call_later(self._apply)
        else:
            self._apply()

    def _apply(self) -> None:
        try:
            layers = parse_range(self.query_one("#layers", Input).value, integer=True)
            score = parse_range(self.query_one("#score", Input).value, integer=False)
            tag = self.query_one("#tag", Input).value.strip() or None
            if tag and tag_problem(tag):
                raise ValueError(tag_problem(tag))
        except ValueError as exc:
            self.query_one("#filter-error", Label).update(Text(str(exc)))
            return
        index = self.query_one(RadioSet).pressed_index
        explained = EXPLAINED[index][1] if index >= 0 else None
        span = None
        if layers is not None:
            first, last = self.layer_span
            # Open ends stop at the run's first and last layer; -1 is the last, as on the command line.
            span = (first if layers[0] == float("-inf") else _layer(int(layers[0]), last),
                    last if layers[1] == float("inf") else _layer(int(layers[1]), last))
            if span[0] > last or span[1] < first or span[0] > span[1]:
                self.query_one("#filter-error", Label).update(Text(
                    f"no layer of the run is in {range_text(layers)}: it has {first}..{last} (-1 is the last)"))
                return
        hide = self.query_one("#first-position", Checkbox).value
        self.apply(replace(self.query_spec, layers=span, score=score, explained=explained,
                           first_position=False if hide else None, tag=tag), self._close)

    def _close(self) -> None:
        if self.is_current:  # not closed meanwhile (escape)
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_clear(self) -> None:
        for box in self.query(Input):
            box.value = ""
        self.query(RadioButton).first().value = True
        self.query_one("#first-position", Checkbox).value = False
        self.query_one("#filter-error", Label).update("")
