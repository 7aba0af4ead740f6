"""`neuronscope related`: a run's related tokens and neurons computed from its model's weights, stored, shown."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import Result, assert_one_line_error, run_cli

from neuronscope.core.models.loading import load_subject
from neuronscope.core.models.relations import input_tokens, upstream_neurons
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


def test_related_stores_what_the_weights_give_and_show_prints_it(cli_store: tuple[Path, Result],
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], path)
    first = run_cli(["related", "--store", path, "--top", "4", "--dtype", "float32"])
    assert first.code == 0, first.err
    with Store.open(path, read_only=True) as store:
        run = store.run()
        layer = run.layers[-1]
        subject = load_subject(run.model, device="cpu", dtype="float32")
        tokens = store.related_tokens(run.run_id, layer, 5)
        neurons = store.related_neurons(run.run_id, layer, 5)
        rows = store.con.execute("SELECT count(*), sum(len(tokens)) FROM related").fetchall()[0]
    expected = input_tokens(subject.model, layer, 4)
    assert [t for t, _ in tokens["input_positive"]] == subject.token_strings(expected.positive_ids[5], apart=True)
    assert [v for _, v in tokens["input_negative"]] == pytest.approx(expected.negative_values[5].tolist(), rel=1e-5)
    up = upstream_neurons(subject.model, layer, 4)
    assert neurons["upstream_positive"] == [(layer - 1, int(i), pytest.approx(float(v), rel=1e-5))
                                            for i, v in zip(up.positive_ids[5], up.positive_values[5])]
    # Every neuron: 4 token lists of 4 tokens, and 2 neuron lists per adjacent layer the model has.
    width, last = run.neurons_per_layer, subject.n_layers - 1
    sides = sum((layer > 0) + (layer < last) for layer in run.layers)
    assert rows == (4 * len(run.layers) * width + 2 * sides * width, 4 * 4 * len(run.layers) * width)
    # A second run replaces the lists instead of adding to them.
    assert run_cli(["related", "--store", path, "--top", "4"]).code == 0
    with Store.open(path, read_only=True) as store:
        assert store.con.execute("SELECT count(*), sum(len(tokens)) FROM related").fetchall()[0] == rows
    shown = run_cli(["show", f"{layer}/5", "--store", path])
    assert shown.code == 0 and "Related tokens and neurons" in shown.out and "upstream +" in shown.out


def test_related_refuses_a_model_that_is_not_the_runs(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    imported = tmp_path / "imported.duckdb"
    assert run_cli(["import-openai", Path(__file__).parent / "data" / "openai-release", "--store", imported]).code == 0
    tiny = Store.open(cli_store[0], read_only=True)
    model = tiny.run().model
    tiny.close()
    assert_one_line_error(run_cli(["related", "--store", imported, "--model", model]), "pass the run's own model")
    assert_one_line_error(run_cli(["related", "--store", imported, "--layers", "7"]), "names layer 7, which is not here")
    assert_one_line_error(run_cli(["related", "--store", imported, "--top", "0"]), "argument --top: 0 is out of range: it must be from 1 to 1,000")
    # An import holds its excerpts as text alone: what runs them through the model says so, in one line.
    assert_one_line_error(run_cli(["effects", "1/0", "--store", imported]), "holds its excerpts as text alone")
