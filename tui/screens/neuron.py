"""One neuron: statistics, histogram, explanations with scores, and its excerpts coloured by activation.

Nothing here reads the store on the UI thread: a neuron's content is read and rendered (at the view's width) in a
thread worker on its own cursor, the previous neuron's content staying on screen until it is ready, and the
neighbours in the table's order are read ahead the same way while the person reads, so `]` and `[` usually find
their neuron already rendered."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import duckdb
from rich.console import Group, RenderableType
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.strip import Strip

from neuronscope.core.ids import NeuronId
from neuronscope.tui.render import (
    RELATED_LABELS,
    explanation_renderables,
    histogram_text,
    record_line,
    related_lines,
    scale_of,
    stats_table,
    tag_line,
    visible,
)
from neuronscope.tui.widgets.keys import KeysLine
from neuronscope.tui.widgets.lines import LinesView

#: Excerpts shown per kind (and per quantile bin).
COUNT = 5
#: Neurons kept rendered (the shown one, those read ahead, those seen last).
CACHED = 16
#: The threads reading neurons now: the app waits for them before it closes the store (their cursors are the
#: store's; Textual cancels a screen's workers when it goes, but a thread inside a query runs on).
READERS: set[threading.Thread] = set()


def wait_for_readers(timeout: float = 10.0) -> None:
    """Wait until no thread is reading a neuron (at most `timeout` seconds). A reader leaves the set as soon as its
    queries are done, before it hands its result to the UI thread, so the UI thread may wait here."""
    deadline = time.monotonic() + timeout
    while READERS and time.monotonic() < deadline:
        time.sleep(0.005)


@dataclass(frozen=True)
class Shown:
    """One neuron's content, read and rendered off the UI thread."""

    neuron: NeuronId
    parts: list[RenderableType]
    lines: list[Strip]
    width: int
    related: dict[str, list[tuple[int, int, float]]]
    chosen: str
    version: int


