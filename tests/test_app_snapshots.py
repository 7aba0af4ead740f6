"""Snapshot tests (pytest-textual-snapshot) of the browser's main screens at 80×24 and 120×40: the neuron table
sorted by score, the neuron screen of the best explained neuron, and the neuron screen of a neuron whose top
excerpts hold hostile tokens (rich markup, a chat tag), which must show literally.

The SVGs live in tests/__snapshots__/test_app_snapshots/. After an intended change to the UI, look at the
report of the failing run (snapshot_report.html in the current folder), then regenerate them all with

    python -m pytest tests/test_app_snapshots.py --snapshot-update

and review the changed SVGs in the diff (open them in a browser) before committing them. A failing run writes
its report to ./snapshot_report.html (not ignored by git; `--snapshot-report PATH` puts it elsewhere).

The screens are kept deterministic: the stores come from the seeded tiny model, and `steady` replaces what
varies between sessions (the temp paths of the store and of the model in the sub-title and the neuron screen's
title). If the UI starts to show anything else that varies (a clock, a path, a timestamp), pin it in `steady`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from app_helpers import settled, shown
from conftest import MARKERS, copy_store
from textual.pilot import Pilot

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.screens.neuron import NeuronScreen
from neuronscope.tui.widgets.neuron_table import NeuronTable

pytestmark = pytest.mark.usefixtures("neuronscope_env")
SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
#: What the app shows instead of the tiny model's temp path.
MODEL = "tiny-llama"

SnapCompare = Callable[..., bool]


def sorted_by(*keys: str) -> Callable[[Pilot[None]], Awaitable[None]]:
    """A `run_before` that presses `keys` on the table and waits until the table shows what they asked for."""
    async def run_before(pilot: Pilot[None]) -> None:
        await pilot.press(*keys)
        await settled(pilot, pilot.app.query_one(NeuronTable))
    return run_before


def steady(app: NeuronscopeApp) -> NeuronscopeApp:
    """The app with everything that varies between test sessions pinned: the store's and the model's temp paths."""
    app.run_info = replace(app.run_info, model=MODEL)
    app.sub_title = f"{Path(app.store.path).name} · run {app.run_info.run_id} · {MODEL}"
    return app


def hostile_neuron(app: NeuronscopeApp) -> tuple[int, int]:
    """The first neuron with both MARKERS[0] and MARKERS[1] among its five top excerpts (as in test_app)."""
    rows = app.store.con.execute(
        "SELECT r.layer, r.neuron FROM records r JOIN excerpts e USING (run_id, excerpt_id) "
        "WHERE r.run_id = ? AND r.kind = 'top' AND r.rank < 5 GROUP BY r.layer, r.neuron "
        "HAVING bool_or(contains(array_to_string(e.tokens, ''), ?)) "
        "AND bool_or(contains(array_to_string(e.tokens, ''), ?)) ORDER BY 1, 2 LIMIT 1",
        [app.run_info.run_id, MARKERS[0], MARKERS[1]]).fetchall()
    assert rows, "no neuron has both markers among its top excerpts"
    return rows[0][0], rows[0][1]


def shown_text(app: NeuronscopeApp) -> str:
    """The text on the terminal now, line by line (what the snapshot shows, without colours)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def open_hostile(checked: list[str]) -> Callable[[Pilot[None]], Awaitable[None]]:
    """A `run_before` that pushes the hostile neuron's screen, scrolls down a line at a time (at most a screenful)
    until both markers are on the terminal, and records the text on it in `checked`."""
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, NeuronscopeApp)
        await app.push_screen(NeuronScreen(app.store, app.run_info, *hostile_neuron(app)))
        await shown(pilot)
        for _ in range(app.size.height):
            if all(m in shown_text(app) for m in MARKERS[:2]):
                break
            await pilot.press("down")
        checked.append(shown_text(app))
    return run_before


@SIZES
def test_table_by_score(snap_compare: SnapCompare, scored_store: Path, size: tuple[int, int]) -> None:
    """The neuron table sorted by score (`s`): the five explained neurons first, the best under the cursor."""
    assert snap_compare(steady(NeuronscopeApp(scored_store)), run_before=sorted_by("s"), terminal_size=size)


@SIZES
def test_neuron_screen_explained(snap_compare: SnapCompare, scored_store: Path, size: tuple[int, int]) -> None:
    """The neuron screen of the best explained neuron (`s`, then enter): statistics, histogram, explanations."""
    app = steady(NeuronscopeApp(scored_store))

    async def run_before(pilot: Pilot[None]) -> None:
        await sorted_by("s")(pilot)
        await pilot.press("enter")
        await shown(pilot)

    assert snap_compare(app, run_before=run_before, terminal_size=size)


@SIZES
def test_neuron_screen_hostile(snap_compare: SnapCompare, cli_store, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """The neuron screen of a neuron whose top excerpts hold `[bold red]x[/]` and `[/INST]`: both show
    literally, no escape character reaches the screen."""
    checked: list[str] = []
    app = steady(NeuronscopeApp(cli_store[0]))
    assert snap_compare(app, terminal_size=size, run_before=open_hostile(checked))
    assert checked, "run_before did not run"
    assert MARKERS[0] in checked[0] and MARKERS[1] in checked[0], checked[0]
    assert "\x1b" not in checked[0] and "\x07" not in checked[0]


def test_table_with_large_maxima_and_tags(snap_compare: SnapCompare, scored_store: Path, tmp_path: Path) -> None:
    """At 80×24, sorted by max: maxima in the thousands and millions fit their column (`3.57k`, never a cut
    `3.57e+0`), and a person's tags show before the explanation."""
    path = copy_store(scored_store, tmp_path, "large.duckdb")
    with Store.open(path) as store:
        store.con.execute("UPDATE neurons SET max_act = max_act * CASE WHEN neuron % 16 = 1 THEN 250000 "
                          "WHEN neuron % 3 = 0 THEN 311 ELSE 1 END")
        run_id = store.run().run_id
        rows = store.neuron_rows(run_id, BrowseQuery(order="max", descending=True), limit=3)
        store.add_tags(run_id, [NeuronId(rows[0].layer, rows[0].neuron)], "wrong", "", "ada")
        store.add_tags(run_id, [NeuronId(r.layer, r.neuron) for r in rows[1:]], "good", "", "ada")
    assert snap_compare(steady(NeuronscopeApp(path)), run_before=sorted_by("s", "s"),
                        terminal_size=(80, 24))
