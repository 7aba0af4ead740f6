"""The app closes its store while another process writes it (a mixin of neuronscope.tui.app.NeuronscopeApp): a
job in another process folding its spool into the store (a second or so), or a collection writing its run (minutes
on a large model). The table pauses, a notice names the writer, and the store opens again, in a timer of the UI
thread, once the write is over; the person may quit meanwhile. The app's own jobs pause first, each once the
neurons it is on have landed (as jobs in other processes do), and go on after the write. The app stays closed while
the request stands, as a lock that prefers its writers does (an app that came back after a while could keep the
writer waiting for ever)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Static

from neuronscope.core.store.runs import named_process
from neuronscope.tui.screens.modals import MODAL_CSS
from neuronscope.tui.screens.neuron import wait_for_readers

#: How often the app, its store closed, looks whether it may open it again.
ASIDE_POLL_SECONDS = 0.2
#: The one action the app takes while its store is closed (every other waits until the store is back).
WITHOUT_STORE = {"quit"}


class AsideScreen(ModalScreen[None]):
    """What the app waits for while its store is closed: who writes it, and that q quits meanwhile."""

    DEFAULT_CSS = MODAL_CSS.format(name="AsideScreen").replace("$error", "$primary")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q", "app.quit", "Quit")]

    def __init__(self, store_name: str, line: str) -> None:
        super().__init__()
        self.store_name, self.line = store_name, line

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"{self.store_name} is being written by another process"), classes="modal-title")
            yield Static(Text(self.line), id="writer")
            yield Static("the table comes back when the write is over   q: quit", classes="modal-keys")

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
    later: list[Callable[[], object]] = field(default_factory=list)


class StoreAside:
    """`_step_aside_if_asked` (the spool's tick) and what follows; the app provides the rest."""

    store: Any
    table: Any
    jobs: Any
    run_info: Any
    _spool_seen: int
    _marks_timer: Timer | None
    set_interval: Any
    push_screen: Any
    notify: Any
    _reload_spooled: Any
    _save_marks: Any
    _aside: Aside | None = None
    _told_of_run = 0  # the newest run the app said was written meanwhile

    def when_back(self, what: str, action: Callable[[], object]) -> bool:
        """Whether the store is closed for another process's write; then `action` (`what` it does, in words) waits
        until the store is back (a confirmation answered in the moment the app stepped aside)."""
        if self._aside is None:
            return False
        self._aside.later.append(action)
        self.notify(f"{what} once the store is back", markup=False)
        return True

    @property
    def aside(self) -> bool:
        """Whether the store is closed for another process's write (only quitting works meanwhile)."""
        return self._aside is not None

    def _step_aside_if_asked(self) -> bool:
        """Close the store when another process asks for it (Spool.ask_fold) and the app's jobs have paused for it
        (they see the request too); whether it is closed now."""
        if self._aside is not None:
            return True
        asker = self.store.fold_asked()
        if asker is None:
            return False
        with self.store.turn:  # (a paused job's cursor comes back only while the store is open)
            if not all(handle.paused for handle in self.jobs.running):
                return False
            if self._marks_timer is not None:  # marks of the last second: saved before the store closes
                self._marks_timer.stop()
                self._save_marks()
            wait_for_readers()  # neurons being read hold cursors of the store's connection
            paused = ExitStack()
            paused.enter_context(self.table.paused())  # reads of the table wait (in their workers) until it is back
            self.store.close_shared()
        screen = AsideScreen(self.store.path.name, self._asking(asker))
        self.push_screen(screen)
        self._aside = Aside(paused, self.set_interval(ASIDE_POLL_SECONDS, self._come_back), screen)
        return True

    def _asking(self, asker: int) -> str:
        """Who asked for the store, and whom it still waits for (another process that has not closed it)."""
        waits_for = self.store.fold_waits_for()
        others = f"; it waits for {named_process(waits_for)} to close it" if waits_for not in (None, os.getpid()) \
            else ""
        return f"{named_process(asker)} asked for it{others}"

    def _come_back(self) -> None:
        """Open the store again once the request is over and no process writes the store; meanwhile name the one
        that asked (and whom it waits for), or the one that writes."""
        aside = self._aside
        if aside is None:
            return
        asker = self.store.fold_asked()
        if asker is not None:
            aside.screen.say(self._asking(asker))
            return
        writer = self.store.open_shared()
        if writer is not None:
            aside.screen.say(f"{named_process(writer)} is writing it")
            return
        self._end_aside()
        self._spool_seen = -1  # the store was opened again: draw it again
        self._reload_spooled()
        self._tell_of_new_run()
        for action in aside.later:
            action()

    def _tell_of_new_run(self) -> None:
        """A collection that wrote the store meanwhile made a newer run than the one shown: say so, once."""
        from neuronscope.core.store.schema import StoreError

        try:
            newest = self.store.run().run_id
        except StoreError:
            return
        if newest > max(self.run_info.run_id, self._told_of_run):
            self._told_of_run = newest
            self.notify(f"run {newest} was written into {self.store.path.name} meanwhile; this table shows run "
                        f"{self.run_info.run_id}: quit and open the app again to browse run {newest}", timeout=30,
                        markup=False)

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
