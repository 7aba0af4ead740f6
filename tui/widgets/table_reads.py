"""The neuron table's reads (a mixin of neuronscope.tui.widgets.neuron_table.NeuronTable): sorts, filters,
reloads, pages and a key's lookups are read in thread workers on the table's own cursor of the store, and handed
to the UI thread, which swaps them in at once. The rows shown stay until the new ones are read; what was asked
for later wins over what was asked for before."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import duckdb
from textual import work
from textual.cache import LRUCache
from textual.geometry import Size
from textual.timer import Timer
from textual.worker import get_current_worker

from neuronscope.core.results import NeuronRow
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.render import visible

#: Rows read at a time.
PAGE = 200
#: Pages held, at least (more when a screen spans more: `fit_pages`).
PAGES_CACHED = 8
#: Lines above the rows: what is shown (count, order, filters, marks), then the column names.
HEADER_LINES = 2
#: Seconds a sort, filter or reload may take before the status line says it is still reading.
READING_AFTER = 0.1
T = TypeVar("T")


class TableReads:
    """What NeuronTable needs for its reads is declared here; the table provides it."""

    cursor: Any
    scroll_offset: Any
    size: Any
    virtual_size: Any
    app: Any
    refresh: Any
    refresh_line: Any
    set_timer: Any
    notify: Any
    _deferred: int | None
    _visible_rows: Any
    _top_for: Any
    _move: Any

    def _start_reads(self, store: Any, run_id: int) -> None:
        """The reads' state, and the count and the first page before the first paint (on the table's cursor,
        which makes its browse table)."""
        self.store, self.run_id = store, run_id
        self.query_spec = BrowseQuery()
        """The order and filters of the rows shown."""
        self.wanted = self.query_spec
        """The newest order and filters asked for: the rows shown until its rows are read."""
        self._pages: LRUCache[int, list[NeuronRow]] = LRUCache(PAGES_CACHED)
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        self._closed = False
        self._asked = 0  # the newest view asked for (a sort, a filter, a reload); older ones landing are dropped
        self._view = 0  # the view shown: pages read for another one are dropped
        self._fetching: set[int] = set()  # pages of the shown view being read
        self._asked_top: int | None = None  # the first row of the view asked for (None: where the cursor is)
        self._asked_at = 0.0
        self._on_landed: list[Callable[[], None]] = []  # called once what was asked is shown (or failed)
        self._reading_timer: Timer | None = None
        self.row_count, first = self.read(lambda reader: (reader.neuron_count(self.run_id, self.query_spec),
                                                          reader.neuron_rows(self.run_id, self.query_spec, limit=PAGE)))
        self._pages[0] = first

    @property
    def reading(self) -> bool:
        """Whether the status line says the rows asked for are still being read (after READING_AFTER seconds)."""
        return self._asked != self._view and time.monotonic() - self._asked_at >= READING_AFTER

    @property
    def pending(self) -> bool:
        """Whether a sort, filter, reload or page is still being read."""
        return self._asked != self._view or bool(self._fetching) or self._deferred is not None

    def read(self, reading: Callable[[Any], T]) -> T:
        """`reading(store)` on the table's own cursor, here and now (the store's browse table is per cursor: the
        table's is made once). For what is rarely done; sorts, filters and pages are read in a worker."""
        with self._reader_lock:
            if self._reader is None:
                if self._closed:  # a worker that started as the app closed: no cursor of a closing store
                    raise duckdb.ConnectionException("the store is closed")
                self._reader = self.store.for_thread()
            try:
                return reading(self._reader)
            except duckdb.ConnectionException:  # the store was opened again since (a fold): a new cursor
                self._reader = self.store.for_thread()
                return reading(self._reader)

    def close_reader(self, final: bool = False) -> None:
        """Close the table's cursor once its query is done (before the store steps aside for a fold; the next read
        opens another), or for good (`final`: before the store closes)."""
        with self._reader_lock:
            self._closed = final
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
        deferred, self._deferred = self._deferred, None
        for number, page in pages.items():
            self._pages[number] = page
        self.virtual_size = Size(self.size.width, self.row_count + HEADER_LINES)
        self.cursor = self.cursor if top is None else top  # validated: the last row, or 0 when none is left
        if top is None and deferred is not None:  # a move asked for while the rows were read again
            self._move(deferred)
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
            view, query = self._view, self.query_spec
            self.read_then(lambda reader: reader.neuron_rows(self.run_id, query, offset=page_no * PAGE, limit=PAGE),
                           lambda page: self._page_read((view, page_no, page)))

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
        message = f"cannot read the neurons: {visible(str(err)).splitlines()[0]}"
        self.app.log.error(f"{message} ({type(err).__name__})")  # TEXTUAL_LOG keeps it after the note has gone
        self.notify(message, severity="error", markup=False)

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

    def fetch_row(self, index: int) -> None:
        """Read the page of a row in a worker, unless it is held or on its way."""
        self._fetch(index // PAGE)

    def warm_around(self, top: int) -> None:
        """Read, in a worker, the pages a screen above and below `top` that are not held, so that paging on (or
        stepping on from the neuron screen) finds them."""
        screen = self._visible_rows()
        for index in (top - screen, top + 2 * screen):
            if 0 <= index < self.row_count:
                self._fetch(index // PAGE)

    def fit_pages(self) -> None:
        """Hold at least the pages of two screens and the two read ahead: while a move waits for the rows in view
        at its target, the rows shown are painted and read ahead too. With fewer, the pages landing for one evict
        those of the other, which are read again, without end."""
        self._pages.grow(2 * (self._visible_rows() // PAGE + 2) + 2)

    def _in_view_held(self, cursor: int) -> bool:
        """Whether every row in view with the cursor at `cursor` is held; reads the pages that are not."""
        top = self._top_for(cursor)
        missing = {n for n in range(top // PAGE, min(top + self._visible_rows(), self.row_count) // PAGE + 1)
                   if n * PAGE < self.row_count and self._pages.get(n) is None}
        for page_no in missing:
            self._fetch(page_no)
        return not missing
