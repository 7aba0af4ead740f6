"""`import-openai` and `export`: OpenAI's GPT-2 XL release layout in and out, Parquet and JSONL out.

The fixture release (tests/data/openai-release, written by tests/data/make_openai_release.py) is our own hand-made
slice in the release's format: 2 layers, 3 neurons, with explanations, related tokens and related neurons; one
explanation was scored on a sequence no record of its neuron holds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from app_helpers import SIZE, screen_text, shown, sync
from conftest import Result, assert_one_line_error, orphan_records, run_cli, run_rows

from neuronscope.core.ids import NeuronId
from neuronscope.core.interop.export import bundles, export_openai
from neuronscope.core.interop.importer import import_release
from neuronscope.core.interop.release import (
    ACTIVATIONS,
    EXPLANATIONS,
    ReleaseError,
    neuron_files,
    parse_explanations,
    parse_neuron_record,
    parse_related_neurons,
    parse_weight_tokens,
    read_json,
)
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")

RELEASE = Path(__file__).parent / "data" / "openai-release"
NEURONS = [(0, 3), (0, 7), (1, 0)]


def imported(tmp_path: Path, release: Path = RELEASE) -> tuple[Path, Result]:
    store = tmp_path / "imported.duckdb"
    result = run_cli(["import-openai", release, "--store", store])
    return store, result


def test_import_brings_every_part_of_the_release_in(tmp_path: Path) -> None:
    store_path, result = imported(tmp_path)
    assert result.code == 0, result.err
    assert "3 neurons imported" in result.err
    with Store.open(store_path, read_only=True) as store:
        run = store.run()
        assert (run.model, run.layers, run.status) == ("gpt2-xl", (0, 1), "complete")
        assert set(store.run_neurons(run.run_id)) == set(NEURONS)
        source = json.loads((RELEASE / ACTIVATIONS / "0" / "3.json").read_text())
        records = store.records(run.run_id, 0, 3)
        assert [r.tokens for r in records if r.kind == "top"] == [
            tuple(r["tokens"]) for r in source["most_positive_activation_records"]]
        assert len([r for r in records if r.kind == "quantile"]) == 6
        assert {r.bin for r in records if r.kind == "quantile"} == {0, 1, 2}
        stats = store.neuron_stats(run.run_id, 0, 3)
        assert stats is not None
        assert (stats.mean, stats.kurtosis, stats.quantile_edges) == (0.021, 80.25, (0.0, 0.5, 1.0, 1.5))
        assert stats.max == 5.0 and stats.count == 0 and math.isnan(stats.density)
        # Selectivity as a collection defines it, the median excerpt maximum taken from the random sample.
        tops = [max(r["activations"]) for r in source["most_positive_activation_records"]]
        randoms = sorted(max(r["activations"]) for r in source["random_sample"])
        median = (randoms[2] + randoms[3]) / 2
        assert stats.selectivity == pytest.approx((sum(tops) / len(tops) - median) / math.sqrt(0.09), rel=1e-5)
        # Explanations: the release's published score kept, ours recomputed on the same sequences; the best selected.
        explanations = store.explanations(run.run_id, 0, 3)
        assert [e.text for e in explanations] == ["the token' cat' [bold]", 'the word "cat"']
        assert [e.selected for e in explanations] == [False, True]
        best = explanations[1].splits[0]
        assert best.get("published").value == 0.97  # type: ignore[union-attr]
        assert best.get("all").value == pytest.approx(1.0)  # type: ignore[union-attr]
        assert best.get("all").ci_low <= best.get("all").value  # type: ignore[union-attr]
        assert len(explanations[1].simulations) == 4
        assert store.related_tokens(run.run_id, 0, 3)["lookup"] == [(" cat", pytest.approx(4.1)),
                                                                   (" mat", pytest.approx(0.3))]
        assert store.related_neurons(run.run_id, 1, 0)["upstream_positive"] == [
            (0, 3, pytest.approx(0.52)), (0, 7, pytest.approx(0.11))]
        assert "downstream_positive" not in store.related_neurons(run.run_id, 1, 0)  # c_proj is null in the last layer
        # The sequence no record holds is kept as a 'scored' record, out of the excerpts `show` lists.
        scored = store.records(run.run_id, 1, 0, kinds=("scored",))
        assert [r.tokens for r in scored] == [(" no", " record", " holds", " this")]
        assert all(r.kind != "scored" for r in store.records(run.run_id, 1, 0))
    shown = run_cli(["show", "1/0", "--store", store_path])
    assert shown.code == 0, shown.err
    assert "upstream +   L0/N3 +0.52, L0/N7 +0.11" in shown.out
    assert "lookup       ' 2023' +4.1, ' mat' +0.3" in shown.out
    assert "published +0.97" in shown.out
    assert "[bold]" in shown.out  # an explanation's markup-like text is shown, not interpreted
    assert "job 1  complete  import on run 1  3/3 neurons done" in run_cli(["info", "--store", store_path]).out


def test_a_second_import_resumes_and_writes_nothing_twice(tmp_path: Path) -> None:
    store_path, first = imported(tmp_path)
    assert first.code == 0
    second = run_cli(["import-openai", RELEASE, "--store", store_path])
    assert second.code == 0, second.err
    assert "0 neurons imported, 3 already there" in second.err
    with Store.open(store_path, read_only=True) as store:
        assert len(store.runs()) == 1
        assert store.counts()["neurons"] == 3
        assert store.counts()["explanations"] == 6


def _rows(store: Store, run_id: int) -> str:
    """Every row of an imported run, its explanations and their simulations' excerpts too, as text (NaN != NaN)."""
    return repr([run_rows(store, run_id), store.con.execute(
        "SELECT layer, neuron, text, selected, sample, s.excerpt_id FROM explanations LEFT JOIN simulations s "
        "USING (explanation_id) ORDER BY ALL").fetchall()])


