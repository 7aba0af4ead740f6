"""The full-screen neuron browser: a run's neurons in a virtual table, sortable and searchable, each one
opening on its own screen. Opens the store read-only; imports no torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Input

from core.store import Store
from core.store.browse import BROWSE_ORDERS
from tui.screens.neuron import NeuronScreen
from tui.widgets.neuron_table import NeuronTable

#: Sort orders `s` cycles through, with the direction each reads best in.
SORTS = tuple((order, order != "layer") for order in BROWSE_ORDERS)


class NeuronscopeApp(App[None]):
    """Browse the newest complete run of a store. Opening fails with StoreError before the app starts."""

    TITLE = "neuronscope"
    CSS = """
    #search { dock: bottom; display: none; }
    #search.open { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "sort", "Sort", id="sort"),
        Binding("slash", "search", "Search", key_display="/", id="search"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, store_path: str | Path) -> None:
        super().__init__()
        self.store = Store.open(store_path, read_only=True)
        try:
            self.run_info = self.store.run()
        except BaseException:
            self.store.close()
            raise
        self.sort_index = 0
        self.sub_title = f"{self.store.path} · run {self.run_info.run_id} · {self.run_info.model}"

    def compose(self) -> ComposeResult:
        yield NeuronTable(self.store, self.run_info.run_id, id="neurons")
        yield Input(placeholder="search explanations (enter applies, escape clears)", id="search")
        yield Footer()

    @property
    def table(self) -> NeuronTable:
        return self.query_one(NeuronTable)

    def on_mount(self) -> None:
        self.table.focus()

    def on_unmount(self) -> None:
        self.store.close()

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        order, descending = SORTS[self.sort_index]
        self.table.set_query(replace(self.table.query_spec, order=order, descending=descending))

    def action_search(self) -> None:
        box = self.query_one("#search", Input)
        box.add_class("open")
        box.value = self.table.search or ""
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._close_search(event.value.strip() or None)

    def on_key(self, event: events.Key) -> None:
        if event.key == "escape" and self.query_one("#search", Input).has_focus:
            event.stop()
            self._close_search(None)

    def _close_search(self, search: str | None) -> None:
        box = self.query_one("#search", Input)
        box.remove_class("open")
        self.table.set_query(replace(self.table.query_spec, search=search))
        self.table.focus()

    def on_neuron_table_selected(self, message: NeuronTable.Selected) -> None:
        self.push_screen(NeuronScreen(self.store, self.run_info, message.layer, message.neuron))
