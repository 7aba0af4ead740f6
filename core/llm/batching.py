"""Coalescing of model work from concurrent callers into shared batches (the local backend's batcher).

A job runs many neurons at once, each in its own thread, and each asks the local model for small pieces of
work: a packed simulation prompt's forward pass, a greedy explanation. Run one by one, a GPU spends most of
its time waiting on launch overheads and a CPU decodes one token per step; run together they share the
weights' memory traffic. `Batcher` owns one worker thread per backend: callers `submit` rows (one sequence
each) and block on futures. The worker drains what is queued, lingering a moment while threads that used it
lately are not waiting yet (so callers arriving together join the same batch, and a lone caller never
waits); takes the oldest row's group; fills a batch of that group, longest rows first, up to a token budget
(rows x longest row, padding included); runs it; and hands every caller its rows' results or the batch's
exception. A row larger than the budget still runs, alone. Rows marked `alone` (seeded sampling, which must
not depend on its neighbours) always run by themselves. All model work of a backend happens on its worker
thread, so the model is never used by two threads at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from neuronscope.core.llm.base import LLMError

P = TypeVar("P")
R = TypeVar("R")

#: How long the worker waits for another row before it runs what it has (seconds): callers that start together
#: join one batch, a lone caller loses at most about this much.
LINGER = 0.002
#: The longest the worker lingers in all before a batch, however steadily rows keep arriving (seconds).
MAX_LINGER = 0.02


class BatcherClosed(LLMError):
    """Work submitted to (or left queued in) a closed batcher: the neuron fails, and the same command retries it."""


@dataclass
class _Row(Generic[P, R]):
    group: Hashable
    size: int
    payload: P
    alone: bool
    future: Future[R] = field(default_factory=Future)


@dataclass(frozen=True)
class BatchRecord:
    """One batch the worker ran."""

    group: Hashable
    """The rows' group."""
    rows: int
    """Rows in the batch."""
    width: int
    """The longest row's size."""

    @property
    def tokens(self) -> int:
        """Padded tokens: rows x longest row."""
        return self.rows * self.width


_STOP = object()