def _sharing_release(tmp_path: Path) -> Path:
    """The fixture and neuron 0/8, a copy of 0/3: its records and simulations hold 0/3's sequences."""
    release = tmp_path / "sharing"
    shutil.copytree(RELEASE, release)
    for source in release.glob("**/0/3.json*"):
        obj = json.loads(source.read_text())
        obj.get("neuron_id", {})["neuron_index"] = 8
        source.with_stem("8").write_text(json.dumps(obj))
    return release


def test_an_interrupted_import_resumes_where_it_stopped(tmp_path: Path) -> None:
    def interrupt(_stage: str, _done: int, _total: int) -> None:
        raise KeyboardInterrupt  # after the first batch of one neuron was committed

    release = _sharing_release(tmp_path)
    with Store.open(tmp_path / "whole.duckdb") as store:
        whole = _rows(store, import_release(store, release, batch=1).run_id)
    with Store.open(tmp_path / "s.duckdb") as store:
        report = import_release(store, release, batch=1, progress=interrupt)
        assert (report.complete, report.imported, store.run(report.run_id).status) == (False, 1, "importing")
        assert set(store.run_neurons(report.run_id)) == {NEURONS[0]}
        assert [(j["state"], j["done"]) for j in store.jobs()] == [("interrupted", 1)]
        rest = import_release(store, release, batch=1)
        assert rest.complete and (rest.run_id, rest.imported, rest.present) == (report.run_id, 3, 1)
        assert store.run(report.run_id).status == "complete"
        assert [(j["state"], j["done"], j["total"]) for j in store.jobs()] == [("complete", 4, 4)]
        # 0/8's records point at the excerpts the first session stored: the rows are those of one import.
        assert _rows(store, report.run_id) == whole
        assert orphan_records(store) == 0


def _corrupt_release(tmp_path: Path) -> Path:
    release = tmp_path / "release"
    shutil.copytree(RELEASE, release)
    (release / ACTIVATIONS / "0" / "7.json").write_text('{"neuron_id": {"layer_index": 0, "neuron_index": 7}, "most_')
    (release / EXPLANATIONS / "1" / "0.jsonl").write_bytes(b"\x00\xff\xfe binary")
    (release / "related-tokens" / "weight-based" / "0" / "3.json").unlink()
    odd = json.loads((release / ACTIVATIONS / "1" / "0.json").read_text())
    (release / ACTIVATIONS / "1" / "5.json").write_text(json.dumps(odd))  # says it is neuron 1/0
    bad = json.loads((release / ACTIVATIONS / "1" / "0.json").read_text())
    bad["neuron_id"]["neuron_index"] = 6
    bad["most_positive_activation_records"][0]["activations"].pop()
    (release / ACTIVATIONS / "1" / "6.json").write_text(json.dumps(bad))
    (release / ACTIVATIONS / "0" / "5000.json").write_text("garbage")  # neither is a neuron of the run
    (release / ACTIVATIONS / "2").mkdir()
    (release / ACTIVATIONS / "2" / "0.json").write_text("garbage")
    return release


