"""The app's full garbage collections wait until no key was pressed for a moment (tui/idle_gc.py), run anyway once
long overdue, and the collector's settings are undone when the app closes."""

from __future__ import annotations

import gc
import time

from neuronscope.tui.idle_gc import IDLE_SECONDS, MOST_DEFERRED, IdleCollector


def _overdue(times: int) -> None:
    gc.collect()
    for _ in range(times):
        gc.collect(1)  # each collection of the younger generations counts towards the next full one


def test_full_collections_wait_for_idle_and_never_too_long() -> None:
    before = gc.get_threshold()
    collector = IdleCollector()
    collector.start()
    try:
        assert gc.get_threshold()[2] > before[2] * MOST_DEFERRED and gc.get_freeze_count() > 0
        _overdue(before[2])  # due, but keys are being pressed: put off
        collector.input()
        collector.tick()
        assert collector.collections == 0 and gc.get_count()[2] >= before[2]
        collector.last_input = time.monotonic() - IDLE_SECONDS  # idle now
        collector.tick()
        assert collector.collections == 1 and gc.get_count()[2] == 0
        _overdue(before[2] * MOST_DEFERRED)  # overdue ten times: it runs while keys come
        collector.input()
        collector.tick()
        assert collector.collections == 2
    finally:
        collector.stop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