class NeuronScreen(Screen[None]):
    """Everything the store holds on one neuron of a run; escape goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", tooltip="back to the table"),
        Binding("backspace", "app.pop_screen", "Back", show=False,
                tooltip="back to the table at once (a terminal's escape key waits $ESCDELAY ms, 100 by default, for "
                        "the rest of a key sequence)"),
        Binding("g", "related", "Related", tooltip="go to a related neuron (upstream or downstream, by the weights)"),
        Binding("t", "probe", "Probe", tooltip="run a text of your own through the model: this neuron on it, and "
                                                "the units firing most"),
        Binding("w", "write", "Write", tooltip="write your own explanation (starting from the chosen one); it is "
                                                "scored in the background like any other"),
        Binding("right_square_bracket", "step(1)", "Next", key_display="]",
                tooltip="the next neuron in the table's order and filter"),
        Binding("left_square_bracket", "step(-1)", "Previous", key_display="[",
                tooltip="the previous neuron in the table's order and filter")]

    def __init__(self, store: Any, run: Any, layer: int, neuron: int) -> None:
        super().__init__()
        self.store = store
        self.run = run
        self.position = NeuronId(layer, neuron)
        """The neuron shown."""
        self.related: dict[str, list[tuple[int, int, float]]] = {}
        """The related neurons of the neuron shown."""
        self.chosen = ""
        """The chosen explanation of the neuron shown ('' if none)."""
        self.shown: NeuronId | None = None
        """The neuron whose content is on screen (it lags `position` while that one is read)."""
        self._cache: OrderedDict[NeuronId, Shown] = OrderedDict()
        self._loading: set[tuple[NeuronId, int, int]] = set()
        self._version = 0  # bumped when the store's content changed: older renderings are stale

    def compose(self) -> ComposeResult:
        yield LinesView([Text(f"{self.position} …", style="dim")], id="neuron-body")
        yield KeysLine()

    def on_mount(self) -> None:
        self.query_one(LinesView).focus()
        self.show(self.position)

    def on_resize(self) -> None:
        if self.shown is not None:
            self._request(self.position)  # rendered again at the new width

    # -- showing a neuron --------------------------------------------------------------------------
    def show(self, neuron: NeuronId) -> None:
        """Show a neuron: at once when it was read ahead, else once a worker has read it (the previous content
        stays meanwhile); once it is shown, its neighbours are read ahead."""
        self.position = neuron
        self._request(neuron)

    def read_ahead(self, neuron: NeuronId) -> None:
        """Read and render a neuron in a worker without showing it (the table's cursor rests on it)."""
        self._request(neuron, present=False)

    def reload(self) -> None:
        """Show what a job (or a person) just wrote: every rendering is stale; the neuron shown is read again."""
        self._version += 1
        self._cache.clear()
        self._request(self.position)

    @property
    def ready(self) -> bool:
        """Whether the neuron shown is the neuron asked for, at the current version (for tests and benchmarks)."""
        view = self._cache.get(self.position)
        return self.shown == self.position and view is not None and view.version == self._version

    def _request(self, neuron: NeuronId, present: bool = True) -> None:
        width = self.query_one(LinesView).scrollable_content_region.width
        view = self._cache.get(neuron)
        if view is not None and view.version == self._version and view.width == width:
            self._cache.move_to_end(neuron)
            if present:
                self._present(view)
            return
        if width <= 0:  # not laid out yet
            if present:
                self.call_after_refresh(self._request, neuron, present)
            return
        key = (neuron, self._version, width)
        if key not in self._loading:
            self._loading.add(key)
            self._read(neuron, self._version, width)

    @work(thread=True, group="neuron-read", exit_on_error=False)
    def _read(self, neuron: NeuronId, version: int, width: int) -> None:
        """Read and render one neuron on this worker's own cursor, then hand it to the UI thread."""
        READERS.add(threading.current_thread())
        reader = None
        try:
            reader = self.store.for_thread()
            parts, related, chosen = self._renderables(reader, neuron)
        except duckdb.Error:  # the store closed for another process's write meanwhile: the next show reads it again
            self._hand_over(self._loading.discard, (neuron, version, width))
            return
        except Exception as err:  # noqa: BLE001 - shown on the screen, not a screen that never changes
            parts, related, chosen = [Text(f"cannot show {neuron}: {type(err).__name__}: {visible(str(err))}")], {}, ""
        finally:
            if reader is not None:
                reader.close()
            READERS.discard(threading.current_thread())
        console = self.app.console
        lines = [Strip(line) for line in console.render_lines(Group(*parts), console.options.update_width(width),
                                                              pad=False)]
        self._hand_over(self._landed, Shown(neuron, parts, lines, width, related, chosen, version))

    def _hand_over(self, callback: Any, argument: Any) -> None:
        try:
            self.app.call_from_thread(callback, argument)
        except RuntimeError:  # the app is closing: nobody will look
            pass

    def _landed(self, view: Shown) -> None:
        self._loading.discard((view.neuron, view.version, view.width))
        if view.version != self._version:
            return
        self._cache[view.neuron] = view
        self._cache.move_to_end(view.neuron)
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        if view.neuron == self.position:
            self._present(view)

    def _present(self, view: Shown) -> None:
        lines = self.query_one(LinesView)
        moved, had_related = self.shown != view.neuron, bool(self.related)
        self.shown, self.related, self.chosen = view.neuron, view.related, view.chosen
        lines.show_lines(view.parts, view.lines, view.width)
        if moved:
            lines.scroll_home(animate=False)
            neighbours = getattr(self.app, "neighbours", None)  # read ahead while the person reads this one
            for other in neighbours(view.neuron) if neighbours is not None else ():
                self._request(other, present=False)
        if bool(view.related) != had_related:  # the footer's g: redrawing the footer costs a frame, so only then
            self.refresh_bindings()

    def _renderables(self, store: Any, position: NeuronId) -> tuple[list[RenderableType], dict[str, Any], str]:
        """Everything the screen shows of a neuron, as one stack of renderables (one widget: a neuron opens at
        once), with its related neurons and chosen explanation; read through `store` (a worker's cursor)."""
        run, (layer, neuron) = self.run, position
        stats = store.neuron_stats(run.run_id, layer, neuron)
        records = store.records(run.run_id, layer, neuron)
        explanations = store.explanations(run.run_id, layer, neuron)
        chosen_text = next((e.text for e in explanations if e.selected and e.role in ("candidate", "user")), "")
        scale = scale_of(records)
        title = Text(("latent " if run.latents else "") + str(position), style="bold")
        title.append(f"  ·  run {run.run_id}  ·  ")
        title.append(visible(run.model))
        parts: list[RenderableType] = [title]
        if run.latents:
            parts.append(Text(visible(run.units), style="dim"))
        parts += [tag_line(t) for t in store.tags(run.run_id, [position])]
        if stats is None:
            parts.append(Text(f"run {run.run_id} has no neuron {position}"))
        else:
            parts += [stats_table(stats, run.settings.quantiles), Text("histogram ", style="bold") + histogram_text(stats)]
        tokens, neurons = store.related(run.run_id, layer, neuron)
        related = related_lines(tokens, neurons)
        if related:
            parts += [Text(""), Text("Related tokens and neurons (g: go to one)" if neurons else
                                     "Related tokens", style="bold underline"), *related]
        if explanations:
            parts.append(Text(""))
            parts += [renderable for renderable, _one_line in explanation_renderables(explanations, records, scale, COUNT)]
        for kind, title_text, chosen in self._sections(records):
            if chosen:
                parts += [Text(""), Text(title_text, style="bold underline")]
                parts += [record_line(rec, scale, negative=kind == "bottom") for rec in chosen]
        return parts, neurons, chosen_text

    def action_step(self, step: int) -> None:
        stepper = getattr(self.app, "step_neuron", None)
        if stepper is not None:
            stepper(step)

    def action_related(self) -> None:
        from neuronscope.tui.screens.modals import RelatedScreen

        if not self.related:
            self.notify(f"{self.position} has no related neurons in the store: `neuronscope related` computes every "
                        "neuron's from the run's model weights (about a minute for SmolLM2)", severity="warning",
                        markup=False)
            return
        choices = [(RELATED_LABELS[name], layer, index, weight) for name in RELATED_LABELS
                   for layer, index, weight in self.related.get(name, [])]

        def chosen(target: NeuronId | None) -> None:
            if target is not None:
                self.app.open_neuron(*target)  # type: ignore[attr-defined]

        self.app.push_screen(RelatedScreen(f"Neurons related to {self.position} through the weights", choices),
                             chosen)

    def action_write(self) -> None:
        from neuronscope.tui.screens.triage import WriteScreen

        neuron = self.position

        def save(text: str | None) -> None:
            if text is not None:
                self.app.score_own(neuron, text)  # type: ignore[attr-defined]

        self.app.push_screen(WriteScreen(str(neuron), self.chosen), save)

    def action_probe(self) -> None:
        from neuronscope.tui.screens.probe import ProbeScreen

        def chosen(target: NeuronId | None) -> None:
            if target is not None:
                self.app.open_neuron(*target)  # type: ignore[attr-defined]

        options = getattr(self.app, "backend_options", {})
        self.app.push_screen(ProbeScreen(self.store, self.run, self.position, dict(options)), chosen)

    def _sections(self, records: list[Any]) -> list[tuple[str, str, list[Any]]]:
        quantiles = self.run.settings.quantiles
        sections = [("top", "Top excerpts", [r for r in records if r.kind == "top"][:COUNT])]
        for b in reversed(range(len(quantiles) - 1)):
            chosen = [r for r in records if r.kind == "quantile" and r.bin == b][:COUNT]
            sections.append(("quantile", f"Quantile bin [{quantiles[b]:g}, {quantiles[b + 1]:g}) of excerpt maxima",
                             chosen))
        sections.append(("random", "Random excerpts", [r for r in records if r.kind == "random"][:COUNT]))
        sections.append(("bottom", "Most negative excerpts", [r for r in records if r.kind == "bottom"][:COUNT]))
        return sections
