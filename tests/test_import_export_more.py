"""`import-openai` and `export`, continued: reruns that retry the neurons whose files were skipped, round trips of our
own runs through the release layout (model, authors, quantile levels), the digits exports write, `export --layers`,
and what `info` says of an import that stopped.

The fixture release (tests/data/openai-release) is described in tests/test_import_export.py.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import Result, assert_one_line_error, cli_env, run_cli, run_rows

from neuronscope.core.interop.release import ACTIVATIONS, EXPLANATIONS, neuron_files, parse_explanations, read_json
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")

RELEASE = Path(__file__).parent / "data" / "openai-release"


def _explained(store_path: Path) -> dict[tuple[int, int], list[tuple[str, str, bool]]]:
    """Every neuron's explanations as (explainer, text, selected)."""
    with Store.open(store_path, read_only=True) as store:
        run = store.run()
        return {(n.layer, n.neuron): [(e.explainer, e.text, e.selected) for e in store.explanations(run.run_id, *n)]
                for n in store.run_neurons(run.run_id)}


def test_a_rerun_reads_again_the_neurons_whose_files_were_skipped(tmp_path: Path) -> None:
    release = tmp_path / "part"
    shutil.copytree(RELEASE, release)
    broken = release / EXPLANATIONS / "1" / "0.jsonl"
    broken.write_text("garbage")
    store_path = tmp_path / "pi2.duckdb"
    first = run_cli(["import-openai", release, "--store", store_path])
    assert first.code == 3, first.err  # some neurons failed: a script can tell
    assert "skipped " in first.err and "0.jsonl: it is not valid JSON" in first.err
    assert "3 neurons imported, 1 file skipped" in first.err and "1 neuron failed" in first.err
    assert "run the same command again: it reads those neurons again" in first.err
    assert _explained(store_path)[(1, 0)] == []
    assert "import on run 1  2/3 neurons done, 1 failed" in run_cli(["info", "--store", store_path]).out
    assert run_cli(["import-openai", release, "--store", store_path]).code == 3  # still broken: failed again

    shutil.copy(RELEASE / EXPLANATIONS / "1" / "0.jsonl", broken)  # fixed
    again = run_cli(["import-openai", release, "--store", store_path])
    assert again.code == 0, again.err
    assert "1 neurons imported (1 again: a file of theirs had been skipped), 2 already there" in again.err
    whole = tmp_path / "whole.duckdb"
    assert run_cli(["import-openai", release, "--store", whole]).code == 0
    assert _explained(store_path) == _explained(whole)  # replaced, not added to
    with Store.open(store_path, read_only=True) as a, Store.open(whole, read_only=True) as b:
        assert repr(run_rows(a, a.run().run_id)) == repr(run_rows(b, b.run().run_id))  # (NaN != NaN)
        assert a.counts() == b.counts()
    shown = run_cli(["show", "1/0", "--store", store_path])
    assert "openai-release #1: the word \"2023\"" in shown.out
    assert "import on run 1  3/3 neurons done  " in run_cli(["info", "--store", store_path]).out
    third = run_cli(["import-openai", release, "--store", store_path])
    assert third.code == 0 and "0 neurons imported, 3 already there" in third.err, third.err


def test_a_neuron_failed_under_one_layers_choice_and_read_by_another_import_is_done_in_both(tmp_path: Path) -> None:
    """An import of --layers 1 skips a broken file; once it is fixed, the import of every layer (another job) reads
    that neuron: the first job no longer counts it failed."""
    release = tmp_path / "part"
    shutil.copytree(RELEASE, release)
    broken = release / EXPLANATIONS / "1" / "0.jsonl"
    broken.write_text("garbage")
    store_path = tmp_path / "s.duckdb"
    assert run_cli(["import-openai", release, "--layers", "1", "--store", store_path]).code == 3
    shutil.copy(RELEASE / EXPLANATIONS / "1" / "0.jsonl", broken)
    again = run_cli(["import-openai", release, "--store", store_path])
    assert again.code == 0 and "(1 again: a file of theirs had been skipped)" in again.err, again.err
    jobs = [line for line in run_cli(["info", "--store", store_path]).out.splitlines() if line.startswith("job ")]
    assert len(jobs) == 2 and not any("failed" in line for line in jobs), jobs
    assert all(re.search(r"  (\d+)/\1 neurons done", line) for line in jobs), jobs


