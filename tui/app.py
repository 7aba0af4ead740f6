"""The full-screen neuron browser: a run's neurons in a virtual table (sort, filter, search, marks), each
opening on its own screen, and explain/score jobs in background workers whose results land in the table as
they finish. Opens the store read-only (so CLI commands can read it meanwhile) and for writing only when the
first job starts; imports no torch until a job loads a model."""

from __future__ import annotations

import functools
import getpass
import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, cast

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Header, Input

from neuronscope.core.choices import ASCENDING
from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.engine import JobSettings
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BROWSE_ORDERS, BrowseQuery
from neuronscope.core.store.triage import MARKS_LIST
from neuronscope.tui.commands import NeuronCommands
from neuronscope.tui.idle_gc import TICK_SECONDS, IdleCollector
from neuronscope.tui.job_actions import JobActions
from neuronscope.tui.render import visible
from neuronscope.tui.screens.filter import FilterScreen
from neuronscope.tui.screens.modals import HelpScreen
from neuronscope.tui.screens.neuron import NeuronScreen, wait_for_readers
from neuronscope.tui.store_aside import WITHOUT_STORE, StoreAside
from neuronscope.tui.triage_actions import TriageActions
from neuronscope.tui.widgets.field import Field
from neuronscope.tui.widgets.jobs import JobsPanel
from neuronscope.tui.widgets.keys import KeysLine
from neuronscope.tui.widgets.neuron_table import NeuronTable

#: Sort orders `s` cycles through, with the direction each reads best in.
SORTS = tuple((order, order not in ASCENDING) for order in BROWSE_ORDERS)
#: `tag:WORD` in a search: the neurons tagged so.
TAG_SEARCH = re.compile(r"(?<!\S)tag:([\w-]+)", re.IGNORECASE)
#: Seconds between table reloads while results land.
RELOAD_INTERVAL = 0.25
#: How often the app looks for what jobs in other processes landed.
SPOOL_INTERVAL = 2.0
#: Seconds the table's cursor rests on a row before its neuron is read ahead (so that Enter shows it at once).
READ_AHEAD_AFTER = 0.05
#: Actions that act on the table, not offered on a neuron's screen.
TABLE_ACTIONS = {"sort", "filter", "search", "next_unexplained", "mark", "unmark_all", "lists"}


def while_running(tick: Callable[[NeuronscopeApp], None]) -> Callable[[NeuronscopeApp], None]:
    """A timer's callback that does nothing once the app is closing: a tick can come while its widgets are being
    removed and its store closed."""
    @functools.wraps(tick)
    def guarded(app: NeuronscopeApp) -> None:
        if app.is_running:
            tick(app)
    return guarded


