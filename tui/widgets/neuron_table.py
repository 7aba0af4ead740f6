"""A virtual table of a run's neurons: rows are fetched from the store a page at a time as they scroll
into view (Textual's line API with Textual's LRU cache of pages), so a run of any size opens at once. Sorts,
filters, reloads and pages not held are read in a thread worker on the table's own cursor: the rows on screen stay
until the new ones are read, and the UI thread never waits for a query on a key press."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import duckdb
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import work
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer
from textual.worker import get_current_worker

from neuronscope.core.ids import NeuronId
from neuronscope.core.results import NeuronRow
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.render import short_number, tag_style, visible

PAGE = 200
PAGES_CACHED = 8
#: Fixed column widths; the explanation takes what is left.
NEURON_W, SCORE_W, MAX_W, DENSITY_W = 11, 20, 7, 7
#: Lines above the rows: what is shown (count, order, filters, marks), then the column names.
HEADER_LINES = 2
#: Seconds a sort, filter or reload may take before the status line says it is still reading.
READING_AFTER = 0.1
T = TypeVar("T")


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


def _cell(text: str, width: int, justify: str = "left") -> str:
    text = text[:width]
    return text.rjust(width) if justify == "right" else text.ljust(width)


class NeuronTable(ScrollView, can_focus=True):
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
        self.store = store
        self.run_id = run_id
        self.query_spec = BrowseQuery()
        """The order and filters of the rows shown."""
        self.wanted = self.query_spec
        """The newest order and filters asked for: the rows shown until its rows are read."""
        self._pages: LRUCache[int, list[NeuronRow]] = LRUCache(PAGES_CACHED)
        self.marked: set[NeuronId] = set()
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        self._asked = 0  # the newest view asked for (a sort, a filter, a reload); older ones landing are dropped
        self._view = 0  # the view shown: pages read for another one are dropped
        self._fetching: set[int] = set()  # pages of the shown view being read
        self._deferred: int | None = None  # where the cursor goes once the rows there are read
        self._asked_top: int | None = None  # the first row of the view asked for (None: where the cursor is)
        self._asked_at = 0.0
        self._on_landed: list[Callable[[], None]] = []  # called once what was asked is shown (or failed)
        self._reading_timer: Timer | None = None
        # The count and the first page before the first paint, on the table's cursor (which makes its browse table).
        self.row_count, first = self.read(lambda reader: (reader.neuron_count(self.run_id, self.query_spec),
                                                          reader.neuron_rows(self.run_id, self.query_spec, limit=PAGE)))
        self._pages[0] = first

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

    @property
    def pending(self) -> bool:
        """Whether a sort, filter, reload or page is still being read."""
        return self._asked != self._view or bool(self._fetching) or self._deferred is not None

    def read(self, reading: Callable[[Any], T]) -> T:
        """`reading(store)` on the table's own cursor, here and now (the store's browse table is per cursor: the
        table's is made once). For what is rarely done; sorts, filters and pages are read in a worker."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = self.store.for_thread()
            try:
                return reading(self._reader)
            except duckdb.ConnectionException:  # the store was opened again since (a fold): a new cursor
                self._reader = self.store.for_thread()
                return reading(self._reader)

    def close_reader(self) -> None:
        """Close the table's cursor once its query is done (before the store closes or steps aside for a fold); the
        next read opens another."""
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No reads of the table while the store is closed and opened again (`Store.step_aside`)."""
        self.close_reader()
        with self._reader_lock:
            yield

    def set_query(self, query: BrowseQuery, landed: Callable[[], None] | None = None) -> None:
        """Show another order or filter, from the top, once its first rows are read; then call `landed` (a form
        that asked closes then, so that the screen changes once)."""
        self.wanted = query
        if landed is not None:
            self._on_landed.append(landed)
        self._ask(query, top=0)

    def reload(self) -> None:
        """Count again and read the rows in view again (after a job wrote results); the cursor stays where it is."""
        self._ask(self.wanted, top=None)

    def _ask(self, query: BrowseQuery, top: int | None) -> None:
        if top is None and self._asked != self._view:
            top = self._asked_top  # a reload of a view still on its way opens where that view opens
        self._asked += 1
        self._asked_top, self._asked_at = top, time.monotonic()
        rows = (int(self.scroll_offset.y), self.cursor) if top is None else (top,)
        self._read_view(self._asked, query, top, tuple(sorted({max(r, 0) // PAGE for r in rows})))
        if self._reading_timer is not None:
            self._reading_timer.stop()
        self._reading_timer = self.set_timer(READING_AFTER, lambda: self.refresh_line(0))  # "reading…" if still so

    @work(thread=True, group="table-read", exit_on_error=False)
    def _read_view(self, asked: int, query: BrowseQuery, top: int | None, page_numbers: tuple[int, ...]) -> None:
        """Count a view's rows and read the pages it opens on, in a worker; the UI thread swaps them in at once."""
        def reading(reader: Any) -> tuple[int, dict[int, list[NeuronRow]]]:
            count = reader.neuron_count(self.run_id, query)
            return count, {n: reader.neuron_rows(self.run_id, query, offset=n * PAGE, limit=PAGE)
                           for n in page_numbers if n * PAGE < count}
        if asked != self._asked:  # a newer view was asked for before this one began
            return
        try:
            count, pages = self.read(reading)
        except duckdb.Error as err:
            self._hand_over(self._failed, err)
            return
        if not get_current_worker().is_cancelled:
            self._hand_over(self._view_read, (asked, query, top, count, pages))

    def _view_read(self, landed: tuple[int, BrowseQuery, int | None, int, dict[int, list[NeuronRow]]]) -> None:
        asked, query, top, count, pages = landed
        if asked != self._asked:
            return
        self._view = asked
        if self._reading_timer is not None:
            self._reading_timer.stop()
            self._reading_timer = None
        self.query_spec, self.row_count = query, count
        self._pages.clear()
        self._fetching.clear()
        self._deferred = None
        for number, page in pages.items():
            self._pages[number] = page
        self.virtual_size = Size(self.size.width, self.row_count + HEADER_LINES)
        self.cursor = self.cursor if top is None else top  # validated: the last row, or 0 when none is left
        self.refresh()
        self._call_landed()

    def _call_landed(self) -> None:
        callbacks, self._on_landed = self._on_landed, []
        for callback in callbacks:
            callback()

    def _fetch(self, page_no: int) -> None:
        """Read a page of the shown view in a worker, unless it is held or on its way."""
        if page_no not in self._fetching and self._pages.get(page_no) is None and 0 <= page_no * PAGE < self.row_count:
            self._fetching.add(page_no)
            self._read_page(self._view, self.query_spec, page_no)

    @work(thread=True, group="table-read", exit_on_error=False)
    def _read_page(self, view: int, query: BrowseQuery, page_no: int) -> None:
        try:
            page = self.read(lambda reader: reader.neuron_rows(self.run_id, query, offset=page_no * PAGE, limit=PAGE))
        except duckdb.Error as err:
            self._hand_over(self._failed, err)
            return
        self._hand_over(self._page_read, (view, page_no, page))

    def _page_read(self, landed: tuple[int, int, list[NeuronRow]]) -> None:
        view, page_no, page = landed
        if view != self._view:
            return
        self._fetching.discard(page_no)
        self._pages[page_no] = page
        if self._deferred is not None and self._in_view_held(self._deferred):
            target, self._deferred = self._deferred, None
            self.cursor = target
        self.refresh()

    def _failed(self, err: Exception) -> None:
        self._fetching.clear()
        self._deferred = None
        self._view = self._asked  # nothing more is coming for what was asked
        self._call_landed()
        self.notify(f"cannot read the neurons: {visible(str(err)).splitlines()[0]}", severity="error", markup=False)

    def read_then(self, reading: Callable[[Any], T], then: Callable[[T], None]) -> None:
        """`reading(store)` on the table's cursor in a worker, then `then(result)` on the UI thread (a key's lookup:
        a neuron's position, the next unexplained one)."""
        self._read_then(reading, then)

    @work(thread=True, group="table-read", exit_on_error=False)
    def _read_then(self, reading: Callable[[Any], T], then: Callable[[T], None]) -> None:
        try:
            result = self.read(reading)
        except duckdb.Error as err:
            self._hand_over(self._failed, err)
            return
        self._hand_over(then, result)

    def row_then(self, index: int, then: Callable[[NeuronRow], None]) -> None:
        """Call `then(row)` with the row at a position of the shown order: at once if its page is held, else once a
        worker has read it."""
        row = self.cached_row(index)
        if row is not None:
            then(row)
        elif 0 <= index < self.row_count:
            view, query, page_no = self._view, self.query_spec, index // PAGE

            def landed(page: list[NeuronRow]) -> None:
                if view == self._view:
                    self._pages[page_no] = page
                if index % PAGE < len(page):
                    then(page[index % PAGE])

            self.read_then(lambda reader: reader.neuron_rows(self.run_id, query, offset=page_no * PAGE, limit=PAGE),
                           landed)

    def _hand_over(self, callback: Callable[[Any], None], argument: Any) -> None:
        try:
            self.app.call_from_thread(callback, argument)
        except RuntimeError:  # the app is closing: nobody will look
            pass

    def on_mount(self) -> None:
        self.virtual_size = Size(self.size.width, self.row_count + HEADER_LINES)

    def row(self, index: int) -> NeuronRow | None:
        """The row at a position of the shown order, read now if its page is not held (on the calling thread: the app
        uses `row_then`)."""
        if not 0 <= index < self.row_count:
            return None
        page_no = index // PAGE
        page = self._pages.get(page_no)
        if page is None:
            query = self.query_spec
            page = self.read(lambda reader: reader.neuron_rows(self.run_id, query, offset=page_no * PAGE, limit=PAGE))
            self._pages[page_no] = page
        offset = index - page_no * PAGE
        return page[offset] if offset < len(page) else None

    def cached_row(self, index: int) -> NeuronRow | None:
        """The row at a position if its page is held (no store read), else None."""
        page = self._pages.get(index // PAGE) if 0 <= index < self.row_count else None
        offset = index % PAGE
        return page[offset] if page is not None and offset < len(page) else None

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

    def _explanation_width(self) -> int:
        return max(self.scrollable_content_region.width - NEURON_W - SCORE_W - MAX_W - DENSITY_W - 4, 10)

    def _line(self, row: NeuronRow) -> Text:
        width = self._explanation_width()
        text = Text(no_wrap=True, overflow="ellipsis")
        neuron = NeuronId(row.layer, row.neuron)
        text.append("●" if neuron in self.marked else " ", style="bold")
        text.append(_cell(str(neuron), NEURON_W - 1), style="bold")
        text.append(" ")
        for tag in row.tags:  # a person's verdicts before the model's words
            if width > len(tag) + 10:
                tag_text = visible(tag)
                text.append(tag_text, style=tag_style(tag))
                text.append(" ")
                width -= len(tag_text) + 1
        if row.noted:  # a note to read on its screen
            text.append("¶ ", style="bold")
            width -= 2
        if row.human:  # a person's own explanation is the chosen one
            text.append("✎ ", style="bold")
            width -= 2
        explanation = visible(row.explanation)
        if len(explanation) > width:
            explanation = explanation[: width - 1] + "…"
        text.append(_cell(explanation, width) if row.explanation else _cell("-", width), style="" if row.explanation else "dim")
        score = "-" if row.score is None else f"{row.score:+.2f} [{row.ci_low or 0:+.2f},{row.ci_high or 0:+.2f}]"
        text.append(" " + _cell(score, SCORE_W, "right"))
        text.append(" " + _cell(short_number(row.max_act, MAX_W), MAX_W, "right"))
        text.append(" " + _cell(f"{row.density:.1%}", DENSITY_W, "right"))
        return text

    def _status(self) -> Text:
        arrow = "↓" if self.descending else "↑"
        text = Text(no_wrap=True, overflow="ellipsis", style="bold")
        text.append(f"{self.row_count:,} neuron{'s' if self.row_count != 1 else ''}")
        text.append(describe(self.query_spec) + f" · by {self.order} {arrow}")
        if self.marked:
            text.append(f" · {len(self.marked)} marked")
        if self._asked != self._view and time.monotonic() - self._asked_at >= READING_AFTER:
            text.append(" · reading…", style="dim")
        return text

    def _header(self) -> Text:
        width = self._explanation_width()
        cells = [_cell(" neuron", NEURON_W), _cell("explanation", width), _cell("score [95% CI]", SCORE_W, "right"),
                 _cell("max", MAX_W, "right"), _cell("density", DENSITY_W, "right")]
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
                    self._fetch(index // PAGE)  # painted when it is read
                return Strip.blank(width, self.rich_style)
            text = self._line(row)
            if index == self.cursor:
                text.stylize(Style(reverse=True))
        segments = list(text.render(self.app.console, end=""))
        return Strip(segments).adjust_cell_length(width, self.rich_style).apply_style(self.rich_style) \
            if segments else Strip([Segment(" " * width, self.rich_style)])

    def warm_around(self, top: int) -> None:
        """Read, in a worker, the pages a screen above and below `top` that are not held, so that paging on (or
        stepping on from the neuron screen) finds them."""
        screen = self._visible_rows()
        for index in (top - screen, top + 2 * screen):
            if 0 <= index < self.row_count:
                self._fetch(index // PAGE)

    # -- cursor -------------------------------------------------------------------------------------
    def validate_cursor(self, index: int) -> int:
        return max(0, min(index, self.row_count - 1))

    def _visible_rows(self) -> int:
        return max(self.scrollable_content_region.height - HEADER_LINES, 1)

    def _top_for(self, cursor: int) -> int:
        """The first row in view once the cursor is at `cursor` (scrolled as little as brings it into view)."""
        top, rows = int(self.scroll_offset.y), self._visible_rows()
        return cursor if cursor < top else cursor - rows + 1 if cursor >= top + rows else top

    def _in_view_held(self, cursor: int) -> bool:
        """Whether every row in view with the cursor at `cursor` is held; reads the pages that are not."""
        top = self._top_for(cursor)
        missing = {n for n in range(top // PAGE, min(top + self._visible_rows(), self.row_count) // PAGE + 1)
                   if n * PAGE < self.row_count and self._pages.get(n) is None}
        for page_no in missing:
            self._fetch(page_no)
        return not missing

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
