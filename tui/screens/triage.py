"""The triage modals: a tag or a note for the current or marked neurons (`a`, `N`), named lists of marks (`L`), and
a person's own explanation of a neuron (`w`)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from neuronscope.core.store.triage import SUGGESTED_TAGS, TAG_PATTERN, tag_problem
from neuronscope.tui.render import visible
from neuronscope.tui.screens.modals import MODAL_CSS
from neuronscope.tui.widgets.field import Field

#: Digits that stand for the suggested tags in the tag modal (`1` enter: good; `-1` enter takes it off).
SHORTCUTS = {str(i): tag for i, tag in enumerate(SUGGESTED_TAGS, 1)}


class TagScreen(ModalScreen[tuple[str, str] | None]):
    """Ask for a tag (1-4 for a suggested one, `-TAG` takes one off) or a note: dismisses with
    ("tag" | "untag" | "note", text), or None on escape."""

    DEFAULT_CSS = MODAL_CSS.format(name="TagScreen").replace("$error", "$primary") + \
        "TagScreen Input { width: 100%; } TagScreen #triage-error { color: $error; height: auto; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, kind: str, scope: str, current: list[str]) -> None:
        """`kind`: 'tag' or 'note'; `scope`: what is tagged, in words; `current`: the tags it has now."""
        super().__init__()
        self.kind = kind
        self.scope = scope
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"{'Tag' if self.kind == 'tag' else 'Note on'} {self.scope}"), classes="modal-title")
            if self.kind == "tag":
                suggested = "  ".join(f"{i}: {tag}" for i, tag in enumerate(SUGGESTED_TAGS, 1))
                yield Label(Text(f"{suggested} (then enter), or type your own word; -TAG takes a tag off"))
                if self.current:
                    yield Label(Text("now: " + ", ".join(visible(t) for t in self.current), style="dim"))
                yield Field(placeholder="tag", id="triage-text", compact=True)
            else:
                yield Field(placeholder="a note (kept with your name and the time)", id="triage-text", compact=True)
            yield Label("", id="triage-error")
            yield Static("enter: save   escape: cancel", classes="modal-keys")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.dismiss(None)
            return
        if self.kind == "note":
            self.dismiss(("note", text))
            return
        action, tag = ("untag", text[1:].strip()) if text.startswith("-") else ("tag", text)
        if tag in SHORTCUTS:  # 1-4: a suggested tag (a tag of its own is a word, so a lone digit is free for this)
            tag = SHORTCUTS[tag]
        problem = tag_problem(tag)
        if problem:
            self.query_one("#triage-error", Label).update(Text(problem))
            return
        self.dismiss((action, tag))

    def action_cancel(self) -> None:
        self.dismiss(None)


class WriteScreen(ModalScreen[str | None]):
    """Write an explanation of a neuron, starting from the one chosen now: dismisses with the text (scored as a job),
    or None on escape or when nothing changed."""

    DEFAULT_CSS = MODAL_CSS.format(name="WriteScreen").replace("$error", "$primary") + "WriteScreen Input { width: 100%; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, neuron: str, chosen: str) -> None:
        super().__init__()
        self.neuron = neuron
        self.chosen = chosen

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"Your explanation of {self.neuron}"), classes="modal-title")
            yield Label(Text("It is stored as yours and scored in the background, as every explanation is, beside "
                             "its controls; the newest becomes the neuron's chosen one."))
            yield Field(self.chosen, placeholder="e.g. the word \"dog\" and other pets", id="write-text", compact=True)
            yield Static("enter: save and score   escape: cancel", classes="modal-keys")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = " ".join(event.value.split())
        self.dismiss(text if text and text != self.chosen else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ListsScreen(ModalScreen[tuple[str, str] | None]):
    """Save the marks as a named list, or load a saved list as the marks: dismisses with ("save" | "load", name), or
    None on escape."""

    DEFAULT_CSS = MODAL_CSS.format(name="ListsScreen").replace("$error", "$primary") + \
        "ListsScreen Input { width: 100%; } ListsScreen OptionList { height: auto; max-height: 12; } " \
        "ListsScreen #triage-error { color: $error; height: auto; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, marked: int, lists: list[tuple[str, int, str, str]]) -> None:
        super().__init__()
        self.marked = marked
        self.lists = lists

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text("Lists of neurons"), classes="modal-title")
            yield Label(Text(f"save the {self.marked} marked neuron{'s' if self.marked != 1 else ''} as:"))
            yield Field(placeholder="a name, e.g. dates-for-ada", id="list-name", compact=True)
            yield Label("", id="triage-error")
            if self.lists:
                yield Label(Text("or load one as the marks (tab, then enter):"))
                yield OptionList(*[Option(Text(f"{visible(name)}  ·  {count:,} neurons  ·  {visible(author)}, {when}"),
                                          id=f"list-{i}") for i, (name, count, author, when) in enumerate(self.lists)])
            yield Static("enter: save or load   tab: to the lists   escape: cancel", classes="modal-keys")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        problem = None if TAG_PATTERN.fullmatch(name) else \
            f"{name!r} is not a list name: use a word of letters, digits, - and _"
        if problem:
            self.query_one("#triage-error", Label).update(Text(problem))
            return
        self.dismiss(("save", name))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        index = int(str(event.option.id).removeprefix("list-"))
        self.dismiss(("load", self.lists[index][0]))

    def action_cancel(self) -> None:
        self.dismiss(None)
