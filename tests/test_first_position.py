"""Position artefacts: neurons whose top excerpts peak at the first position are flagged (`first_peak`, shown by
`show`, a `--where` field), and `collect --skip-positions N` leaves the first N positions of every excerpt out of the
statistics and of what ranks records, so such a neuron's peaks there are gone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import SIZE, settled, sync, table_lines
from conftest import FAST, assert_one_line_error, run_cli

from neuronscope.core.collection.accumulate import LayerAccumulator
from neuronscope.core.collection.summarize import summarize
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


def _collected(acts: np.ndarray, skip: int):  # type: ignore[no-untyped-def]
    settings = CollectSettings(length=acts.shape[1], top_k=5, bottom_k=2, random_k=2, quantile_k=1, seed=0,
                               skip_positions=skip)
    acc = LayerAccumulator(0, acts.shape[2], settings, torch.float32, torch.device("cpu"))
    for start in range(0, len(acts), 8):
        acc.update(torch.from_numpy(acts[start:start + 8]), torch.arange(start, min(start + 8, len(acts))))
    result = acc.result()
    return result, summarize(result, settings)


def test_a_first_position_neuron_is_flagged_and_skipping_removes_its_peaks() -> None:
    rng = np.random.default_rng(0)
    acts = rng.random((40, 12, 2)).astype(np.float32)  # [excerpts, positions, neurons] in [0, 1)
    acts[:, 0, 0] = 50.0 + rng.random(40)  # neuron 0: a massive first-position activation in every excerpt
    result, summary = _collected(acts, skip=0)
    assert summary.first_peak[0] == 1.0 and summary.first_peak[1] < 0.5
    assert result.max[0] >= 50 and (result.samples["top"].maxes[0] >= 50).all()
    assert result.count == 40 * 12

    skipped, later = _collected(acts, skip=1)
    rest = acts[:, 1:, :]
    assert skipped.count == 40 * 11
    np.testing.assert_allclose(skipped.max, rest.max((0, 1)))  # the statistics never see position 0
    np.testing.assert_allclose(skipped.sums[0], rest.astype(np.float64).sum((0, 1)), rtol=1e-5)
    top = skipped.samples["top"]
    want = np.sort(rest[:, :, 0].max(1))[::-1][:5]  # records ranked by their peak after position 0
    np.testing.assert_allclose(top.maxes[0], want)
    assert (top.acts[0, :, 0] >= 50).all()  # the activations of every position are still kept and shown
    assert later.first_peak[0] < 0.5


def test_collect_skip_positions_and_show_the_first_position_share(tiny_model: Path, corpus_dir: Path,
                                                                   tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "64", "--store", store, *FAST]
    assert run_cli([*args, "--skip-positions", "2"], timeout=300).code == 0
    with Store.open(store, read_only=True) as opened:
        run = opened.run()
        assert run.settings.skip_positions == 2 and run.n_excerpts == 64
        stats = opened.neuron_stats(run.run_id, 0, 0)
        assert stats is not None and stats.first_peak is not None and stats.count == 64 * (16 - 2)
    shown = run_cli(["show", "0/0", "--store", store])
    assert shown.code == 0 and "first position" in shown.out and "of its top excerpts peak there" in shown.out
    chosen = run_cli(["score", "--where", "first_peak < 0.5", "--explanation", 'the word "the"', "--simulator",
                      "baseline", "--limit", "2", "--store", store], timeout=300)
    assert chosen.code == 0, chosen.err
    assert_one_line_error(run_cli([*args, "--skip-positions", "16"]), "--skip-positions 16 leaves nothing",
                          "fewer than 16")


@sync
async def test_the_app_hides_first_position_neurons(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """The filter form's checkbox hides the neurons flagged as first-position (here 2 of the tiny model's 144), and
    the status line says so."""
    from neuronscope.core.store.browse import BrowseQuery
    from neuronscope.tui.app import NeuronscopeApp
    from neuronscope.tui.widgets.neuron_table import NeuronTable

    store = tmp_path / "s.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "64", "--store",
                      store, *FAST], timeout=300)
    assert result.code == 0, result.err
    with Store.open(store, read_only=True) as opened:
        flagged = opened.con.execute("SELECT count(*) FROM neurons WHERE first_peak >= 0.5").fetchall()[0][0]
    assert flagged > 0
    app = NeuronscopeApp(store)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        total = table.row_count
        await pilot.press("f", "tab", "tab", "tab", "tab", "space", "enter")  # layers, score, which, tag, the box
        await settled(pilot, table)
        assert table.query_spec == BrowseQuery(first_position=False)
        assert table.row_count == total - flagged
        assert "no first-position" in table_lines(table, 0)[0]
        await pilot.press("f", "ctrl+r", "enter")
        await settled(pilot, table)
        assert table.row_count == total
