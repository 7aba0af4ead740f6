"""The triage loop off the UI thread (issue 19): opening a neuron from the table and stepping to the next or previous
one (`]`, `[`), sorting, filtering, searching and paging read the store only in workers, the neighbours are read
ahead, the rows shown stay until the new ones are read, and the screen follows the table's order and filter. The real-terminal benchmark's harness runs in CI on a small store (bench/tui.py --terminal)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from app_helpers import SIZE, settled, shown, sync, table_lines, until
from conftest import cli_env

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.screens.neuron import NeuronScreen
from neuronscope.tui.widgets import table_reads
from neuronscope.tui.widgets.neuron_table import HEADER_LINES, NeuronTable

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
#: The Store methods a neuron's screen and the table read through.
READS = ("neuron_stats", "records", "explanations", "related", "tags", "neuron_rows", "neuron_count",
         "neuron_position", "list_neurons", "saved_lists")


class Reads:
    """Every read of the store while `on` is set: (method, thread name)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.on = threading.Event()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """A spy on the Store's reads: each method still runs, and its thread is recorded."""
    log = Reads()

    def spy(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            if log.on.is_set():
                log.seen.append((name, threading.current_thread().name))
            return method(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(Store, name, spy(name, getattr(Store, name)))
    return log


@sync
async def test_opening_and_stepping_read_the_store_only_in_workers(scored_store: Path,
                                                                   reads: Reads) -> None:
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        table.set_query(BrowseQuery(order="score", descending=True))
        await pilot.pause()
        order = [NeuronId(table.row(i).layer, table.row(i).neuron) for i in range(4)]  # type: ignore[union-attr]
        reads.on.set()
        await pilot.press("enter")
        await shown(pilot)
        screen = app.screen
        assert isinstance(screen, NeuronScreen) and screen.position == order[0]
        # The neighbours were read ahead: `]` shows the next neuron of the table's order at once.
        await until(pilot, lambda: order[1] in screen._cache)
        await pilot.press("right_square_bracket")
        assert screen.ready and screen.position == order[1] and table.cursor == 1
        await pilot.press("right_square_bracket", "right_square_bracket")
        await shown(pilot)
        assert screen.position == order[3]
        await pilot.press("left_square_bracket")
        await shown(pilot)
        assert screen.position == order[2] and table.cursor == 2
        reads.on.clear()
        on_ui = [name for name, thread in reads.seen if thread == threading.main_thread().name]
        assert reads.seen and not on_ui, on_ui
        # At the first row, `[` stays (and says so).
        table.cursor = 0
        await pilot.press("escape", "enter")
        await shown(pilot)
        await pilot.press("left_square_bracket")
        await pilot.pause()
        assert app.screen.position == order[0]  # type: ignore[attr-defined]


@sync
async def test_sorts_filters_searches_and_pages_read_the_store_only_in_workers(scored_store: Path, reads: Reads,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_reads, "PAGE", 8)  # pages of 8 rows: paging down crosses pages not yet read
    gate = threading.Event()
    gate.set()
    count = Store.neuron_count

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return count(*args, **kwargs)

    monkeypatch.setattr(Store, "neuron_count", held)
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        with Store.open(scored_store, read_only=True) as store:
            run_id = app.run_info.run_id
            by_score = store.neuron_rows(run_id, BrowseQuery(order="score", descending=True), limit=1000)
            layers = store.neuron_rows(run_id, BrowseQuery(order="score", descending=True, layers=(1, 2)), limit=1000)
        shown_before = table_lines(table, 3)
        reads.on.set()
        # While the sort is read, the rows shown stay, and the status line says it is reading.
        gate.clear()
        await pilot.press("s")
        await pilot.pause(0.2)
        lines = table_lines(table, 3)
        assert lines[HEADER_LINES:] == shown_before[HEADER_LINES:] and "reading…" in lines[0]
        assert table.order == "layer" and table.wanted.order == "score"
        gate.set()
        await settled(pilot, table)
        assert table.order == "score" and table.current == by_score[0] and "reading…" not in table_lines(table, 0)[0]
        # Paging down through pages not yet read: the cursor lands on the row the order puts there.
        for _ in range(3):
            await pilot.press("pagedown")
            await settled(pilot, table)
        step = table.size.height - HEADER_LINES - 1
        assert table.cursor == 3 * step and table.current == by_score[3 * step]
        await pilot.press("end")
        await settled(pilot, table)
        last = str(NeuronId(by_score[-1].layer, by_score[-1].neuron))
        assert table.current == by_score[-1] and table_lines(table, step + 1)[-1].split()[0] == last
        # n finds the next neuron without an explanation; ] steps on across a page not yet read.
        await pilot.press("home")
        await settled(pilot, table)
        unexplained = next(i for i, row in enumerate(by_score) if i > 0 and not row.explanation)
        await pilot.press("n")
        await until(pilot, lambda: table.cursor == unexplained)
        await pilot.press("enter")
        await shown(pilot)
        for step in range(1, table_reads.PAGE + 1):
            await pilot.press("right_square_bracket")
            await until(pilot, lambda: table.cursor == unexplained + step)  # noqa: B023 - awaited within the step
            await shown(pilot)
        target = by_score[unexplained + table_reads.PAGE]
        assert app.screen.position == (target.layer, target.neuron)  # type: ignore[attr-defined]
        await pilot.press("backspace")
        await settled(pilot, table)
        await pilot.press("f", *"1..2", "enter")
        await settled(pilot, table)
        assert table.row_count == len(layers) and table.current == layers[0]
        word = next(row.explanation for row in layers if row.explanation).split()[1]  # within the filter
        await pilot.press("slash", *word, "enter")
        await settled(pilot, table)
        assert table.row_count >= 1 and all(word.lower() in table.row(i).explanation.lower()  # type: ignore[union-attr]
                                            for i in range(table.row_count))
        reads.on.clear()
        on_ui = [name for name, thread in reads.seen if thread == threading.main_thread().name]
        assert {"neuron_rows", "neuron_count"} <= {name for name, _ in reads.seen} and not on_ui, on_ui


@pytest.mark.parametrize("page", [2, 5])
@sync
async def test_paging_settles_when_a_screen_spans_more_pages_than_are_held(scored_store: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           page: int) -> None:
    """While a move waits for the rows at its target, the rows shown are painted and read ahead: the pages held grow
    with the screen, or pages landing for one evict the other's, which are read again without end (a flake of the
    test above, whose pages of 8 rows made a screen span four)."""
    monkeypatch.setattr(table_reads, "PAGE", page)
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        with Store.open(scored_store, read_only=True) as store:
            rows = store.neuron_rows(app.run_info.run_id, BrowseQuery(), limit=1000)
        assert table._visible_rows() // page + 1 > table_reads.PAGES_CACHED // 2  # two screens: more than the default
        step = table._visible_rows() - 1
        for key, cursor in (("pagedown", step), ("pagedown", 2 * step), ("end", len(rows) - 1), ("home", 0),
                            ("end", len(rows) - 1)):
            await pilot.press(key)
            await settled(pilot, table, seconds=15)
            assert table.cursor == cursor and table.current == rows[cursor]


@pytest.mark.terminal
def test_the_real_terminal_benchmark_runs(scored_store: Path, tmp_path: Path) -> None:
    """bench/tui.py --terminal drives `neuronscope browse` in tmux and times key to painted screen; here on the small
    scored store, a few repeats, asserting only that every operation was measured. Should it fail, the app's keys,
    reads and errors (Textual's log) come with the screen."""
    log = tmp_path / "textual.log"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tui.py"), "--terminal", "--store", str(scored_store),
                           "--repeat", "3"], capture_output=True, text=True, timeout=600,
                          env=cli_env(TEXTUAL_LOG=str(log)), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\nthe app's log:\n" + app_log(log)
    for operation in ("enter", "escape", "back ⌫", "next ]", "previous [", "sort s", "filter f", "search /", "page down"):
        assert f"terminal  {operation}" in proc.stdout, proc.stdout


def app_log(path: Path, lines: int = 60) -> str:
    """The last keys, table reads and errors of a Textual log (TEXTUAL_LOG), a line each (a key once, not once for
    each widget it passes)."""
    if not path.exists():
        return "(no log)"
    wanted = ("Key(key=", "_read_view", "_read_then", "ERROR", "Error", "cannot read")
    found: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.split(" >>> ")[0][:200]
        if any(w in line for w in wanted) and not line.startswith("<Worker") and (not found or found[-1] != line):
            found.append(line)
    return "\n".join(found[-lines:])


@sync
async def test_the_key_line_lists_the_keys_and_a_click_runs_one(scored_store: Path) -> None:
    from neuronscope.tui.widgets.keys import KeysLine

    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=(160, 30)) as pilot:
        keys = app.screen.query_one(KeysLine)
        line = keys.render().plain
        assert "s  Sort" in line and "f  Filter" in line and "palette" in line and "Next" not in line
        (start, _end, _node, _action), = [span for span in keys._spans if span[3] == "sort"]
        await pilot.click(KeysLine, offset=(start + 1, 0))
        await pilot.pause()
        assert app.query_one(NeuronTable).order == "score"
        await pilot.press("enter")
        await shown(pilot)
        neuron_keys = app.screen.query_one(KeysLine).render().plain
        assert "]  Next" in neuron_keys and "Sort" not in neuron_keys  # the neuron screen's own keys
