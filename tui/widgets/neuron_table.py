"""A virtual table of a run's neurons: rows are fetched from the store a page at a time as they scroll
into view (Textual's line API with Textual's LRU cache of pages), so a run of any size opens at once. Sorts,
filters, reloads and pages not held are read in a thread worker on the table's own cursor (table_reads.py): the
rows on screen stay until the new ones are read, and the UI thread never waits for a query on a key press."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from neuronscope.core.ids import NeuronId
from neuronscope.core.results import NeuronRow
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.render import fit, short_number, tag_style, visible
from neuronscope.tui.widgets.table_reads import HEADER_LINES, TableReads

__all__ = ["HEADER_LINES", "NeuronTable", "describe"]
#: Fixed column widths; the explanation takes what is left.
NEURON_W, SCORE_W, MAX_W, DENSITY_W = 11, 20, 7, 7


def describe(query: BrowseQuery) -> str:
    """The filters of a query in a few words, e.g. ` · L3..10 · score 0.3.. · explained · /dog`."""
    parts = []
    if query.layers is not None:
        parts.append(f"L{query.layers[0]}" if query.layers[0] == query.layers[1] else f"L{query.layers[0]}..{query.layers[1]}")
    if query.score is not None:
        low, high = ("" if abs(v) == float("inf") else f"{v:g}" for v in query.score)
        parts.append(f"score {low}..{high}")
    if query.explained is not None:
        parts.append("explained" if query.explained else "unexplained")
    if query.first_position is not None:
        parts.append("first-position only" if query.first_position else "no first-position")
    if query.tag:
        parts.append("tag:" + visible(query.tag))
    if query.search:
        parts.append("/" + visible(query.search))
    return "".join(f" · {p}" for p in parts)


class NeuronTable(TableReads, ScrollView, can_focus=True):
    """Every neuron of a run, one line each, with a cursor; enter posts `Selected`."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False, tooltip="previous neuron"),
        Binding("down,j", "cursor(1)", "Down", show=False, tooltip="next neuron"),
        Binding("pageup", "page(-1)", "Page up", show=False, tooltip="a screen up"),
        Binding("pagedown", "page(1)", "Page down", show=False, tooltip="a screen down"),
        Binding("home", "jump(0)", "First", show=False, tooltip="first row"),
        Binding("end", "jump(-1)", "Last", show=False, tooltip="last row"),
        Binding("enter", "select", "Open", tooltip="open the neuron under the cursor"),
    ]
    DEFAULT_CSS = """
    NeuronTable { height: 1fr; overflow-x: hidden; }
    """

    @dataclass
    class Selected(Message):
        """The user chose a neuron (enter)."""

        neuron: NeuronId

    cursor = reactive(0, repaint=False, always_update=True, init=False)
    """Position of the highlighted row in the current order: kept within the rows and scrolled into view (on every
    assignment, even of the same row, so that setting it brings it back after the view was scrolled away)."""

    def __init__(self, store: Any, run_id: int, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.marked: set[NeuronId] = set()
        self._deferred: int | None = None  # where the cursor goes once the rows there are read
        self._start_reads(store, run_id)

    # -- data ---------------------------------------------------------------------------------------
    @property
    def order(self) -> str:
        return self.query_spec.order

    @property
    def descending(self) -> bool:
        return self.query_spec.descending

    @property
    def search(self) -> str | None:
        return self.query_spec.search

    def on_mount(self) -> None:
        self.virtual_size = Size(self.size.width, self.row_count + HEADER_LINES)

    def set_marks(self, neurons: set[NeuronId]) -> None:
        """Mark exactly these neurons."""
        self.marked = set(neurons)
        self.refresh()

    def toggle_mark(self) -> None:
        """Mark or unmark the neuron under the cursor, then step down."""
        row = self.current
        if row is not None:
            self.marked.symmetric_difference_update({NeuronId(row.layer, row.neuron)})
            self.cursor += 1
            self.refresh()  # the mark and the status line's count of marks

    @property
    def cached_pages(self) -> int:
        """Pages held in memory now."""
        return len(self._pages)

    # -- rendering ----------------------------------------------------------------------------------
    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, self.row_count + HEADER_LINES)
        self.fit_pages()

    def _explanation_width(self) -> int:
        return max(self.scrollable_content_region.width - NEURON_W - SCORE_W - MAX_W - DENSITY_W - 4, 10)

    def _line(self, row: NeuronRow) -> Text:
        width = self._explanation_width()
        text = Text(no_wrap=True, overflow="ellipsis")
        neuron = NeuronId(row.layer, row.neuron)
        text.append("●" if neuron in self.marked else " ", style="bold")
        text.append(fit(str(neuron), NEURON_W - 1), style="bold")
        text.append(" ")
        for tag in row.tags:  # a person's verdicts before the model's words
            tag_text = visible(tag)
            if width > cell_len(tag_text) + 10:
                text.append(tag_text, style=tag_style(tag))
                text.append(" ")
                width -= cell_len(tag_text) + 1
        if row.noted:  # a note to read on its screen
            text.append("¶ ", style="bold")
            width -= 2
        if row.human:  # a person's own explanation is the chosen one
            text.append("✎ ", style="bold")
            width -= 2
        explanation = visible(row.explanation)
        text.append(fit(explanation, width) if row.explanation else fit("-", width), style="" if row.explanation else "dim")
        score = "-" if row.score is None else f"{row.score:+.2f} [{row.ci_low or 0:+.2f},{row.ci_high or 0:+.2f}]"
        text.append(" " + fit(score, SCORE_W, "right"))
        text.append(" " + fit(short_number(row.max_act, MAX_W), MAX_W, "right"))
        known = row.density == row.density  # NaN: unknown (an imported run's)
        text.append(" " + fit(f"{row.density:.1%}" if known else "-", DENSITY_W, "right"), style="" if known else "dim")
        return text

    def _status(self) -> Text:
        arrow = "↓" if self.descending else "↑"
        text = Text(no_wrap=True, overflow="ellipsis", style="bold")
        text.append(f"{self.row_count:,} neuron{'s' if self.row_count != 1 else ''}")
        text.append(describe(self.query_spec) + f" · by {self.order} {arrow}")
        if self.marked:
            text.append(f" · {len(self.marked):,} marked")
        if self.reading:
            text.append(" · reading…", style="dim")
        return text

    def _header(self) -> Text:
        width = self._explanation_width()
        cells = [fit(" neuron", NEURON_W), fit("explanation", width), fit("score [95% CI]", SCORE_W, "right"),
                 fit("max", MAX_W, "right"), fit("density", DENSITY_W, "right")]
        return Text(" ".join(cells), no_wrap=True, overflow="ellipsis", style="bold underline")

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y < HEADER_LINES:
            text = self._status() if y == 0 else self._header()
        else:
            index = int(self.scroll_offset.y) + y - HEADER_LINES
            row = self.cached_row(index)
            if y == HEADER_LINES:  # once per paint: the pages a screen up and down, read meanwhile
                self.warm_around(index)
            if row is None:
                if 0 <= index < self.row_count:
                    self.fetch_row(index)  # painted when it is read
                return Strip.blank(width, self.rich_style)
            text = self._line(row)
            if index == self.cursor:
                text.stylize(Style(reverse=True))
        segments = list(text.render(self.app.console, end=""))
        return Strip(segments).adjust_cell_length(width, self.rich_style).apply_style(self.rich_style) \
            if segments else Strip([Segment(" " * width, self.rich_style)])

    # -- cursor -------------------------------------------------------------------------------------
    def validate_cursor(self, index: int) -> int:
        return max(0, min(index, self.row_count - 1))

    def _visible_rows(self) -> int:
        return max(self.scrollable_content_region.height - HEADER_LINES, 1)

    def _top_for(self, cursor: int) -> int:
        """The first row in view once the cursor is at `cursor` (scrolled as little as brings it into view)."""
        top, rows = int(self.scroll_offset.y), self._visible_rows()
        return cursor if cursor < top else cursor - rows + 1 if cursor >= top + rows else top

    def watch_cursor(self, old: int, new: int) -> None:
        scrolled = self._top_for(new)
        if scrolled != int(self.scroll_offset.y):
            self.scroll_to(y=scrolled, animate=False)  # a scroll repaints every line
        self.refresh_line(old + HEADER_LINES)
        self.refresh_line(new + HEADER_LINES)

    def _move(self, target: int) -> None:
        """Move the cursor once the rows in view there are held: the rows shown stay until then."""
        target = self.validate_cursor(target)
        if self._in_view_held(target):
            self._deferred = None
            self.cursor = target
        else:
            self._deferred = target

    def action_cursor(self, step: int) -> None:
        self._move((self.cursor if self._deferred is None else self._deferred) + step)

    def action_page(self, direction: int) -> None:
        base = self.cursor if self._deferred is None else self._deferred
        self._move(base + direction * max(self._visible_rows() - 1, 1))

    def action_jump(self, where: int) -> None:
        self._move(self.row_count - 1 if where < 0 else 0)

    def move_to(self, index: int) -> None:
        """Put the cursor on a row, once the rows in view there are read."""
        self._move(index)

    def action_select(self) -> None:
        def chosen(row: NeuronRow) -> None:
            self.post_message(self.Selected(NeuronId(row.layer, row.neuron)))

        self.row_then(self.cursor, chosen)

    @property
    def current(self) -> NeuronRow | None:
        """The row under the cursor."""
        return self.row(self.cursor)
