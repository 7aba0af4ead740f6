"""Python's full garbage collections, run when the person is not pressing keys.

A full collection scans every object the process tracks. In a browsing session that is the app's rendered neurons
and table pages (Textual keeps a handful of caches per rendered line): measured in a real terminal on the
307,200-neuron store, 44 full collections of 70-120 ms each during one run of bench/tui.py --terminal, each landing
on whatever key was being answered. Here the collector's automatic full collections are put off, and a timer runs
them once no key or mouse event came for IDLE_SECONDS; memory stays bounded because a collection that has been due
for MOST_DEFERRED times its usual interval runs anyway. What was loaded before the first screen is frozen
(`gc.freeze`): it lives as long as the app and is never scanned again. Both are undone when the app closes."""

from __future__ import annotations

import gc
import time

#: Seconds without input before a due full collection runs.
IDLE_SECONDS = 1.0
#: A full collection is put off for at most this many times its usual interval (CPython's third threshold).
MOST_DEFERRED = 10
#: How often the app looks whether one is due.
TICK_SECONDS = 0.25


class IdleCollector:
    """Start with `start()` once the app is shown, call `input()` on each key or mouse event and `tick()` every
    TICK_SECONDS, and `stop()` when the app closes."""

    def __init__(self) -> None:
        self._saved: tuple[int, int, int] | None = None
        self.last_input = time.monotonic()
        self.collections = 0
        """Full collections this collector ran."""

    def start(self) -> None:
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(self._saved[0], self._saved[1], 1 << 30)  # no automatic full collections

    def stop(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None

    def input(self) -> None:
        self.last_input = time.monotonic()

    def tick(self) -> None:
        """Run a full collection if one is due and the person is idle (or it has waited too long)."""
        if self._saved is None:
            return
        pending, usual = gc.get_count()[2], max(self._saved[2], 1)
        idle = time.monotonic() - self.last_input >= IDLE_SECONDS
        if pending >= usual and (idle or pending >= usual * MOST_DEFERRED):
            gc.collect()
            self.collections += 1
