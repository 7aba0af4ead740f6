"""`neuronscope probe`: activations on a text of your own, through the CLI, on the planted model (whose layer-0
neurons 0-2 fire on ' the', ' a' and ',' and nowhere else)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from neuronscope.core.ids import NeuronId
from neuronscope.core.models.loading import load_subject
from neuronscope.core.models.probe import probe_text, top_at_tokens, top_over_text
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")
TEXT = "We saw the cat and a dog, then the bird"


def test_a_planted_unit_fires_exactly_on_its_token(planted_store: Path, planted_model: Path) -> None:
    result = run_cli(["probe", TEXT, "--unit", "0/0", "--unit", "0/2", "--store", planted_store])
    assert result.code == 0, result.err
    rows = {}
    for line in result.out.splitlines():
        found = re.fullmatch(r"\s*(\d+)\s+'(.*)'\s+([+-]\d+\.\d+)\s+(\S+)\s*", line)
        if found:
            rows.setdefault(int(found.group(1)), []).append((found.group(2), float(found.group(3)), found.group(4)))
    the = [i for i, cells in rows.items() if cells[0][0] == " the"]
    comma = [i for i, cells in rows.items() if cells[0][0] == ","]
    assert len(the) >= 2 and len(comma) == 1
    for i, ((token, l0n0, _share), (_, l0n2, _)) in rows.items():
        assert (l0n0 > 1.0) == (i in the) and (l0n2 > 1.0) == (i in comma), (i, token, l0n0, l0n2)
        assert i in the or l0n0 == 0.0
    # Its activation on ' the' is of the size the corpus showed it (the token's normalised residual varies a little).
    assert all(50 <= int(rows[i][0][2].rstrip("%")) <= 105 for i in the)
    assert "L0/N0  peak +" in result.out and "L0/N2  peak +" in result.out


def test_without_a_unit_it_ranks_the_units_at_each_token_and_over_the_text(planted_store: Path,
                                                                           planted_model: Path) -> None:
    subject = load_subject(str(planted_model), device="cpu", dtype="float32")
    with Store.open(planted_store, read_only=True) as store:
        run = store.run()
        maxima = store.maxima(run.run_id, run.layers, run.neurons_per_layer)
    probe = probe_text(subject, TEXT, run.layers)
    assert probe.acts.shape == (len(run.layers), len(probe.tokens), run.neurons_per_layer)
    at_tokens = top_at_tokens(probe, maxima, 3)
    for position, token in enumerate(probe.tokens):
        if token == " the":
            assert at_tokens[position][0].unit == NeuronId(0, 0) and at_tokens[position][0].relative > 0.5
    over = top_over_text(probe, maxima, 5)
    assert len(over) == 5 and [f.relative for f in over] == sorted((f.relative for f in over), reverse=True)
    # The same ranking by hand: every unit's peak over the text against its collected max.
    peaks = np.where(maxima > 0, probe.acts.max(1) / np.where(maxima > 0, maxima, 1), -np.inf)
    assert over[0].relative == pytest.approx(float(peaks.max()), rel=1e-6)
    result = run_cli(["probe", TEXT, "--store", planted_store, "--top", "5"])
    assert result.code == 0, result.err
    assert "Units firing most at each token" in result.out and "Units firing most over the text (top 5)" in result.out


def test_hostile_text_stays_inert(planted_store: Path) -> None:
    hostile = "[bold red]markup[/] \x1b[2J\x1b]0;title\x07 \u202eevil\u200b"
    result = run_cli(["probe", hostile, "--store", planted_store, "--top", "3"])
    assert result.code == 0, result.err
    assert "\x1b" not in result.out and "\x07" not in result.out and "\u202e" not in result.out
    assert "'bold'" in result.out and "[/]" in result.out and "\\x1b" in result.out  # markup as text, escapes spelled


def test_probe_refusals(planted_store: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(["probe", TEXT, "--unit", "9/0", "--store", planted_store]),
                          "has no unit L9/N0", "holds layers")
    assert_one_line_error(run_cli(["probe", "   ", "--store", planted_store]), "the text to probe is empty")
    assert_one_line_error(run_cli(["probe", TEXT, "--unit", "x", "--store", planted_store]), "x")
    assert_one_line_error(run_cli(["probe", TEXT, "--store", tmp_path / "none.duckdb"]), "none.duckdb")


# -- from the app's neuron screen ---------------------------------------------------------------------

def test_probe_from_the_neuron_screen_opens_a_unit_of_the_text(planted_store: Path) -> None:
    """`t` on a neuron's screen: type a text, enter runs it through the model in a worker; the neuron's activation
    on it and the text's top units show; enter on one opens it."""
    import asyncio

    from app_helpers import SIZE, screen_text, shown, until
    from textual.widgets import OptionList

    from neuronscope.tui.app import NeuronscopeApp
    from neuronscope.tui.screens.neuron import NeuronScreen
    from neuronscope.tui.screens.probe import ProbeScreen

    async def drive() -> None:
        app = NeuronscopeApp(planted_store, backend_options={"device": "cpu", "dtype": "float32"})
        async with app.run_test(size=SIZE) as pilot:
            app.open_neuron(0, 0)
            await shown(pilot)
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, ProbeScreen))
            await pilot.press(*"so the cat [b]sat", "enter")
            await until(pilot, lambda: app.screen.query_one(OptionList).option_count > 0)
            probed = screen_text(app.screen)
            assert "L0/N0: peak +" in probed and "at ' the'" in probed and "[b]" in probed
            probe_screen = app.screen
            assert isinstance(probe_screen, ProbeScreen)
            first = probe_screen.units[0]
            options = app.screen.query_one(OptionList)
            await pilot.press("tab")  # from the text straight to the units (the short text's area takes no stop)
            assert app.focused is options, app.focused
            await pilot.press("home")
            assert options.highlighted == 0, options.highlighted
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, NeuronScreen))
            assert app.screen.position == first

    asyncio.run(drive())