def test_malformed_and_missing_files_are_reported_and_skipped(tmp_path: Path) -> None:
    store_path, result = imported(tmp_path, _corrupt_release(tmp_path))
    assert result.code == 3, result.err  # neurons failed: the same command retries them
    assert "Traceback" not in result.err
    skipped = [line for line in result.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 7, result.err
    reasons = "\n".join(skipped)
    assert "0/7.json: it is not valid JSON" in reasons
    assert "1/0.jsonl: it is not UTF-8 text" in reasons
    assert "weight-based/0/3.json: missing" in reasons
    assert "1/5.json: it holds neuron 1/0, not 1/5" in reasons
    assert "1/6.json: NeuronRecord.most_positive_activation_records[0] has 8 tokens but 7 activations" in reasons
    assert "2 neurons imported, 7 files skipped" in result.err
    assert "import on run 1  0/7 neurons done, 7 failed" in run_cli(["info", "--store", store_path]).out
    with Store.open(store_path, read_only=True) as store:
        run = store.run()
        assert (run.layers, run.neurons_per_layer) == ((0, 1), 4)  # those of 0/3 and 1/0, the neurons it holds
        assert set(store.run_neurons(run.run_id)) == {(0, 3), (1, 0)}
        assert store.explanations(run.run_id, 1, 0) == []  # its explanations file was unreadable
        assert "input_positive" not in store.related_tokens(run.run_id, 0, 3)
        assert "lookup" in store.related_tokens(run.run_id, 0, 3)


def test_an_import_that_reads_no_neuron_makes_no_complete_run(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """Every neuron file malformed: each is reported, the command fails with one line, and the store's real run
    stays the default (an empty 'complete' run would hide it)."""
    release = tmp_path / "release"
    shutil.copytree(RELEASE, release)
    for path in (release / ACTIVATIONS).rglob("*.json"):
        path.write_text("{ not json")
    store_path = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store_path)
    with Store.open(store_path, read_only=True) as store:
        before = store.run().run_id
    result = run_cli(["import-openai", release, "--store", store_path])
    line = assert_one_line_error(result, "none of the 3 neuron files", "could be read", "run the same command again")
    assert len([x for x in result.err.splitlines() if x.startswith("skipped ")]) == 3, line
    with Store.open(store_path, read_only=True) as store:
        assert store.run().run_id == before
        imported_run = store.runs()[-1]
        assert (imported_run.status, imported_run.error) == ("failed", "no neuron file of the release could be read")
    info = run_cli(["info", "--store", store_path])
    assert "failed (no neuron file of the release could be read)" in info.out
    (release / ACTIVATIONS / "0" / "3.json").write_text((RELEASE / ACTIVATIONS / "0" / "3.json").read_text())
    again = run_cli(["import-openai", release, "--store", store_path])  # fixed: the same command resumes
    assert again.code == 3 and "1 neurons imported, 2 files skipped" in again.err, again.err  # 2 still broken


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "nowhere", "no folder at"),
    (lambda p: p, "has no collated-activations/ folder"),
])
def test_no_release_at_the_path_is_one_line(tmp_path: Path, make: Any, needle: str) -> None:
    store_path, result = imported(tmp_path, make(tmp_path))
    assert_one_line_error(result, needle)


