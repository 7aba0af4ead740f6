"""The app's triage actions: tags and notes (`a`, `N`), the marks kept in the store as a list and named lists
(`L`); a mixin of neuronscope.tui.app.NeuronscopeApp, which it reads the store, the run and the table of."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import StoreError
from neuronscope.core.store.triage import MARKS_LIST
from neuronscope.tui.screens.neuron import NeuronScreen
from neuronscope.tui.screens.triage import ListsScreen, TagScreen

if TYPE_CHECKING:
    from textual.timer import Timer

#: Seconds after the last change of the marks before they are saved (as the list MARKS_LIST).
MARKS_SAVE_DELAY = 1.0


class TriageActions:
    """What NeuronscopeApp needs for these actions is declared here; the app provides it."""

    store: Any
    run_info: Any
    author: str
    table: Any
    screen: Any
    screen_stack: Any
    _table: Any
    _spool_seen: int
    _marks_timer: Timer | None
    when_back: Any
    set_timer: Any
    notify: Any
    push_screen: Any
    current_neuron: Any

    def _marks_changed(self) -> None:
        """Save the marks a moment after the last change (a run of m presses is one write)."""
        if self._marks_timer is not None:
            self._marks_timer.stop()
        self._marks_timer = self.set_timer(MARKS_SAVE_DELAY, self._save_marks)

    def _save_marks(self) -> None:
        if self._marks_timer is None:  # saved already: the app, closing, saved them before this timer's call came
            return
        self._marks_timer = None
        marked = sorted(self._table.marked)  # the table kept from on_mount: it is unmounted when the app saves last
        self._write(lambda: self.store.save_list(self.run_info.run_id, MARKS_LIST, marked, self.author))

    def _write(self, write: Callable[[], object]) -> bool:
        """Write a person's triage to the store (beside it, as jobs' results are); an error is a notification."""
        if self.when_back("it is saved", lambda: self._write(write)):
            return True
        try:
            write()
        except StoreError as exc:
            self.notify(f"not saved: {exc}", severity="error", markup=False)
            return False
        return True

    def _triage_scope(self) -> tuple[tuple[NeuronId, ...], str]:
        """The neuron shown, else the marked ones, else the one under the cursor; and those in words."""
        if isinstance(self.screen, NeuronScreen):
            return (self.screen.position,), str(self.screen.position)
        if self.table.marked:
            count = len(self.table.marked)
            return tuple(sorted(self.table.marked)), f"the {count} marked neuron{'s' if count != 1 else ''}"
        current = self.current_neuron()
        return ((current,), str(current)) if current else ((), "")

    def action_triage(self, kind: str) -> None:
        neurons, scope = self._triage_scope()
        if not neurons:
            return
        run_id = self.run_info.run_id
        current = sorted({t.tag for t in self.store.tags(run_id, neurons) if t.tag})

        def save(answer: tuple[str, str] | None) -> None:
            if answer is None:
                return
            action, text = answer
            if action == "untag":
                gone: list[int] = []
                if self._write(lambda: gone.append(self.store.remove_tags(run_id, neurons, text))):
                    self.notify(f"took {text!r} off {gone[0]} tagging{'s' if gone[0] != 1 else ''}", markup=False)
            elif not self._write(lambda: self.store.add_tags(run_id, neurons, text if action == "tag" else "",
                                                             text if action == "note" else "", self.author)):
                return
            self._triage_landed(set(neurons))

        self.push_screen(TagScreen(kind, scope, current), save)

    def _triage_landed(self, neurons: set[NeuronId]) -> None:
        self._spool_seen = self.store.shared.seq if self.store.shared is not None else 0  # drawn here, now
        self.table.reload()
        for screen in self.screen_stack:
            if isinstance(screen, NeuronScreen) and screen.position in neurons:
                screen.reload()

    def action_lists(self) -> None:
        run_id = self.run_info.run_id

        def chosen(answer: tuple[str, str] | None) -> None:
            if answer is None:
                return
            action, name = answer
            if action == "save":
                marked = sorted(self.table.marked)
                if not marked:
                    self.notify(f"nothing is marked, so {name!r} is not saved: mark neurons with m first",
                                severity="warning", markup=False)
                elif self._write(lambda: self.store.save_list(run_id, name, marked, self.author)):
                    self.notify(f"saved {len(marked)} marked neurons as {name!r} (neuronscope lists {name})",
                                markup=False)
                return
            listed = self.store.list_neurons(run_id, name) or []
            self.table.set_marks(set(listed))
            self._marks_changed()
            self.notify(f"marked the {len(listed)} neurons of {name!r}", markup=False)

        saved = [entry for entry in self.store.saved_lists(run_id) if entry[0] != MARKS_LIST]
        self.push_screen(ListsScreen(len(self.table.marked), saved), chosen)

