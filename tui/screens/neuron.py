"""One neuron: statistics, histogram, explanations with scores, and its excerpts coloured by activation."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer

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
from neuronscope.tui.widgets.lines import LinesView

#: Excerpts shown per kind (and per quantile bin).
COUNT = 5


class NeuronScreen(Screen[None]):
    """Everything the store holds on one neuron of a run; escape goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", tooltip="back to the table"),
        Binding("g", "related", "Related", tooltip="go to a related neuron (upstream or downstream, by the weights)"),
        Binding("t", "probe", "Probe", tooltip="run a text of your own through the model: this neuron on it, and "
                                                "the units firing most"),
        Binding("w", "write", "Write", tooltip="write your own explanation (starting from the chosen one); it is "
                                                "scored in the background like any other")]

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

    def compose(self) -> ComposeResult:
        yield LinesView(self._renderables(), id="neuron-body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LinesView).focus()

    def _renderables(self) -> list[RenderableType]:
        """Everything the screen shows, as one stack of renderables (one widget: a neuron opens at once)."""
        run, (layer, neuron) = self.run, self.position
        stats = self.store.neuron_stats(run.run_id, layer, neuron)
        records = self.store.records(run.run_id, layer, neuron)
        explanations = self.store.explanations(run.run_id, layer, neuron)
        self.chosen = next((e.text for e in explanations if e.selected and e.role in ("candidate", "user")), "")
        scale = scale_of(records)
        title = Text(("latent " if run.latents else "") + str(self.position), style="bold")
        title.append(f"  ·  run {run.run_id}  ·  ")
        title.append(visible(run.model))
        parts: list[RenderableType] = [title]
        if run.latents:
            parts.append(Text(visible(run.units), style="dim"))
        parts += [tag_line(t) for t in self.store.tags(run.run_id, [self.position])]
        if stats is None:
            parts.append(Text(f"run {run.run_id} has no neuron {self.position}"))
        else:
            parts += [stats_table(stats, run.settings.quantiles), Text("histogram ", style="bold") + histogram_text(stats)]
        tokens, self.related = self.store.related(run.run_id, layer, neuron)
        related = related_lines(tokens, self.related)
        if related:
            parts += [Text(""), Text("Related tokens and neurons (g: go to one)" if self.related else
                                     "Related tokens", style="bold underline"), *related]
        if explanations:
            parts.append(Text(""))
            parts += [renderable for renderable, _one_line in explanation_renderables(explanations, records, scale, COUNT)]
        for kind, title_text, chosen in self._sections(records):
            if chosen:
                parts += [Text(""), Text(title_text, style="bold underline")]
                parts += [record_line(rec, scale, negative=kind == "bottom") for rec in chosen]
        return parts

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return bool(self.related) if action == "related" else True

    def action_related(self) -> None:
        from neuronscope.tui.screens.modals import RelatedScreen

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

    def show(self, neuron: NeuronId) -> None:
        """Show another neuron on this screen (reusing it spares Textual a new screen's layout and styles)."""
        self.position = neuron
        view = self.query_one(LinesView)
        view.update(self._renderables())
        view.scroll_home(animate=False)
        self.refresh_bindings()

    def reload(self) -> None:
        """Show what a job just wrote for this neuron."""
        self.query_one(LinesView).update(self._renderables())

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