def _close(a: Any, b: Any, where: str = "") -> None:
    """JSON values equal, numbers to the precision the store keeps (int8 codes: 1/254 of a record's largest |a|, and
    the export's 4 significant digits of it: 1/2000; float32 for related weights)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        scale = max((abs(x) for x in a if isinstance(x, (int, float))), default=0.0)
        for i, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and isinstance(y, (int, float)):
                assert y == pytest.approx(x, abs=scale / 254 + scale / 2000 + 1e-6, rel=1e-6), f"{where}[{i}]"
            else:
                _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-6), where
    else:
        assert a == b, where


def test_release_round_trip_import_then_export_in_the_same_layout(tmp_path: Path) -> None:
    store_path, result = imported(tmp_path)
    assert result.code == 0
    out = tmp_path / "again"
    exported = run_cli(["export", "--format", "openai", "--out", out, "--store", store_path])
    assert exported.code == 0, exported.err
    originals = sorted(p.relative_to(RELEASE) for p in RELEASE.rglob("*.json*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.json*") if "neuronscope" not in p.parts) == originals
    for relative in originals:
        a, b = read_json(RELEASE / relative), read_json(out / relative)
        if relative.parts[0] == EXPLANATIONS:
            # Per-sequence scores and distributions are not kept (we score sequences pooled); the rest round-trips.
            for doc in (a, b):
                for e in doc["scored_explanations"]:
                    for s in e["scored_simulation"]["scored_sequence_simulations"]:
                        for key in ("ev_correlation_score", "rsquared_score", "absolute_dev_explained_score"):
                            s.pop(key)
                        for key in ("distribution_values", "distribution_probabilities"):
                            s["simulation"].pop(key)
                    e["scored_simulation"].pop("absolute_dev_explained_score")
                    e["scored_simulation"].pop("rsquared_score")
        _close(a, b, str(relative))
    # And the export reads back through the release's own parsers.
    for layer, neuron, path in neuron_files(out, ACTIVATIONS):
        assert (parse_neuron_record(read_json(path)).layer, neuron) == (layer, neuron)


def test_our_own_runs_export_in_the_release_layout(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    scored = tmp_path / "scored.duckdb"
    shutil.copy(cli_store[0], scored)
    assert run_cli(["run", "--explainer", "baseline", "--limit", "2", "--store", scored]).code == 0
    out = tmp_path / "release"
    with Store.open(scored, read_only=True) as store:
        run = store.run()
        n = export_openai(store, run.run_id, out)
        assert n == len(store.run_neurons(run.run_id))
        explained = sorted({(layer, neuron) for layer, neuron, *_ in store.job_scores(1)})
    files = list(neuron_files(out, ACTIVATIONS))
    assert len(files) == n
    record = parse_neuron_record(read_json(files[0][2]))
    assert record.top and record.random and len(record.quantile) == len(run.settings.quantiles) - 1
    for layer, neuron in explained:
        ident, explanations = parse_explanations(read_json(out / EXPLANATIONS / str(layer) / f"{neuron}.jsonl"))
        assert ident == (layer, neuron) and explanations
        assert all(len(s.tokens) == len(s.expected) == len(s.true) for e in explanations for s in e.sequences)
        assert all(max(v for s in e.sequences for v in s.expected) <= 10.0 for e in explanations)
    assert not (out / "related-neurons").exists()  # this run has none


def test_parquet_and_jsonl_exports_read_back(tmp_path: Path) -> None:
    store_path, _ = imported(tmp_path)
    untagged = tmp_path / "untagged"
    assert run_cli(["export", "--format", "parquet", "--out", untagged, "--store", store_path]).code == 0
    assert sorted(p.name for p in untagged.iterdir()) == [
        "explanations.parquet", "neurons.parquet", "related.parquet"]  # no tags: no tags table
    tagged = run_cli(["tag", "0/3", "good", "--note", "clean cat detector", "--author", "ada", "--store", store_path])
    assert tagged.code == 0, tagged.err
    with Store.open(store_path) as store:  # what the app's L key saves
        store.save_list(store.run().run_id, "cats", [NeuronId(0, 3), NeuronId(1, 0)], "ada")
    folder = tmp_path / "pq"
    result = run_cli(["export", "--format", "parquet", "--out", folder, "--store", store_path])
    assert result.code == 0, result.err
    assert sorted(p.name for p in folder.iterdir()) == [
        "explanations.parquet", "lists.parquet", "neurons.parquet", "related.parquet", "tags.parquet"]
    assert [(r["name"], r["layer"], r["neuron"], r["author"]) for r in pq.read_table(folder / "lists.parquet").to_pylist()] \
        == [("cats", 0, 3, "ada"), ("cats", 1, 0, "ada")]
    (tag,) = pq.read_table(folder / "tags.parquet").to_pylist()
    assert (tag["layer"], tag["neuron"], tag["tag"], tag["note"], tag["author"]) == (0, 3, "good", "clean cat detector",
                                                                                     "ada")
    neurons = pq.read_table(folder / "neurons.parquet").to_pylist()
    assert [(r["layer"], r["neuron"]) for r in neurons] == NEURONS
    assert neurons[0]["explanation"] == 'the word "cat"' and neurons[0]["score"] == pytest.approx(1.0)
    rows = duckdb.sql(f"SELECT method, value FROM '{folder / 'explanations.parquet'}' WHERE layer = 0 AND neuron = 3 "
                      "AND text = 'the word \"cat\"' ORDER BY method").fetchall()
    assert [m for m, _ in rows] == ["all", "published", "r2", "random", "top"]
    assert dict(rows)["published"] == 0.97
    related = pq.read_table(folder / "related.parquet").to_pylist()
    assert len(related) == 3 * 5 + 3 * 2  # 5 token lists per neuron; 2 neuron lists (one side of the 2 layers)
    lookup = next(r for r in related if (r["layer"], r["neuron"], r["list"]) == (0, 3, "lookup"))
    assert lookup["tokens"] == [" cat", " mat"] and lookup["values"] == [pytest.approx(4.1), pytest.approx(0.3)]
    up = next(r for r in related if (r["layer"], r["neuron"], r["list"]) == (1, 0, "upstream_positive"))
    assert (up["tokens"], up["other_layers"], up["other_neurons"]) == (None, [0, 0], [3, 7])

    jsonl = tmp_path / "neurons.jsonl"
    assert run_cli(["export", "--format", "jsonl", "--out", jsonl, "--store", store_path]).code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(x["layer"], x["neuron"]) for x in lines] == NEURONS
    first = lines[0]
    assert set(first) == {"layer", "neuron", "unit", "stats", "records", "explanations", "related_tokens",
                          "related_neurons", "tags", "lists"}
    assert first["lists"] == ["cats"] and lines[1]["lists"] == []
    assert [(t["tag"], t["note"], t["author"]) for t in first["tags"]] == [("good", "clean cat detector", "ada")]
    assert lines[1]["tags"] == []
    assert first["unit"] == "neuron"
    assert first["stats"]["density"] is None  # unknown, and JSON has no NaN
    assert first["records"][0]["tokens"] == json.loads((RELEASE / ACTIVATIONS / "0" / "3.json").read_text())[
        "most_positive_activation_records"][0]["tokens"]
    assert {s["method"] for s in first["explanations"][1]["scores"]} == {"all", "top", "random", "r2", "published"}
    assert first["related_tokens"]["lookup"][0] == [" cat", pytest.approx(4.1)]

    again = run_cli(["export", "--format", "parquet", "--out", folder, "--store", store_path])
    assert_one_line_error(again, "not empty")
    assert_one_line_error(run_cli(["export", "--format", "jsonl", "--out", jsonl, "--store", store_path]), "exists")


def test_parsers_name_the_field_that_is_wrong() -> None:
    good = read_json(RELEASE / ACTIVATIONS / "0" / "3.json")
    for change, needle in [
        (lambda o: o.pop("most_positive_activation_records"), "has no 'most_positive_activation_records'"),
        (lambda o: o["random_sample"][0].update(tokens="abc"), "random_sample[0]: 'tokens' is not a list"),
        (lambda o: o["neuron_id"].update(layer_index="0"), "'layer_index' is not an integer"),
        (lambda o: o["random_sample_by_quantile"][1][0]["activations"].__setitem__(0, True), "activations is not a list of numbers"),
        (lambda o: o.update(most_positive_activation_records=[]), "has no most_positive_activation_records"),
    ]:
        obj = json.loads(json.dumps(good))
        change(obj)
        with pytest.raises(ReleaseError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            parse_neuron_record(obj)
    with pytest.raises(ReleaseError, match="not layer_neuron"):
        parse_related_neurons({"c_fc": {"top_positive_neurons": ["3-1"], "top_positive_weights": [1.0],
                                        "top_negative_neurons": [], "top_negative_weights": []}})
    with pytest.raises(ReleaseError, match="2 tokens but 1 strengths"):
        parse_weight_tokens({name: {"tokens": ["a", "b"], "strengths": [1.0]} for name in (
            "input_positive", "input_negative", "output_positive", "output_negative")})


@sync
async def test_the_app_shows_related_lists_and_enters_a_related_neuron(tmp_path: Path) -> None:
    from neuronscope.tui.app import NeuronscopeApp
    from neuronscope.tui.screens.modals import RelatedScreen
    from neuronscope.tui.screens.neuron import NeuronScreen

    store_path, result = imported(tmp_path)
    assert result.code == 0
    app = NeuronscopeApp(store_path)
    async with app.run_test(size=SIZE) as pilot:
        app.open_neuron(1, 0)
        await shown(pilot)
        screen = app.screen
        assert isinstance(screen, NeuronScreen) and screen.position == (1, 0)
        text = screen_text(screen)
        assert "Related tokens and neurons (g: go to one)" in text
        assert "upstream +   L0/N3 +0.52, L0/N7 +0.11" in text and "lookup       ' 2023' +4.1" in text
        await pilot.press("g")
        await pilot.pause()
        assert isinstance(app.screen, RelatedScreen)
        assert [n[1:3] for n in app.screen.neurons] == [(0, 3), (0, 7), (0, 5)]  # upstream +, then upstream −
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.screen is screen and screen.position == (0, 7)
        assert "downstream + L1/N0 +0.41" in screen_text(screen)


def test_importing_more_layers_of_the_same_folder_grows_the_run(tmp_path: Path) -> None:
    store_path = tmp_path / "s.duckdb"
    first = run_cli(["import-openai", RELEASE, "--layers", "1", "--store", store_path])
    assert first.code == 0, first.err
    with Store.open(store_path, read_only=True) as store:
        assert (store.run().layers, set(store.run_neurons(store.run().run_id))) == ((1,), {(1, 0)})
    assert run_cli(["import-openai", RELEASE, "--store", store_path]).code == 0
    with Store.open(store_path, read_only=True) as store:
        run = store.run()
        assert (run.layers, len(store.runs())) == ((0, 1), 1)
        assert [(j["done"], j["total"]) for j in store.jobs()] == [(1, 1), (3, 3)]  # a job per choice of layers
        assert set(store.run_neurons(run.run_id)) == set(NEURONS)
    again = run_cli(["import-openai", RELEASE, "--layers", "1", "--store", store_path])
    assert again.code == 0 and "0 neurons imported, 1 already there" in again.err  # counts the layers asked for
    assert_one_line_error(run_cli(["import-openai", RELEASE, "--layers", "5", "--store", store_path]),
                          "--layers names layer 5, which is not here (the layers here: 0-1)")
    assert_one_line_error(run_cli(["import-openai", RELEASE, "--layers", "x", "--store", store_path]),
                          "cannot read --layers 'x': write layers like 0-5,12")


def test_bulk_reads_of_exports_match_the_per_neuron_reads(scored_store: Path, tmp_path: Path) -> None:
    store_path, _ = imported(tmp_path)
    kinds = ("top", "bottom", "random", "quantile", "scored")
    for path in (store_path, scored_store):
        with Store.open(path, read_only=True) as store:
            run = store.run()
            got = list(bundles(store, run.run_id))
            assert [(b.stats.layer, b.stats.index) for b in got] == store.run_neurons(run.run_id)
            for b in got:
                layer, neuron = b.stats.layer, b.stats.index
                assert repr(b.stats) == repr(store.neuron_stats(run.run_id, layer, neuron))  # NaN != NaN
                assert list(b.records) == store.records(run.run_id, layer, neuron, kinds=kinds)
                for tail in ("pos", "neg"):
                    assert repr(list(b.explanations.get(tail, ()))) == repr(
                        store.explanations(run.run_id, layer, neuron, tail=tail))
                assert b.related_tokens == store.related_tokens(run.run_id, layer, neuron)
                assert b.related_neurons == store.related_neurons(run.run_id, layer, neuron)


def test_worker_processes_import_the_same_rows(tmp_path: Path) -> None:
    release = _corrupt_release(tmp_path)  # problems are reported the same way from workers
    reports, problems = [], []
    for workers in (1, 2):
        found: list[tuple[Path, str]] = []
        with Store.open(tmp_path / f"w{workers}.duckdb") as store:
            reports.append(import_release(store, release, batch=1, workers=workers,
                                          problem=lambda f, m, out=found: out.append((f, m))))
            problems.append((found, _rows(store, reports[-1].run_id)))
    assert reports[0] == reports[1] and reports[0].imported == 2
    assert repr(problems[0]) == repr(problems[1])  # rows hold NaN (unknown density)
