"""`top --order random` is a shuffle for every seed (`--seed`), and a density the run does not know (an imported
run's) shows as `-`, sorts last both ways in the explorer, and `top --order density` says so (testers' reports)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from app_helpers import SIZE, settled, sync, table_lines
from conftest import Result, copy_store, run_cli

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.widgets.neuron_table import NeuronTable

pytestmark = pytest.mark.usefixtures("neuronscope_env")
RELEASE = Path(__file__).parent / "data" / "openai-release"
NEURON = re.compile(r"L\d+/N\d+")


def _top(store: Path, *args: str) -> list[str]:
    result = run_cli(["top", "--store", str(store), *args])
    assert result.code == 0, result.err
    return NEURON.findall(result.out)


def test_random_order_is_a_shuffle_for_every_seed(cli_store: tuple[Path, Result]) -> None:
    """The order was hash(layer * 1000003 + neuron + seed) and DuckDB hashes 0 to 0: with `top`'s seed 0, L0/N0
    always came first, and seed s + 1 gave the order of seed s shifted by one neuron."""
    path = cli_store[0]
    with Store.open(path, read_only=True) as store:
        run = store.run()
        everyone = {(n.layer, n.index) for n in store.top_neurons(run.run_id, 10**6, "max")}
        orders = {seed: [(n.layer, n.index) for n in store.top_neurons(run.run_id, 10**6, "random", seed=seed)]
                  for seed in (0, 1, 2, 2**32 - 1)}
    for order in orders.values():
        assert sorted(order) == sorted(everyone) and len(order) == len(everyone)  # a permutation of the run
        assert order != sorted(order)
    assert len({tuple(order[:10]) for order in orders.values()}) == len(orders)
    shifted = [(layer, neuron + 1) for layer, neuron in orders[0]]
    assert sum(a == b for a, b in zip(shifted, orders[1])) < len(everyone) // 10  # not seed 0's order, moved by one

    first = _top(path, "--order", "random", "--limit", "5")
    assert first[0] != "L0/N0" and first == _top(path, "--order", "random", "--limit", "5", "--seed", "0")
    assert first == [str(NeuronId(*n)) for n in orders[0][:5]]
    assert _top(path, "--order", "random", "--limit", "5", "--seed", "1") == [str(NeuronId(*n)) for n in orders[1][:5]]
    assert "seed of --order random" in run_cli(["top", "--help"]).out


def test_unknown_density_sorts_last_both_ways(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """The explorer's density sort put NaN (unknown) first when descending; unknowns now come last either way, as
    in `top`."""
    path = copy_store(cli_store[0], tmp_path, "unknown.duckdb")
    with Store.open(path) as store:
        run_id = store.run().run_id
        store.con.execute("UPDATE neurons SET density = 'nan' WHERE run_id = ? AND neuron % 3 = 0", [run_id])
        unknown = store.con.execute("SELECT count(*) FROM neurons WHERE run_id = ? AND isnan(density)",
                                    [run_id]).fetchall()[0][0]
        for descending in (False, True):
            rows = store.neuron_rows(run_id, BrowseQuery(order="density", descending=descending), limit=10**6)
            known = [r.density for r in rows[:-unknown]]
            assert all(math.isnan(r.density) for r in rows[-unknown:]) and not any(map(math.isnan, known))
            assert known == sorted(known, reverse=descending)
        ranked = store.top_neurons(run_id, 10**6, "density")
        assert all(math.isnan(n.density) for n in ranked[-unknown:]) and not math.isnan(ranked[-unknown - 1].density)
    quiet = run_cli(["top", "--order", "density", "--store", str(path)])
    assert quiet.code == 0 and "unknown" not in quiet.err  # some are known: nothing to say


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenAI's release format (our fixture slice) imported: no neuron has a density."""
    store = tmp_path_factory.mktemp("imported") / "imported.duckdb"
    result = run_cli(["import-openai", str(RELEASE), "--store", str(store)])
    assert result.code == 0, result.err
    return store


def test_top_by_density_says_the_run_has_none(imported: Path) -> None:
    """`top --order density` on an imported run silently returned layer order."""
    result = run_cli(["top", "--order", "density", "--store", str(imported)])
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "density" in line]
    assert len(notes) == 1 and "density is unknown for run 1 (imported from OpenAI's release" in notes[0], result.err
    assert "in layer order" in notes[0]
    assert NEURON.findall(result.out) == ["L0/N3", "L0/N7", "L1/N0"] and "nan" not in result.out  # shown as -
    assert "unknown" not in run_cli(["top", "--store", str(imported)]).err


@sync
async def test_the_explorer_shows_unknown_density_as_a_dash_and_counts_marks_with_commas(imported: Path) -> None:
    app = NeuronscopeApp(imported)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        await settled(pilot, table)
        lines = table_lines(table, 3)
        assert all(line.rstrip().endswith(" -") for line in lines[2:5]), lines
        assert "nan" not in "\n".join(lines)
        table.set_marks({NeuronId(layer, neuron) for layer in range(3) for neuron in range(1000)})
        assert "3,000 marked" in table_lines(table, 0)[0]
