"""The Textual neuron browser: the store's paged browse queries, and the app driven by Pilot on the tiny
model's store (table, cursor, sort, search, filters, marks, help, command palette, neuron screen, hostile
tokens), plus its import cost. Jobs from the app: tests/test_app_jobs.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from app_helpers import SIZE, screen_text, settled, shown, sync, table_lines, until
from conftest import MARKERS, assert_one_line_error, cli_env, copy_store, run_cli
from textual import events
from textual.widgets import Input, Label

from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.core.store.schema import StoreError
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.screens.filter import FilterScreen
from neuronscope.tui.screens.modals import HelpScreen
from neuronscope.tui.screens.neuron import NeuronScreen
from neuronscope.tui.widgets.neuron_table import NeuronTable

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")


# -- the store's browse queries ------------------------------------------------------------------------

def test_neuron_rows_and_count(scored_store: Path) -> None:
    with Store.open(scored_store, read_only=True) as store:
        run = store.run()
        total = store.con.execute("SELECT count(*) FROM neurons WHERE run_id = ?", [run.run_id]).fetchall()[0][0]
        assert store.neuron_count(run.run_id) == total == len(run.layers) * run.neurons_per_layer
        pages = [store.neuron_rows(run.run_id, offset=o, limit=50) for o in range(0, total, 50)]
        rows = [r for page in pages for r in page]
        assert [(r.layer, r.neuron) for r in rows] == sorted((r.layer, r.neuron) for r in rows)
        assert len(set((r.layer, r.neuron) for r in rows)) == total

        explained = store.neuron_rows(run.run_id, BrowseQuery(order="score", descending=True, explained=True), limit=100)
        assert len(explained) == store.neuron_count(run.run_id, BrowseQuery(explained=True)) == 5
        scores = [r.score for r in explained]
        assert None not in scores and scores == sorted(scores, reverse=True)  # type: ignore[type-var]
        assert all(r.ci_low <= r.score <= r.ci_high for r in explained)  # type: ignore[operator]
        best = store.summaries(run.run_id, limit=1)[0]
        assert (explained[0].layer, explained[0].neuron, explained[0].explanation) == (best.layer, best.neuron, best.text)
        # Score order puts unexplained neurons last; explained=False is the complement.
        by_score = store.neuron_rows(run.run_id, BrowseQuery(order="score", descending=True), limit=6)
        assert by_score[:5] == explained and by_score[5].score is None and by_score[5].explanation == ""
        assert store.neuron_count(run.run_id, BrowseQuery(explained=False)) == total - 5

        by_max = store.neuron_rows(run.run_id, BrowseQuery(order="max", descending=True, layers=(1, 2)), limit=500)
        direct = store.con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ? AND layer BETWEEN 1 AND 2 "
                                   "ORDER BY max_act DESC, layer, neuron", [run.run_id]).fetchall()
        assert [(r.layer, r.neuron) for r in by_max] == [tuple(d) for d in direct]
        assert store.neuron_count(run.run_id, BrowseQuery(layers=(1, 2))) == len(direct)

        word = explained[0].explanation.split()[1]  # a token of the baseline's explanation, e.g. '"W"'
        found = store.neuron_rows(run.run_id, BrowseQuery(search=word.lower()), limit=500)
        assert found and all(word.lower() in r.explanation.lower() for r in found)
        assert store.neuron_count(run.run_id, BrowseQuery(search=word.lower())) == len(found)
        # LIKE wildcards and quotes are matched literally, never as patterns or SQL.
        for hostile in ("%", "_", "' OR 1=1 --", "\\"):
            assert store.neuron_count(run.run_id, BrowseQuery(search=hostile)) == sum(hostile in r.explanation for r in rows)
        with pytest.raises(StoreError, match="cannot order"):
            store.neuron_rows(run.run_id, BrowseQuery(order="kurtosis; DROP TABLE neurons"), limit=1)


# -- the app -------------------------------------------------------------------------------------------

@sync
async def test_table_cursor_and_sort(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    app = NeuronscopeApp(path)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        total = app.store.con.execute("SELECT count(*) FROM neurons WHERE run_id = ?",
                                      [app.run_info.run_id]).fetchall()[0][0]
        assert table.row_count == total
        status, header, first, second = table_lines(table, 2)
        assert "explanation" in header and "score [95% CI]" in header and status.startswith(f"{total:,} neurons")
        assert first.startswith(" L0/N0 ") and second.startswith(" L0/N1 ")
        assert table.cached_pages == 1  # only the page on screen was fetched

        await pilot.press("down", "j", "down", "k")
        assert table.cursor == 2 and table.current is not None and table.current.neuron == 2
        await pilot.press("end")
        assert table.cursor == total - 1 and table.scroll_offset.y > 0
        await pilot.press("pageup", "home")
        assert table.cursor == 0 and table.scroll_offset.y == 0

        await pilot.press("s", "s")  # layer -> score -> max
        await settled(pilot, table)
        assert table.order == "max" and table.descending
        top = app.store.con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ? ORDER BY max_act DESC "
                                    "LIMIT 1", [app.run_info.run_id]).fetchall()[0]
        assert table_lines(table, 1)[2].startswith(f" L{top[0]}/N{top[1]} ")
        await pilot.press("q")
    assert app.return_code == 0
    with pytest.raises(Exception, match="closed"):  # noqa: B017 - duckdb's closed-connection error
        app.store.con.execute("SELECT 1")


@sync
async def test_search_and_neuron_screen(scored_store: Path) -> None:
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        total = table.row_count
        await pilot.press("s")  # by score: the best explained neuron first
        await settled(pilot, table)
        best = table.current
        assert best is not None and best.score is not None
        assert f"{best.score:+.2f}" in table_lines(table, 1)[2]

        word = best.explanation.split()[1]
        await pilot.press("slash", *word, "enter")
        await settled(pilot, table)
        assert table.search == word and 1 <= table.row_count < total
        assert all(word.lower() in (table.row(i).explanation.lower()) for i in range(table.row_count))  # type: ignore[union-attr]

        await pilot.press("enter")
        await shown(pilot)
        screen = app.screen
        assert isinstance(screen, NeuronScreen) and screen.position == (table.current.layer, table.current.neuron)  # type: ignore[union-attr]
        text = screen_text(screen)
        layer, neuron = screen.position
        assert f"L{layer}/N{neuron}" in text and "Top excerpts" in text and "Explanations" in text
        record = app.store.records(app.run_info.run_id, layer, neuron, kinds=("top",))[0]
        assert "".join(record.tokens[:3]).strip() in text
        await pilot.press("g")  # no related neurons computed: it says how to get them
        await pilot.pause()
        assert app.screen is screen and any("`neuronscope related` computes" in str(n.message)
                                            for n in app._notifications)

        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is not screen and app.focused is table

        await pilot.press("slash", "x", "escape")  # escape clears the search
        await pilot.pause()
        assert table.search is None and table.row_count == total and app.focused is table


@sync
async def test_hostile_tokens_show_literally(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    app = NeuronscopeApp(path)
    async with app.run_test(size=SIZE) as pilot:
        run_id = app.run_info.run_id
        rows = app.store.con.execute(
            "SELECT r.layer, r.neuron FROM records r JOIN excerpts e USING (run_id, excerpt_id) "
            "WHERE r.run_id = ? AND r.kind = 'top' AND r.rank < 5 GROUP BY r.layer, r.neuron "
            "HAVING bool_or(contains(array_to_string(e.tokens, ''), ?)) "
            "AND bool_or(contains(array_to_string(e.tokens, ''), ?)) ORDER BY 1, 2 LIMIT 1",
            [run_id, MARKERS[0], MARKERS[1]]).fetchall()
        assert rows, "no neuron has both markers among its top excerpts"
        screen = NeuronScreen(app.store, app.run_info, *rows[0])
        await app.push_screen(screen)
        await shown(pilot)
        text = screen_text(screen)
        assert MARKERS[0] in text and MARKERS[1] in text
        assert "\x1b" not in text and "\x07" not in text


def test_browse_errors_are_one_line(cli_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli(["browse", str(tmp_path / "missing.duckdb")]), "no store")
    foreign = tmp_path / "notes.duckdb"
    foreign.write_text("not a database\n")
    assert_one_line_error(run_cli(["browse", "--store", str(foreign)]), str(foreign))
    # The store is fine, but stdout is a pipe: the app would draw into it, so it says what to use instead.
    assert_one_line_error(run_cli(["browse", str(cli_store[0])]), "needs a terminal", "neuronscope top")
    assert_one_line_error(run_cli(["browse", str(cli_store[0]), "--explainer", "nope:x"]), "nope")
    assert_one_line_error(run_cli(["browse", str(cli_store[0]), "--theme", "pink"]), "unknown theme", "textual-light")


def test_app_imports_no_torch(cli_store) -> None:  # type: ignore[no-untyped-def]
    code = ("import sys; from neuronscope.tui.app import NeuronscopeApp; app = NeuronscopeApp(sys.argv[1]); app.store.close(); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code, str(cli_store[0])], capture_output=True, text=True,
                          env=cli_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- filters, marks, navigation ------------------------------------------------------------------------

def together(app: NeuronscopeApp, *keys: str) -> None:
    """Keys that reach the app together, as from one read of a terminal (typed fast over SSH, or sent by a script):
    none is handled before the next is queued (Pilot's `press` waits after each key)."""
    for key in keys:
        event = events.Key(key, "." if key == "full_stop" else key if len(key) == 1 else None)
        event.set_sender(app)
        app._driver.send_message(event)  # type: ignore[union-attr]


@sync
async def test_keys_that_arrive_together_apply_in_order(scored_store: Path) -> None:
    """Textual's Input ran its bound keys (backspace, ctrl+u, the arrows) only after they had passed up to the app,
    and the form's priority enter before the field had taken the letters typed before it: keys that came together
    were applied out of order (`a b backspace c` gave "ab"; `ctrl+u 1..2 enter` filtered nothing), and the letters
    typed right after `/` went to the table, whose keys they are (m marks, e explains, q quits)."""
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        marked = set(table.marked)
        together(app, "slash", "m", "e", "q")
        await pilot.pause()
        box = app.query_one("#search", Input)
        assert box.value == "meq" and app.focused is box
        assert table.marked == marked and not app.jobs.handles and app.is_running
        together(app, "ctrl+u", "a", "b", "backspace", "c")
        await pilot.pause()
        assert box.value == "ac"
        together(app, "ctrl+u", "x", "y", "left", "backspace", "z")
        await pilot.pause()
        assert box.value == "zy"
        await pilot.press("escape")
        await settled(pilot, table)

        await pilot.press("f")
        await pilot.pause()
        together(app, "ctrl+u", "1", "full_stop", "full_stop", "2", "enter")
        await pilot.pause()  # the keys handled
        await settled(pilot, table)
        assert not isinstance(app.screen, FilterScreen) and table.query_spec.layers == (1, 2)
        await pilot.press("f")
        await pilot.pause()
        together(app, "ctrl+u", "enter")  # emptied, then applied: every layer again
        await pilot.pause()  # the keys handled
        await settled(pilot, table)
        assert not isinstance(app.screen, FilterScreen) and table.query_spec.layers is None
        await pilot.press("f")  # Tab moves to the next field before the letters after it are handed on
        await pilot.pause()
        together(app, "ctrl+u", "1", "full_stop", "full_stop", "2", "tab", "0", "full_stop", "5", "full_stop",
                 "full_stop", "enter")
        await pilot.pause()
        await settled(pilot, table)
        assert not isinstance(app.screen, FilterScreen), app.screen.query_one("#filter-error", Label).render()
        assert table.query_spec.layers == (1, 2) and table.query_spec.score == (0.5, float("inf"))
        table.set_query(BrowseQuery())
        await settled(pilot, table)

        together(app, "a", "e", "x")  # the tag form's field takes what follows `a`, not the table (e explains)
        await pilot.pause()
        assert isinstance(app.focused, Input) and app.focused.value == "ex" and not app.jobs.handles


@sync
async def test_filter_form_next_unexplained_marks_and_random(scored_store: Path, tmp_path: Path) -> None:
    app = NeuronscopeApp(copy_store(scored_store, tmp_path, "s.duckdb"))  # marks are saved in the store
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        run_id = app.run_info.run_id
        await pilot.press("f", *"1..2", "enter")
        await settled(pilot, table)
        assert not isinstance(app.screen, FilterScreen) and table.query_spec.layers == (1, 2)
        assert table.row_count == app.store.neuron_count(run_id, BrowseQuery(layers=(1, 2))) > 0
        assert {table.row(i).layer for i in range(table.row_count)} == {1, 2}  # type: ignore[union-attr]
        assert "L1..2" in table_lines(table, 0)[0]

        # A score range keeps only scored neurons in it; the form shows the current filters when reopened.
        await pilot.press("f")  # -1 is the last layer, as on the command line
        await pilot.pause()
        await pilot.press("ctrl+r", *"-1", "enter")
        await settled(pilot, table)
        assert table.query_spec.layers == (2, 2) and table.row_count == 48
        await pilot.press("f")
        await pilot.pause()
        await pilot.press("ctrl+r", "tab", *"0.5..", "enter")
        await settled(pilot, table)
        assert table.query_spec.layers is None and table.query_spec.score == (0.5, float("inf"))
        rows = [table.row(i) for i in range(table.row_count)]
        assert rows and all(r is not None and r.score is not None and r.score >= 0.5 for r in rows)
        await pilot.press("f")
        await pilot.pause()
        assert app.screen.query_one("#score", Input).value == "0.5.."

        # Bad input keeps the form open with a message; escape leaves the filters as they were.
        await pilot.press("ctrl+r", *"abc", "enter")
        await pilot.pause()
        assert isinstance(app.screen, FilterScreen)
        assert "cannot read 'abc'" in str(app.screen.query_one("#filter-error", Label).render())
        await pilot.press("ctrl+r", *"7", "enter")  # the run has layers 0..2
        await pilot.pause()
        assert "no layer of the run is in 7: it has 0..2" in str(app.screen.query_one("#filter-error", Label).render())
        await pilot.press("escape")
        await pilot.pause()
        assert table.query_spec.score == (0.5, float("inf"))

        # Explained/unexplained radio buttons: tab to them, choose, tab back to a field and apply.
        await pilot.press("f")
        await pilot.pause()
        await pilot.press("ctrl+r", "tab", "tab", "right", "right", "space", "enter")
        await settled(pilot, table)
        assert table.query_spec == BrowseQuery(explained=False)
        assert table.row_count == app.store.neuron_count(run_id, BrowseQuery()) - 5

        # n: the next neuron without an explanation, in score order after the five explained ones.
        table.set_query(BrowseQuery(order="score", descending=True))
        await settled(pilot, table)
        await pilot.press("n")  # looked up in a worker
        await until(pilot, lambda: table.cursor == 5)
        assert table.current is not None and table.current.explanation == ""
        # m marks and steps down; the status line counts marks.
        await pilot.press("up", "m", "m")
        assert len(table.marked) == 2 and table.cursor == 6 and "2 marked" in table_lines(table, 0)[0]
        assert table_lines(table, 6)[6].startswith("●")
        await pilot.press("up", "m")
        assert len(table.marked) == 1

        # r opens a random neuron of those shown; escape goes back.
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, NeuronScreen))
        assert app.check_action("sort", ()) is False and app.check_action("cancel", ()) is None
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is table


@sync
async def test_help_and_go_to_from_the_command_palette(scored_store: Path) -> None:
    app = NeuronscopeApp(scored_store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app.screen)
        for key, words in (("s", "next order"), ("f", "layer range"), ("/", "find explanations"),
                           ("n", "without an explanation"), ("e", "explain and score"), ("ctrl+p", "go to a neuron"),
                           ("escape", "back to the table")):
            assert re.search(rf"^\s*{re.escape(key)}\s+.*{words}", text, re.MULTILINE), (key, text)
        await pilot.press("escape")
        await pilot.pause()

        await pilot.press("ctrl+p", *"L1/N3")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, NeuronScreen))
        assert app.screen.position == (1, 3)  # type: ignore[attr-defined]
        await pilot.press("ctrl+p", *"L99/N3")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen.position == (1, 3)  # type: ignore[attr-defined]