class NeuronscopeApp(JobActions, TriageActions, StoreAside, App[None]):
    """Browse the newest complete run of a store. Opening fails with StoreError before the app starts."""

    TITLE = "neuronscope"
    COMMANDS = App.COMMANDS | {NeuronCommands}
    CSS = """
    #bottom { dock: bottom; height: auto; }
    #bottom > KeysLine { dock: none; }
    #search { display: none; }
    #search.open { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", key_display="?", id="help", tooltip="this list of keys"),
        Binding("s", "sort", "Sort", id="sort",
                tooltip="next order: neuron, score (highest first), max (largest first), density (sparsest first), "
                        "selectivity (most selective first)"),
        Binding("f", "filter", "Filter", id="filter", tooltip="layer range, score range, explained or not"),
        Binding("slash", "search", "Search", key_display="/", id="search",
                tooltip="find explanations containing a text (enter applies, escape clears)"),
        Binding("n", "next_unexplained", "Unexplained", id="next", tooltip="next neuron without an explanation"),
        Binding("r", "random", "Random", id="random", tooltip="open a random neuron of those shown"),
        Binding("m", "mark", "Mark", id="mark", tooltip="mark or unmark the neuron under the cursor and step to the "
                                                        "next (marks are kept in the store, as the list 'marked')"),
        Binding("M", "unmark_all", "Unmark all", id="unmark", show=False, tooltip="unmark every marked neuron"),
        Binding("a", "triage('tag')", "Tag", id="tag",
                tooltip="tag the marked neurons, else the one under the cursor or shown: good, wrong, unclear, "
                        "polysemantic or your own word (-TAG takes it off); the filter takes tag:WORD"),
        Binding("N", "triage('note')", "Note", id="note", show=False,
                tooltip="write a note on the marked neurons, else the one under the cursor or shown"),
        Binding("L", "lists", "Lists", id="lists", show=False,
                tooltip="save the marks as a named list, or load a saved list as the marks"),
        Binding("e", "job('run')", "Explain", id="explain",
                tooltip="explain and score in the background with the configured explainer and simulator"),
        Binding("x", "job('score')", "Score", id="score",
                tooltip="score the stored explanations again with the configured simulator"),
        Binding("c", "cancel", "Cancel", id="cancel", tooltip="stop the newest job before its next LLM call"),
        Binding("q", "quit", "Quit", id="quit", tooltip="quit (running jobs stop first and resume later)"),
    ]

    def __init__(self, store_path: str | Path, *, settings: JobSettings | None = None,
                 backend_options: dict[str, object] | None = None, start_job: int = 0,
                 concurrency: int | None = None, author: str | None = None) -> None:
        """`settings`: the backends and options of the app's jobs; `start_job`: explain and score this many of
        the most selective unexplained neurons as soon as the app opens (the demo); `concurrency`: the jobs' requests in
        flight (None: the engine's default)."""
        super().__init__()
        self.store = Store.open(store_path, read_only=True)
        try:
            self.run_info = self.store.run()
        except BaseException:
            self.store.close()
            raise
        self.settings = settings or JobSettings()
        self.backend_options = backend_options or {}
        self.concurrency = concurrency
        self.start_job = start_job
        self.author = author or getpass.getuser()
        self._marks_timer: Timer | None = None
        self._ahead_timer: Timer | None = None
        self.sort_index = 0
        self.quitting = False
        self.stopped_by: str | None = None
        """The signal that quit the app (SIGTERM or SIGHUP; JobActions.quit_on_signals), if one did."""
        self._signals_before: dict[int, Any] = {}
        self._dirty: set[NeuronId] = set()
        self._spool_seen = self.store.shared.seq if self.store.shared is not None else 0
        self.collector = IdleCollector()
        self.sub_title = f"{self.store.path.name} · run {self.run_info.run_id} · {visible(self.run_info.model)}"

    def compose(self) -> ComposeResult:
        yield Header()
        yield NeuronTable(self.store, self.run_info.run_id, id="neurons")
        with Vertical(id="bottom"):  # one dock: widgets docked to the same edge would overlap
            yield Field(placeholder="search explanations (enter applies, escape clears)", id="search")
            yield JobsPanel(id="jobs")
            yield KeysLine()

    @property
    def table(self) -> NeuronTable:
        return self.query_one(NeuronTable)

    @property
    def jobs(self) -> JobsPanel:
        return self.query_one(JobsPanel)

    def on_mount(self) -> None:
        self.quit_on_signals(True)
        self.call_after_refresh(self.collector.start)  # full garbage collections while no key is pressed
        self.set_interval(TICK_SECONDS, self.collector.tick)
        self._table = self.table
        self.table.focus()
        self.watch(self.table, "cursor", self._cursor_moved, init=False)
        marks = self.store.list_neurons(self.run_info.run_id, MARKS_LIST)
        if marks:
            self.table.set_marks(set(marks))
        self.set_interval(RELOAD_INTERVAL, self._reload_landed)
        self.set_interval(SPOOL_INTERVAL, self._reload_spooled)
        if self.start_job:
            # The job takes the most selective neurons: show them first, so their results land in view.
            self.sort_index = next(i for i, (order, _) in enumerate(SORTS) if order == "selectivity")
            self.table.set_query(BrowseQuery(order="selectivity", descending=True))
            neurons = self.store.choose_neurons(self.run_info.run_id, layers=None, order="selectivity", where=(),
                                                limit=self.start_job)
            self.start(self.settings, tuple(neurons), "most selective")

    def on_unmount(self) -> None:
        self.quit_on_signals(False)
        store_open = self._end_aside(closing=True)  # closed for another process's write: open again if it is over
        if self._marks_timer is not None:  # marks changed within the last second: saved before the store closes
            self._marks_timer.stop()
            if store_open:
                self._save_marks()
        wait_for_readers()  # neurons being read ahead hold cursors of the store's connection: they finish first
        self._table.close_reader(final=True)  # the table is gone from the DOM by now
        self.store.close()
        self.collector.stop()

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.Key, events.MouseEvent)):
            self.collector.input()
        if isinstance(event, events.Key) and not event.is_forwarded and await self._bound_at_once(event):
            return
        await super().on_event(event)

    async def _bound_at_once(self, event: events.Key) -> bool:
        """Run a key's binding as the key arrives, where no text field has the focus; whether one ran. Textual hands
        a key to the focused widget and runs its binding only once it has passed back up to the app, meanwhile handing
        on the keys after it: `/` and a word typed together (fast over SSH, or while the app was busy) gave the word's
        letters to the table, where `m` marked a neuron and `e` started an explain job. Bindings run here are found
        as Textual would find them (the priority ones, then from the focused widget up); the keys after one then go
        where it sent the focus (search moves it at once), or to the screen it opened. In a text field only Tab (and
        shift+Tab) runs here: it moves the focus to the next field before the letters after it are handed on."""
        if not self.screen.is_mounted:  # a screen mounting waits for the keys typed into it in its own queue
            return False
        if isinstance(self.focused, Input) and event.key not in ("tab", "shift+tab"):  # a field takes letters
            return False
        self.app_focus = True
        return await self._check_bindings(event.key, priority=True) or await self._check_bindings(event.key)

    # -- neurons ---------------------------------------------------------------------------------------
    @property
    def layers_text(self) -> str:
        layers = self.run_info.layers
        return f"layers {min(layers)}..{max(layers)}, neurons 0..{self.run_info.neurons_per_layer - 1}"

    def has_neuron(self, layer: int, neuron: int) -> bool:
        return layer in self.run_info.layers and 0 <= neuron < self.run_info.neurons_per_layer

    def open_neuron(self, layer: int, neuron: int, position: int | None = None) -> None:
        """Show a neuron's screen, with the table's cursor on it if the filters show it (`position`: where it is in
        the table, when the caller knows; else it is looked up)."""
        target = NeuronId(layer, neuron)
        if not self.has_neuron(layer, neuron):
            self.notify(f"run {self.run_info.run_id} has no {target}: {self.layers_text}", severity="error")
            return
        if position is None:  # looked up in a worker; the cursor follows when it is found
            query = self.table.query_spec
            self.table.read_then(lambda reader: reader.neuron_position(self.run_info.run_id, query, layer, neuron),
                                 self._cursor_on)
        else:
            self.table.cursor = position
        # One neuron screen, installed once and shown again with each neuron: opening skips Textual's
        # composing and styling of a new screen.
        if not self.is_screen_installed("neuron"):
            self.install_screen(NeuronScreen(self.store, self.run_info, layer, neuron), "neuron")
        screen = cast(NeuronScreen, self.get_screen("neuron"))
        while len(self.screen_stack) > 1 and self.screen is not screen:
            self.pop_screen()
        if screen.is_mounted:
            screen.show(target)  # at once if read ahead, else read in a worker (a job may have written since)
        else:
            screen.position = target  # shown when mounted
        if self.screen is not screen:
            self.push_screen(screen)

    def _cursor_on(self, position: int | None) -> None:
        if position is not None:  # the filters show it
            self.table.cursor = position

    def on_neuron_table_selected(self, message: NeuronTable.Selected) -> None:
        self.open_neuron(message.neuron.layer, message.neuron.neuron, position=self.table.cursor)

    def step_neuron(self, step: int) -> None:
        """The next (or previous) neuron in the table's order and filter, on the neuron screen."""
        table = self.table
        index = table.cursor + step
        if not 0 <= index < table.row_count:
            self.notify("the last neuron shown" if step > 0 else "the first neuron shown")
            return
        table.row_then(index, lambda row: self.open_neuron(row.layer, row.neuron, position=index))  # held: read ahead
        table.warm_around(index)  # the table is not painted meanwhile: the pages ahead are read here

    def _cursor_moved(self) -> None:
        if self._ahead_timer is not None:
            self._ahead_timer.stop()
        self._ahead_timer = self.set_timer(READ_AHEAD_AFTER, self._read_ahead)

    @while_running
    def _read_ahead(self) -> None:
        """Read the neuron under the resting cursor ahead, once the neuron screen exists (its first opening lays it
        out), so that Enter finds it rendered."""
        self._ahead_timer = None
        if self.aside or not self.is_screen_installed("neuron") or isinstance(self.screen, NeuronScreen):
            return
        screen = cast(NeuronScreen, self.get_screen("neuron"))
        row = self.table.cached_row(self.table.cursor)
        if screen.is_mounted and row is not None:
            screen.read_ahead(NeuronId(row.layer, row.neuron))

    def neighbours(self, neuron: NeuronId) -> list[NeuronId]:
        """The two neurons after the table's cursor and the one before, where their rows are held: read ahead on the
        neuron screen."""
        table = self.table
        rows = (table.cached_row(table.cursor + 1), table.cached_row(table.cursor - 1),
                table.cached_row(table.cursor + 2))
        return [NeuronId(r.layer, r.neuron) for r in rows if r is not None and (r.layer, r.neuron) != neuron]

    def current_neuron(self) -> NeuronId | None:
        """The neuron on screen, or under the table's cursor."""
        if isinstance(self.screen, NeuronScreen):
            return self.screen.position
        row = self.table.current
        return NeuronId(row.layer, row.neuron) if row is not None else None

    # -- table actions -----------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.aside and action not in WITHOUT_STORE:
            return False
        on_table = not isinstance(self.screen, NeuronScreen)
        if action in TABLE_ACTIONS and not on_table:
            return False
        if action == "cancel":
            return True if any(h.running and not h.stop.is_set() for h in self.jobs.handles) else None
        if action in ("job", "random", "next_unexplained", "mark", "triage") and self.table.row_count == 0 and on_table:
            return None
        if action == "job" and self.quitting:
            return None
        return True

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        order, descending = SORTS[self.sort_index]
        self.table.set_query(replace(self.table.wanted, order=order, descending=descending))

    def action_filter(self) -> None:
        layers = self.run_info.layers

        self.push_screen(FilterScreen(self.table.wanted, (min(layers), max(layers)), self.table.set_query))

    def action_search(self) -> None:
        box = self.query_one("#search", Input)
        box.add_class("open")
        query = self.table.wanted
        box.value = " ".join(filter(None, [f"tag:{query.tag}" if query.tag else "", query.search or ""]))
        self.screen.set_focus(box)  # at once, not later (`focus`): the keys typed right after `/` go to the box

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            self._close_search(event.value.strip() or None)

    def on_key(self, event: events.Key) -> None:
        if event.key == "escape" and self.query_one("#search", Input).has_focus:
            event.stop()
            self._close_search(None)

    def _close_search(self, search: str | None) -> None:
        """Apply a search: `tag:WORD` takes the neurons tagged so, the rest is a text the explanation contains."""
        box = self.query_one("#search", Input)
        tag = None
        if search and TAG_SEARCH.search(search):
            tags = TAG_SEARCH.findall(search)
            tag, search = tags[-1], " ".join(TAG_SEARCH.sub(" ", search).split()) or None

        def close() -> None:  # once the rows found are read: the screen changes once
            box.remove_class("open")
            self.table.focus()

        self.table.set_query(replace(self.table.wanted, search=search, tag=tag), landed=close)

    def action_next_unexplained(self) -> None:
        table = self.table
        query, after = table.query_spec, table.cursor

        def found(position: int | None) -> None:
            if position is None:
                self.notify("every neuron shown is explained")
            else:
                table.move_to(position)

        table.read_then(lambda reader: reader.next_unexplained(self.run_info.run_id, query, after), found)

    def action_random(self) -> None:
        table = self.table
        if table.row_count:
            index = random.randrange(table.row_count)
            table.row_then(index, lambda row: self.open_neuron(row.layer, row.neuron, position=index))

    def action_mark(self) -> None:
        self.table.toggle_mark()
        self._marks_changed()

    def action_unmark_all(self) -> None:
        if self.table.marked:
            self.notify(f"unmarked {len(self.table.marked):,} neurons")
            self.table.set_marks(set())
            self._marks_changed()

    def action_help(self) -> None:
        def keys(bindings: list[BindingType]) -> list[tuple[str, str]]:
            return [(b.key_display or b.key, b.tooltip or b.description) for b in bindings if isinstance(b, Binding)]

        self.push_screen(HelpScreen([
            ("Everywhere", keys(self.BINDINGS) + [("ctrl+p", "command palette: go to a neuron, e.g. L3/N71")]),
            ("Neuron table", keys(NeuronTable.BINDINGS)
             + [("e / x", "act on the marked neurons, else the filtered rows, else the one under the cursor")]),
            ("Neuron screen", keys(NeuronScreen.BINDINGS) + [("e / x", "act on the neuron shown")]),
        ]))

    @while_running
    def _reload_spooled(self) -> None:
        """Show what jobs in other processes landed since the last look (they write beside the store); close the
        store while another process asks for it, to fold what they wrote into it or to write a collection
        (neuronscope.tui.store_aside)."""
        if self._step_aside_if_asked():
            return
        self.store.refresh()
        seen = self.store.shared.seq if self.store.shared is not None else 0
        if seen == self._spool_seen:
            return
        self._spool_seen = seen
        self.table.reload()
        for screen in self.screen_stack:
            if isinstance(screen, NeuronScreen):
                screen.reload()

    @while_running
    def _reload_landed(self) -> None:
        """Show the neurons that landed since the last tick (rate-limited, so fast backends stay smooth)."""
        if not self._dirty or self.aside:
            return
        landed, self._dirty = self._dirty, set()
        self.table.reload()
        for screen in self.screen_stack:
            if isinstance(screen, NeuronScreen) and screen.position in landed:
                screen.reload()