class Batcher(Generic[P, R]):
    """A worker thread that runs rows of the same group together, within a token budget.

    `run(group, payloads)` computes a batch and returns one result per payload, in order. `budget()` gives the
    most padded tokens per batch and `max_rows()` the most rows (0: no limit); both are read before every batch, so
    their owners may change them at any time.
    """

    def __init__(self, run: Callable[[Hashable, list[P]], Sequence[R]], *, budget: Callable[[], int],
                 max_rows: Callable[[], int] = lambda: 0, linger: float = LINGER, max_linger: float = MAX_LINGER,
                 name: str = "batcher", history: int = 1000) -> None:
        self._run = run
        self._budget = budget
        self._max_rows = max_rows
        #: Seconds the worker waits for another row before running a batch.
        self.linger = linger
        #: Seconds the worker lingers in all before a batch.
        self.max_linger = max_linger
        #: Callers the worker expects at once (0: as many threads as submitted in the last `recent` seconds). It
        #: lingers only while fewer callers than that are waiting, so a lone caller never waits for company.
        self.expected_callers = 0
        #: Seconds a thread counts as a caller after its last submission.
        self.recent = 5.0
        #: Seconds without work after which the worker thread ends (the next submission starts another).
        self.idle_exit = 30.0
        self._seen: dict[int, float] = {}
        self._waiting = 0
        self.name = name
        self._queue: queue.SimpleQueue[_Row[P, R] | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Batches run so far.
        self.batches_run = 0
        #: Rows run so far.
        self.rows_run = 0
        #: The most recent batches (at most `history`), oldest first: what tests and benchmarks inspect.
        self.history: list[BatchRecord] = []
        self._history_limit = history

    # -- callers ------------------------------------------------------------------------------------
    def submit(self, group: Hashable, rows: Sequence[tuple[int, P]], *, alone: bool = False) -> list[R]:
        """Run rows of (size in tokens, payload) in batches with other callers' rows of the same group and wait
        for their results, in order; the batch's exception is raised here when one fails. `alone` rows always
        run in a batch of their own."""
        if not rows:
            return []
        if self._thread is not None and threading.current_thread() is self._thread:
            return list(self._run(group, [p for _, p in rows]))  # work submitted from inside a batch: run it now
        items = [_Row[P, R](group, max(1, int(size)), payload, alone) for size, payload in rows]
        with self._lock:
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._seen[threading.get_ident()] = time.monotonic()
            self._waiting += 1
            for item in items:
                self._queue.put(item)
        try:
            return [item.future.result() for item in items]
        finally:
            with self._lock:
                self._waiting -= 1

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker after the batch it is running; rows still queued fail with BatcherClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(_STOP)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        pending: list[_Row[P, R]] = []
        batch: list[_Row[P, R]] = []
        try:
            while True:
                if not pending:
                    try:
                        item = self._queue.get(timeout=self.idle_exit)
                    except queue.Empty:
                        with self._lock:  # idle: end, so a backend nobody closes can still be freed
                            if self._queue.empty():
                                self._thread = None
                                return
                        continue
                    if item is _STOP:
                        break
                    pending.append(item)  # type: ignore[arg-type]
                if self._gather(pending):
                    break
                batch = self._choose(pending)
                chosen = {id(row) for row in batch}
                pending = [row for row in pending if id(row) not in chosen]
                self._execute(batch)
                batch = []
            # Stopped: what is left fails, so no caller waits forever.
            for row in pending + self._drain():
                _fail(row, BatcherClosed(f"{self.name} closed before this work ran"))
        except BaseException as err:  # the worker itself broke: fail everything instead of leaving callers hanging
            with self._lock:
                self._closed = True
            for row in batch + pending + self._drain():
                _fail(row, err)
            raise

    def _drain(self) -> list[_Row[P, R]]:
        """The rows still queued (the stop marker left out)."""
        rows: list[_Row[P, R]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows
            if item is not _STOP:
                rows.append(item)  # type: ignore[arg-type]

    def _gather(self, pending: list[_Row[P, R]]) -> bool:
        """Take queued rows, waiting up to `linger` for each next one (`max_linger` in all) until the head's group
        could fill a batch; True when asked to stop."""
        start = time.perf_counter()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self._full(pending) or not self._others_expected():
                    return False
                wait = min(self.linger, self.max_linger - (time.perf_counter() - start))
                if wait <= 0:
                    return False
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    return False
            if item is _STOP:
                return True
            pending.append(item)  # type: ignore[arg-type]

    def _others_expected(self) -> bool:
        """Whether callers that may join the next batch are not waiting yet: fewer are waiting than are expected
        (`expected_callers`, else the threads seen lately)."""
        with self._lock:
            cutoff = time.monotonic() - self.recent
            for ident in [i for i, seen in self._seen.items() if seen < cutoff]:
                del self._seen[ident]
            return self._waiting < (self.expected_callers or len(self._seen))

    def _full(self, pending: list[_Row[P, R]]) -> bool:
        """Whether the head's batch can take no more rows."""
        head = pending[0]
        if head.alone:
            return True
        rows = [r for r in pending if r.group == head.group and not r.alone]
        width = max(r.size for r in rows)
        limit = self._max_rows()
        return (limit > 0 and len(rows) >= limit) or len(rows) * width >= self._budget()

    def _choose(self, pending: list[_Row[P, R]]) -> list[_Row[P, R]]:
        """The oldest row, then rows of its group, longest first, while rows x longest row fits the budget."""
        head = pending[0]
        if head.alone:
            return [head]
        budget, limit = self._budget(), self._max_rows()
        batch, width = [head], head.size
        others = sorted((r for r in pending[1:] if r.group == head.group and not r.alone), key=lambda r: -r.size)
        for row in others:
            if limit > 0 and len(batch) >= limit:
                break
            wider = max(width, row.size)
            if (len(batch) + 1) * wider <= budget:
                batch.append(row)
                width = wider
        return batch

    def _execute(self, batch: list[_Row[P, R]]) -> None:
        try:
            results = list(self._run(batch[0].group, [row.payload for row in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: a batch of {len(batch)} rows gave {len(results)} results")
        except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
            for row in batch:
                row.future.set_exception(err)
            results = []
        else:
            for row, result in zip(batch, results):
                row.future.set_result(result)
        self.batches_run += 1
        self.rows_run += len(batch)
        self.history.append(BatchRecord(batch[0].group, len(batch), max(r.size for r in batch)))
        del self.history[:-self._history_limit]


def _fail(row: _Row[P, R], err: BaseException) -> None:
    if not row.future.done():
        row.future.set_exception(err)
