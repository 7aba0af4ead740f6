"""The app closes its store while another process writes it (a mixin of neuronscope.tui.app.NeuronscopeApp): a
job in another process folding its spool into the store (a second or so), or a collection writing its run (minutes
on a large model). The table pauses, a notice names the writer, and the store opens again, in a timer of the UI
thread, once the write is over; the person may quit meanwhile. The app steps aside only while none of its own jobs
runs (they need the store open): the writer then waits for them."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import LoadingIndicator, Static

from neuronscope.core.store.runs import named_process
from neuronscope.tui.screens.modals import MODAL_CSS
from neuronscope.tui.screens.neuron import wait_for_readers

#: The longest the app keeps the store closed for a process that asks for it but has not taken it (another process
#: keeps it from the store): the processes of other jobs finish the neurons they are on first (an LLM call or two).
#: Then the app opens it again, and does not step aside for that request again.
ASIDE_SECONDS = 30.0
#: How often the app, its store closed, looks whether it may open it again.
ASIDE_POLL_SECONDS = 0.2
#: The one action the app takes while its store is closed (every other waits until the store is back).
WITHOUT_STORE = {"quit"}


class AsideScreen(ModalScreen[None]):
    """What the app waits for while its store is closed: who writes it, and that q quits meanwhile."""

    DEFAULT_CSS = MODAL_CSS.format(name="AsideScreen").replace("$error", "$primary") + \
        "AsideScreen LoadingIndicator { height: 1; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q,escape", "app.quit", "Quit")]

    def __init__(self, store_name: str, line: str) -> None:
        super().__init__()
        self.store_name, self.line = store_name, line

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"{self.store_name} is being written by another process"), classes="modal-title")
            yield Static(Text(self.line), id="writer")
            yield LoadingIndicator()
            yield Static("the table comes back when the write is over   q: quit (jobs are not affected)",
                         classes="modal-keys")

    def say(self, line: str) -> None:
        if line != self.line and self.is_mounted:
            self.line = line
            self.query_one("#writer", Static).update(Text(line))


@dataclass
class Aside:
    """The store closed for another process's write: what to undo when it opens again."""

    paused: ExitStack
    timer: Timer
    screen: AsideScreen
    since: float


class StoreAside:
    """`_step_aside_if_asked` (the spool's tick) and what follows; the app provides the rest."""

    store: Any
    table: Any
    jobs: Any
    _spool_seen: int
    set_interval: Any
    push_screen: Any
    _reload_spooled: Any
    _aside: Aside | None = None
    _stepped_for: int | None = None  # the asker the app stepped aside for last: once per request

    @property
    def aside(self) -> bool:
        """Whether the store is closed for another process's write (only quitting and help work meanwhile)."""
        return self._aside is not None

    def _step_aside_if_asked(self) -> bool:
        """Close the store when another process asks for it (Spool.ask_fold) and none of the app's jobs runs; whether
        it is closed now."""
        if self._aside is not None:
            return True
        asker = self.store.fold_asked()
        if asker is None:
            self._stepped_for = None
        if asker is None or asker == self._stepped_for or self.jobs.running:
            return False
        self._stepped_for = asker
        wait_for_readers()  # neurons being read hold cursors of the store's connection
        paused = ExitStack()
        paused.enter_context(self.table.paused())  # reads of the table wait (in their workers) until it is back
        self.store.close_shared()
        screen = AsideScreen(self.store.path.name, f"{named_process(asker)} asked for it")
        self.push_screen(screen)
        self._aside = Aside(paused, self.set_interval(ASIDE_POLL_SECONDS, self._come_back), screen, time.monotonic())
        return True

    def _come_back(self) -> None:
        """Open the store again once the asker's write is over, or once it has waited ASIDE_SECONDS for a store that
        another process keeps from it; while a process writes the store, wait for it, named."""
        aside = self._aside
        if aside is None:
            return
        asker = self.store.fold_asked()
        if asker is not None and time.monotonic() - aside.since < ASIDE_SECONDS:
            return  # it has not taken the store yet: a read-only open now would keep it from it
        writer = self.store.open_shared()
        if writer is not None:
            aside.screen.say(f"{named_process(writer)} is writing it")
            return
        self._end_aside()
        self._spool_seen = -1  # the store was opened again: draw it again
        self._reload_spooled()

    def _end_aside(self, closing: bool = False) -> bool:
        """The table reads again and the notice goes; `closing`: the app closes (the pause ends, so that nothing
        waits on it, and the store opens again if it can); whether the store is open."""
        aside, self._aside = self._aside, None
        if aside is None:
            return True
        aside.timer.stop()
        aside.paused.close()
        if closing:
            return self.store.open_shared() is None
        if aside.screen.is_current:
            aside.screen.dismiss()
        return True