@pytest.fixture(scope="module")
def our_export(cli_store: tuple[Path, Result], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A collection of the tiny model with a person's sentence on neuron 0/2, and its export in the release layout."""
    folder = tmp_path_factory.mktemp("ours")
    store_path = folder / "s.duckdb"
    shutil.copy(cli_store[0], store_path)
    scored = run_cli(["score", "0/2", "--explanation", "the word blue", "--simulator", "baseline", "--author", "qa",
                      "--store", store_path])
    assert scored.code == 0, scored.err
    out = folder / "rel2"
    exported = run_cli(["export", "--format", "openai", "--out", out, "--store", store_path])
    assert exported.code == 0, exported.err
    return store_path, out


def test_an_exported_run_imports_as_its_model_with_its_authors_and_quantile_levels(
        our_export: tuple[Path, Path], tmp_path: Path) -> None:
    source, out = our_export
    imported = tmp_path / "imp.duckdb"
    result = run_cli(["import-openai", out, "--store", imported])
    assert result.code == 0, result.err
    with Store.open(source, read_only=True) as a, Store.open(imported, read_only=True) as b:
        ours, back = a.run(), b.run()
        assert (back.model, back.model_revision, back.dtype) == (ours.model, ours.model_revision, ours.dtype)
        assert back.settings.quantiles == ours.settings.quantiles == (0.0, 0.5, 0.9, 0.99, 0.999)
        for n in a.run_neurons(ours.run_id):
            before, after = a.neuron_stats(ours.run_id, *n), b.neuron_stats(back.run_id, *n)
            assert before is not None and after is not None and after.quantile_edges == before.quantile_edges
            bins = [[r.bin for r in s.records(run, *n) if r.kind == "quantile"] for s, run in ((a, ours.run_id),
                                                                                               (b, back.run_id))]
            assert bins[0] == bins[1]  # each record in its own bin, an empty bin kept in its place
        (person,) = [e for e in b.explanations(back.run_id, 0, 2) if e.text == "the word blue"]
        assert (person.explainer, person.role, person.splits[0].simulator) == ("user:qa", "user", "baseline")
    shown = run_cli(["show", "0/2", "--store", imported])
    assert "by qa (human): the word blue" in shown.out, shown.out
    assert "q0=" in shown.out and "q0.999=" in shown.out
    info = run_cli(["info", "--store", imported]).out
    assert "quantile levels not recorded" not in info and "gpt2-xl" not in info
    # The release's own loader builds dataclasses from every key: our export adds none to its files.
    first = read_json(out / EXPLANATIONS / "0" / "2.jsonl")["scored_explanations"][0]
    assert set(first) == {"dataclass_name", "explanation", "scored_simulation"}
    assert parse_explanations(read_json(out / EXPLANATIONS / "0" / "2.jsonl"))[0] == (0, 2)
    # An explicit --model wins, saying in one line what the export says.
    other = run_cli(["import-openai", out, "--model", "gpt2-xl", "--store", tmp_path / "other.duckdb"])
    assert other.code == 0, other.err
    assert "neuronscope/run.json says this export is of" in other.err and "importing it as gpt2-xl" in other.err
    with Store.open(tmp_path / "other.duckdb", read_only=True) as store:
        assert (store.run().model, store.run().model_revision) == ("gpt2-xl", "openai-2023")


def test_a_release_without_our_run_file_does_not_guess_its_quantile_levels(tmp_path: Path) -> None:
    store_path = tmp_path / "s.duckdb"
    assert run_cli(["import-openai", RELEASE, "--store", store_path]).code == 0
    with Store.open(store_path, read_only=True) as store:
        assert store.run().settings.quantiles == (0.0, 1.0, 2.0, 3.0)  # numbered: the release does not say
    assert "quantile levels not recorded by the release" in run_cli(["info", "--store", store_path]).out


def _numbers(obj: Any, key: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value, with the key of the list or object that holds it."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, k)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v, key)]
    return [(key, obj)] if isinstance(obj, float) else []


def _short_activations(values: list[float | None]) -> bool:
    """At most 4 significant digits of the record's peak, the peak itself at its float32 value."""
    peak = max(abs(v) for v in values if v is not None)
    digits = 3 - math.floor(math.log10(peak)) if peak else 0
    return all(v is None or abs(v) == peak or round(v, digits) == v for v in values)


def test_exports_write_the_digits_the_store_has(our_export: tuple[Path, Path], tmp_path: Path) -> None:
    source, out = our_export
    floats = 0
    for path in [p for p in out.rglob("*.json*") if "neuronscope" not in p.relative_to(out).parts]:
        text = path.read_text()
        for key, value in _numbers(json.loads(text)):
            floats += 1
            if key in ("mean", "variance", "skewness", "kurtosis", "ev_correlation_score", "rsquared_score"):
                continue  # float64 in the store
            if key not in ("activations", "true_activations", "expected_activations"):
                assert value == float(str(np.float32(value))), (path, key, value)  # shortest float32 text
            assert len(repr(value).lstrip("-").replace(".", "").lstrip("0")) <= 9, (path, key, value)
        for record in [r for group in ("most_positive_activation_records", "random_sample")
                       for r in json.loads(text).get(group, ())]:
            assert _short_activations(record["activations"]), record
    assert floats > 1000
    jsonl = tmp_path / "n.jsonl"
    assert run_cli(["export", "--format", "jsonl", "--out", jsonl, "--store", source]).code == 0
    for line in jsonl.read_text().splitlines():
        obj = json.loads(line)
        assert all(_short_activations(r["activations"]) for r in obj["records"])
        assert all(v is None or v == float(str(np.float32(v))) for v in (obj["stats"]["max"], obj["stats"]["min"],
                                                                           *obj["stats"]["quantile_edges"]))
    # Importing the fixture and exporting it again is no larger than the fixture (its activations have 4 decimals).
    store_path = tmp_path / "i.duckdb"
    assert run_cli(["import-openai", RELEASE, "--store", store_path]).code == 0
    again = tmp_path / "again"
    assert run_cli(["export", "--format", "openai", "--out", again, "--store", store_path]).code == 0
    assert sum(p.stat().st_size for p in (again / ACTIVATIONS).rglob("*")) <= sum(
        p.stat().st_size for p in (RELEASE / ACTIVATIONS).rglob("*"))


def test_export_takes_layers(tmp_path: Path) -> None:
    store_path = tmp_path / "s.duckdb"
    assert run_cli(["import-openai", RELEASE, "--store", store_path]).code == 0
    jsonl = tmp_path / "one.jsonl"
    result = run_cli(["export", "--format", "jsonl", "--layers", "1", "--out", jsonl, "--store", store_path])
    assert result.code == 0, result.err
    assert [(x["layer"], x["neuron"]) for x in map(json.loads, jsonl.read_text().splitlines())] == [(1, 0)]
    release = tmp_path / "rel"
    assert run_cli(["export", "--format", "openai", "--layers", "0", "--out", release, "--store", store_path]).code == 0
    assert [(layer, neuron) for layer, neuron, _ in neuron_files(release, ACTIVATIONS)] == [(0, 3), (0, 7)]
    tables = tmp_path / "pq"
    last = run_cli(["export", "--format", "parquet", "--layers", "-1", "--out", tables, "--store", store_path])
    assert last.code == 0, last.err
    for name in ("neurons", "explanations", "related"):
        assert set(pq.read_table(tables / f"{name}.parquet").column("layer").to_pylist()) == {1}, name
    bad = run_cli(["export", "--format", "jsonl", "--layers", "7", "--out", tmp_path / "x.jsonl", "--store",
                   store_path])
    assert bad.code == 2 and "--layers names layer 7, which is not here" in bad.err
    (release / "neuronscope" / "run.json").write_text('{"format": "something else"}')  # ours, but damaged
    assert_one_line_error(run_cli(["import-openai", release, "--store", tmp_path / "x.duckdb"]),
                          "neuronscope/run.json: it is not a neuronscope-export file", "fix or delete that file")


STOPPED_IMPORT = """
import sys
from pathlib import Path
from neuronscope.core.interop.importer import import_release
from neuronscope.core.store import Store

def stop(stage, done, total):
    if done >= 2:
        raise KeyboardInterrupt  # Ctrl-C after two neurons were written

with Store.open(sys.argv[2]) as store:
    assert not import_release(store, Path(sys.argv[1]), batch=1, progress=stop).complete
"""


def test_info_tells_how_to_resume_an_import_that_stopped(tmp_path: Path) -> None:
    release, store_path = tmp_path / "my release", tmp_path / "s.duckdb"
    shutil.copytree(RELEASE, release)
    stopped = subprocess.run([sys.executable, "-c", STOPPED_IMPORT, str(release), str(store_path)],
                             capture_output=True, text=True, env=cli_env(), timeout=120)
    assert stopped.returncode == 0, stopped.stderr  # its process is gone: the run shows as interrupted
    with Store.open(store_path, read_only=True) as store:
        excerpts = store.counts()["excerpts"]
    assert excerpts > 0
    info = run_cli(["info", "--store", store_path])
    shown = rf"run 1  interrupted( \([^)]*\))?  gpt2-xl  layers 0(-1)? x \d+  2 neurons  {excerpts:,} excerpts"
    assert re.search(shown, info.out), info.out
    command = re.search(r"run 1 is an import that did not finish: `([^`]+)` resumes it \(or `neuronscope clean",
                        info.out)
    assert command, info.out
    args = shlex.split(command.group(1))
    assert args[:2] == ["neuronscope", "import-openai"] and args[2] == str(release)
    resumed = run_cli(args[1:])
    assert resumed.code == 0 and "1 neurons imported, 2 already there" in resumed.err, resumed.err
    assert "run 1  complete" in run_cli(["info", "--store", store_path]).out
