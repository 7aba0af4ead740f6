"""What the app's tests share: running Pilot tests without an async plugin, reading what the table and a
screen render, and waiting for the app's workers."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any

from textual.geometry import Region
from textual.screen import Screen
from textual.widgets import Static

from neuronscope.tui.widgets.lines import LinesView
from neuronscope.tui.widgets.neuron_table import HEADER_LINES, NeuronTable

SIZE = (100, 30)


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async Pilot test in its own event loop (no pytest async plugin needed)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


def table_lines(table: NeuronTable, rows: int = 4) -> list[str]:
    """The table's rendered lines as plain text: its status line, its column names, then `rows` rows."""
    return [strip.text for strip in table.render_lines(Region(0, 0, table.size.width, rows + HEADER_LINES))]


def screen_text(screen: Screen[Any]) -> str:
    """Every line a screen's widgets render, scrolled into view or not."""
    lines = [view.text for view in screen.query(LinesView)]
    for widget in screen.query(Static):
        lines += [strip.text for strip in widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))]
    return "\n".join(lines)


def on_screen(screen: Screen[Any]) -> list[str]:
    """The terminal's lines as they are drawn: what overlaps something else (two widgets docked to one edge) shows
    only once."""
    return [strip.text for strip in screen._compositor.render_strips()]


async def until(pilot: Any, condition: Callable[[], bool], seconds: float = 60) -> None:
    """Let the app run until `condition` holds (jobs run in threads; their messages need the loop)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.05)


async def shown(pilot: Any, seconds: float = 30) -> None:
    """Wait until the neuron screen on top shows the neuron it was asked for (read in a worker)."""
    await until(pilot, lambda: bool(getattr(pilot.app.screen, "ready", False)), seconds)


async def settled(pilot: Any, table: NeuronTable, seconds: float = 30) -> None:
    """Wait until the table shows what was asked of it last (a sort, filter, search or reload is read in a worker)
    and holds the pages it is reading."""
    await until(pilot, lambda: not table.pending, seconds)
