"""Probe from the neuron screen (`t`): type a text, it runs through the run's model in a worker (torch is imported
there, the model loaded once per app), and the screen shows the neuron's activation on it and the units firing most
over the text, each of which enter opens."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, LoadingIndicator, OptionList, Static

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.ids import NeuronId
from neuronscope.tui.render import tokens_text, visible
from neuronscope.tui.screens.modals import MODAL_CSS
from neuronscope.tui.widgets.field import Field

#: Units listed for the whole text.
TOP = 15


class ProbeScreen(ModalScreen[NeuronId | None]):
    """A text box; on enter, the neuron's activations on the text and the text's top units (enter opens one)."""

    DEFAULT_CSS = MODAL_CSS.format(name="ProbeScreen").replace("$error", "$primary") + """
    ProbeScreen OptionList { height: auto; max-height: 16; }
    ProbeScreen LoadingIndicator { height: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, store: Any, run: Any, unit: NeuronId, options: dict[str, object]) -> None:
        super().__init__()
        self.store, self.run, self.unit, self.options = store, run, unit, options
        self.units: list[NeuronId] = []

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"Probe: a text through {visible(self.run.model)}, read by {self.unit}"),
                         classes="modal-title")
            yield Field(placeholder="type a text, enter runs it", id="probe-text")
            loading = LoadingIndicator()
            loading.display = False
            yield loading
            with VerticalScroll(can_focus=False):  # Tab goes from the text to the list, unless the text overflows
                yield Static("", id="probe-unit")
            yield OptionList(id="probe-units")
            yield Static("enter: run the text (in the list: open the unit)   escape: close", classes="modal-keys")

    def on_mount(self) -> None:
        self.query_one(OptionList).display = False
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value
        if not text.strip():
            return
        self.query_one(LoadingIndicator).display = True
        self.query_one("#probe-unit", Static).update(Text(f"running the text through {visible(self.run.model)}…"))
        self._probe(text)

    @work(thread=True, exclusive=True, group="probe", exit_on_error=False)
    def _probe(self, text: str) -> None:
        from neuronscope.core.models.probe import probe_text, top_over_text

        try:
            store = self.store.for_thread()
            try:
                maxima = store.maxima(self.run.run_id, self.run.layers, self.run.neurons_per_layer)
            finally:
                store.close()
            subject = _subject(self.app, self.run.model, self.options)
            coder = None
            if self.run.latents:
                from neuronscope.core.models.sparse import recorded

                coder = recorded(self.run.units)
            probe = probe_text(subject, text, self.run.layers, sparse=coder)
        except NeuronscopeError as exc:
            self.app.call_from_thread(self._failed, str(exc))
            return
        values = [float(v) for v in probe.unit(self.unit)]
        peak = float(maxima[self.run.layers.index(self.unit.layer), self.unit.neuron])
        self.app.call_from_thread(self._show, probe.tokens, values, peak, top_over_text(probe, maxima, TOP))

    def _failed(self, message: str) -> None:
        self.query_one(LoadingIndicator).display = False
        self.query_one("#probe-unit", Static).update(Text(message, style="bold red"))

    def _show(self, tokens: tuple[str, ...], values: list[float], peak: float, top: list[Any]) -> None:
        self.query_one(LoadingIndicator).display = False
        scale = peak if peak > 0 else max((abs(v) for v in values), default=0.0)
        best = max(range(len(values)), key=values.__getitem__)
        share = f"{values[best] / peak:.0%} of its corpus max" if peak > 0 else "its corpus max is not positive"
        head = Text(f"{self.unit}: peak {values[best]:+.3f} at '{visible(tokens[best])}' ({share})\n", style="bold")
        self.query_one("#probe-unit", Static).update(head + tokens_text(tokens, values, scale, best))
        self.units = [f.unit for f in top]
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options([Text(f"{f.unit}  peak {f.activation:+.3f} ({f.relative:.0%})  at '"
                                  f"{visible(tokens[f.position])}'") for f in top])
        options.display = bool(top)
        self.call_after_refresh(self._scrollable)

    def _scrollable(self) -> None:
        """The text's activations take a Tab stop (to scroll them by keys) only when they do not fit."""
        scroll = self.query_one(VerticalScroll)
        scroll.can_focus = scroll.max_scroll_y > 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.units[event.option_index])

    def action_close(self) -> None:
        self.dismiss(None)


def _subject(app: Any, model: str, options: dict[str, object]) -> Any:
    """The run's model, loaded once per app (from a worker thread)."""
    from neuronscope.core.models.loading import load_subject

    cached = getattr(app, "probe_subject", None)
    if cached is None or cached.name != model:
        dtype = options.get("dtype")
        cached = load_subject(model, device=options.get("device"), dtype=None if dtype in (None, "auto") else str(dtype))  # type: ignore[arg-type]
        app.probe_subject = cached
    return cached
