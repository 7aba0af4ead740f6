"""The store end to end on a tiny random-weight Llama: collection round trip, reuse, shards and merge,
schema-version checks, the one-writer lock, and interrupted collections (Ctrl-C and kill -9).

Collections run in-process through the core API (fast); the interruption tests run the real
`neuronscope collect` in a subprocess and signal it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import FAST, build_tiny_model, cli_command, cli_env, collect_into, fast_settings, run_cli

from core.collect import CollectError, merge, parse_layers, parse_shard
from core.corpus import CorpusSpec, cut_excerpts, describe
from core.store import SCHEMA_VERSION, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
PROBES = [(0, 0), (0, 17), (1, 3), (1, 40), (2, 11), (2, 47)]


def run_rows(store: Store, run_id: int) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    """Every row a run owns, in a stable order (for before/after comparisons)."""
    orders = {"neurons": "layer, neuron", "records": "layer, neuron, kind, rank", "excerpts": "excerpt_id"}
    return {
        table: store.con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order}", [run_id]).fetchall()
        for table, order in orders.items()
    }


def orphan_records(store: Store) -> int:
    """Records whose excerpt is not stored in the same run (runs must never mix)."""
    return store.con.execute(
        "SELECT count(*) FROM records r LEFT JOIN excerpts e ON e.run_id = r.run_id AND e.excerpt_id = r.excerpt_id "
        "WHERE e.excerpt_id IS NULL"
    ).fetchall()[0][0]


# -- round trip --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collected(tmp_path_factory, subject, corpus_dir):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("roundtrip") / "store.duckdb"
    result = collect_into(path, subject, corpus_dir)
    return path, result


def test_round_trip_run_info(collected, subject, tiny_model, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    path, result = collected
    excerpts = cut_excerpts(CorpusSpec(str(corpus_dir)), subject.tokenizer, length=16)
    assert len(excerpts.excerpt_ids) >= 100
    assert not result.reused
    assert result.n_excerpts == len(excerpts.excerpt_ids)
    assert result.n_neurons == 3 * 48
    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert len(runs) == 1
        run = runs[0]
        assert run.run_id == result.run_id
        assert run.status == "complete"
        assert run.model == str(tiny_model)
        assert run.corpus == describe(CorpusSpec(str(corpus_dir)))
        assert run.layers == (0, 1, 2)
        assert run.neurons_per_layer == 48
        assert run.n_excerpts == len(excerpts.excerpt_ids)
        assert run.settings == fast_settings()
        assert run.dtype == "float32"
        assert run.shard == ""
        assert store.run().run_id == run.run_id  # newest complete run
        counts = store.run_counts(run.run_id)
        assert counts["neurons"] == 144
        assert 0 < counts["excerpts"] <= run.n_excerpts
        assert orphan_records(store) == 0
        assert store.neuron_stats(run.run_id, 3, 0) is None
        assert store.neuron_stats(run.run_id, 0, 48) is None
        with pytest.raises(StoreError, match="no run 99"):
            store.run(99)


def _exact_extremes(store: Store, run_id: int, layer: int, neuron: int) -> dict[tuple[str, int], tuple]:  # type: ignore[type-arg]
    """(kind, rank) -> (excerpt id, exact max, exact min, scale) as stored beside the int8 activations."""
    rows = store.con.execute(
        "SELECT kind, rank, excerpt_id, max_act, min_act, scale FROM records WHERE run_id = ? AND layer = ? "
        "AND neuron = ?", [run_id, layer, neuron]).fetchall()
    return {(r[0], r[1]): r[2:] for r in rows}


def test_round_trip_records(collected, subject, tiny_model, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoTokenizer

    path, result = collected
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # a fresh copy, not the collector's
    excerpts = cut_excerpts(CorpusSpec(str(corpus_dir)), tokenizer, length=16)
    by_id = dict(zip(excerpts.excerpt_ids.tolist(), excerpts.token_ids))
    with Store.open(path, read_only=True) as store:
        top = [(s.layer, s.index) for s in store.top_neurons(result.run_id, limit=3)]
        for layer, index in PROBES + top:
            stats = store.neuron_stats(result.run_id, layer, index)
            assert stats is not None and (stats.layer, stats.index) == (layer, index)
            assert stats.count == 16 * result.n_excerpts
            assert stats.min <= stats.mean <= stats.max
            records = store.records(result.run_id, layer, index)
            exact = _exact_extremes(store, result.run_id, layer, index)
            assert {(r.kind, r.rank) for r in records} == set(exact)
            kinds = [r.kind for r in records]
            assert kinds == sorted(kinds, key=("top", "bottom", "random", "quantile").index)
            tops = [r for r in records if r.kind == "top"]
            bottoms = [r for r in records if r.kind == "bottom"]
            randoms = [r for r in records if r.kind == "random"]
            assert [r.rank for r in tops] == list(range(5))
            assert len(bottoms) == 5 and len(randoms) == 4
            assert len({r.excerpt_id for r in randoms}) == 4
            # Exact extremes: top by max descending, bottom by min ascending, rank 0 = the neuron's max / min.
            top_max = [exact[("top", r)][1] for r in range(5)]
            bottom_min = [exact[("bottom", r)][2] for r in range(5)]
            assert top_max == sorted(top_max, reverse=True) and top_max[0] == stats.max
            assert bottom_min == sorted(bottom_min) and bottom_min[0] == stats.min
            for rec in records:
                ids = by_id[rec.excerpt_id]
                assert len(rec.tokens) == 16 and len(rec.activations) == 16
                assert list(rec.tokens) == [tokenizer.decode([int(t)]) for t in ids]
                fresh = subject.activations(torch.from_numpy(ids[None].astype(np.int64)), (layer,))[layer]
                fresh = fresh[0, :, index].numpy()
                _eid, ex_max, ex_min, scale = exact[(rec.kind, rec.rank)]
                np.testing.assert_allclose([ex_max, ex_min, scale], [fresh.max(), fresh.min(), np.abs(fresh).max()],
                                           rtol=1e-5, atol=1e-6)
                # Activations are stored as int8 codes of max|a|: off by at most half a step.
                step = scale / 127
                np.testing.assert_allclose(np.asarray(rec.activations, np.float32), fresh, rtol=0,
                                           atol=step / 2 * 1.001 + 1e-5)
                assert rec.max == pytest.approx(ex_max, abs=step / 2 * 1.001 + 1e-6)
            for rec in (r for r in records if r.kind == "quantile"):  # its exact max lies in its bin
                lo, hi = stats.quantile_edges[rec.bin], stats.quantile_edges[rec.bin + 1]
                assert lo <= exact[("quantile", rec.rank)][1] < hi


def test_record_extremes_match_neuron_stats_for_every_neuron(collected) -> None:  # type: ignore[no-untyped-def]
    path, result = collected
    with Store.open(path, read_only=True) as store:
        for layer in range(3):
            for index in range(48):
                stats = store.neuron_stats(result.run_id, layer, index)
                records = store.records(result.run_id, layer, index, kinds=("top", "bottom"))
                tops = [r.max for r in records if r.kind == "top"]
                bottoms = [r.min for r in records if r.kind == "bottom"]
                assert stats is not None
                assert (tops[0], bottoms[0]) == (stats.max, stats.min), f"L{layer}/N{index}"
                assert tops == sorted(tops, reverse=True), f"L{layer}/N{index}"
                assert bottoms == sorted(bottoms), f"L{layer}/N{index}"


def test_top_neurons_order(collected) -> None:  # type: ignore[no-untyped-def]
    path, result = collected
    with Store.open(path, read_only=True) as store:
        for order, attr in (("selectivity", "selectivity"), ("kurtosis", "kurtosis"), ("max", "max"),
                            ("density", "density")):
            rows = store.top_neurons(result.run_id, limit=10, order=order)
            values = [getattr(r, attr) for r in rows]
            assert len(rows) == 10 and values == sorted(values, reverse=True)
        with pytest.raises(StoreError, match="cannot order by"):
            store.top_neurons(result.run_id, order="max_act; DROP TABLE runs")


def test_parse_layers_and_shard() -> None:
    assert parse_layers(None, 3) == (0, 1, 2)
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers("0-1,2", 3) == (0, 1, 2)
    assert parse_layers("-1", 3) == (2,)
    for bad in ("7-2", "0-99", "x", "2-1", "3"):
        with pytest.raises(CollectError, match="invalid layer range"):
            parse_layers(bad, 3)
    assert parse_shard(None) == (0, 1)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("3/2", "2/2", "1", "a/b", "-1/2"):
        with pytest.raises(CollectError, match="invalid shard"):
            parse_shard(bad)


# -- reuse and separate runs -------------------------------------------------------------------------

def test_reuse_and_runs_never_mix(tmp_path, session_dir, subject, corpus_dir, other_corpus) -> None:  # type: ignore[no-untyped-def]
    from core.subject import load_subject

    path = tmp_path / "store.duckdb"
    base = fast_settings(max_excerpts=48)  # a sample keeps the eight collections below quick
    first = collect_into(path, subject, corpus_dir, settings=base)
    with Store.open(path, read_only=True) as store:
        before = run_rows(store, first.run_id)
    again = collect_into(path, subject, corpus_dir, settings=base)
    assert again.reused and again.run_id == first.run_id and again.n_excerpts == first.n_excerpts == 48
    with Store.open(path, read_only=True) as store:
        assert len(store.runs()) == 1

    wider = load_subject(str(build_tiny_model(session_dir / "wider-llama", intermediate_size=40)),
                         device="cpu", dtype="float32")
    variants = {
        "corpus": collect_into(path, subject, other_corpus, settings=base),
        "seed": collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48, seed=1)),
        "top_k": collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48, top_k=3)),
        "layers": collect_into(path, subject, corpus_dir, settings=base, layers=(1,)),
        "model": collect_into(path, wider, corpus_dir, settings=base),
        "forced": collect_into(path, subject, corpus_dir, settings=base, reuse=False),
    }
    ids = [first.run_id] + [r.run_id for r in variants.values()]
    assert len(set(ids)) == len(ids), "every changed input makes a new run"
    assert not any(r.reused for r in variants.values())
    with Store.open(path, read_only=True) as store:
        runs = {r.run_id: r for r in store.runs()}
        assert set(runs) == set(ids)
        assert all(r.status == "complete" for r in runs.values())
        assert run_rows(store, first.run_id) == before, "the first run's rows are untouched"
        assert orphan_records(store) == 0
        assert store.run_counts(variants["model"].run_id)["neurons"] == 3 * 40
        assert store.run_counts(variants["layers"].run_id)["neurons"] == 48
        n_top = store.con.execute("SELECT count(*) FROM records WHERE run_id = ? AND kind = 'top'",
                                  [variants["top_k"].run_id]).fetchall()[0][0]
        assert n_top == 3 * 144
        assert runs[variants["corpus"].run_id].corpus != runs[first.run_id].corpus
        assert store.run().run_id == max(ids)
        per_run = {r: store.run_counts(r) for r in ids}
    # Reuse still finds the right run among several.
    seeded = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48, seed=1))
    assert seeded.reused and seeded.run_id == variants["seed"].run_id
    with Store.open(path, read_only=True) as store:
        assert {r: store.run_counts(r) for r in ids} == per_run
        assert run_rows(store, first.run_id) == before


def test_different_weights_same_shape_make_a_new_run(tmp_path, session_dir, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    from core.subject import load_subject

    path = tmp_path / "store.duckdb"
    first = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48))
    other = load_subject(str(build_tiny_model(session_dir / "reseeded-llama", seed=1)), device="cpu", dtype="float32")
    second = collect_into(path, other, corpus_dir, settings=fast_settings(max_excerpts=48))
    assert not second.reused and second.run_id != first.run_id


# -- shards and merge --------------------------------------------------------------------------------

def _batch_invariant(subject, corpus: Path) -> bool:  # type: ignore[no-untyped-def]
    """Whether an excerpt's fp32 activations here do not depend on the other excerpts of its batch."""
    import torch

    ids = cut_excerpts(CorpusSpec(str(corpus)), subject.tokenizer, length=16).token_ids[:32].astype(np.int64)
    full = subject.activations(torch.from_numpy(ids), (0, 1, 2))
    half = subject.activations(torch.from_numpy(ids[1::2]), (0, 1, 2))
    return all(torch.equal(full[layer][1::2], half[layer]) for layer in range(3))


@pytest.fixture(scope="module")
def shard_stores(tmp_path_factory, subject, corpus_dir):  # type: ignore[no-untyped-def]
    """A single-run store and the two halves of the same collection (96 sampled excerpts). Exact
    comparisons need each excerpt's forward pass to be the same whichever batch it lands in: true
    for fp32 on the CPUs we know; elsewhere fall back to batches of one."""
    folder = tmp_path_factory.mktemp("shards")
    batch = 32 if _batch_invariant(subject, corpus_dir) else 1
    settings = fast_settings(max_excerpts=96, seed=3)
    single = folder / "single.duckdb"
    collect_into(single, subject, corpus_dir, settings=settings, batch_size=batch)
    parts = []
    for i in range(2):
        parts.append(folder / f"shard{i}.duckdb")
        result = collect_into(parts[-1], subject, corpus_dir, settings=settings, shard=(i, 2), batch_size=batch)
        assert not result.reused and result.n_excerpts == 48
    merged = folder / "merged.duckdb"
    with Store.open(parts[0], read_only=True) as s0, Store.open(parts[1], read_only=True) as s1:
        assert [r.shard for r in s0.runs()] == ["0/2"] and [r.shard for r in s1.runs()] == ["1/2"]
        with Store.open(merged) as out:
            stages: list[str] = []
            result = merge(out, [s1, s0], progress=lambda stage, _d, _t: stages.append(stage))
    assert "merge" in stages and "write" in stages
    return folder, single, parts, merged, result


NEURON_EXACT = ("layer", "neuron", "count", "max_act", "min_act", "min_excerpt_max", "histogram", "cell_counts")
NEURON_CLOSE = ("mean", "variance", "skewness", "kurtosis", "density", "sums")
RECORDS = ("SELECT layer, neuron, kind, rank, bin, excerpt_id, scale, acts, max_act, min_act FROM records "
           "WHERE run_id = ? ORDER BY layer, neuron, kind, rank")


def test_merge_equals_single_run(shard_stores) -> None:  # type: ignore[no-untyped-def]
    _folder, single_path, _parts, merged_path, result = shard_stores
    with Store.open(single_path, read_only=True) as single, Store.open(merged_path, read_only=True) as merged:
        (one,), (two,) = single.runs(), merged.runs()
        assert two.run_id == result.run_id and two.status == "complete" and two.shard == ""
        assert (two.model_revision, two.corpus, two.settings, two.layers, two.neurons_per_layer, two.n_excerpts) == (
            one.model_revision, one.corpus, one.settings, one.layers, one.neurons_per_layer, one.n_excerpts)
        assert result.n_excerpts == one.n_excerpts == 96

        cols = ", ".join(NEURON_EXACT + NEURON_CLOSE)
        query = f"SELECT {cols} FROM neurons WHERE run_id = ? ORDER BY layer, neuron"
        a = single.con.execute(query, [one.run_id]).fetchall()
        b = merged.con.execute(query, [two.run_id]).fetchall()
        assert len(a) == len(b) == 144
        n_exact = len(NEURON_EXACT)
        for row_a, row_b in zip(a, b):
            assert row_a[:n_exact] == row_b[:n_exact], (row_a[:2], row_b[:2])
            np.testing.assert_allclose(np.array(row_a[n_exact:-1], float), np.array(row_b[n_exact:-1], float),
                                       rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(row_a[-1], row_b[-1], rtol=1e-9)

        # Top, bottom and random records: same excerpt at every (layer, neuron, kind, rank), same activations.
        rec_a = [r[:8] for r in single.con.execute(RECORDS, [one.run_id]).fetchall() if r[2] != "quantile"]
        rec_b = [r[:8] for r in merged.con.execute(RECORDS, [two.run_id]).fetchall() if r[2] != "quantile"]
        assert {r[2] for r in rec_b} == {"top", "bottom", "random"}  # no shard-only 'cell' rows
        assert len(rec_a) == 144 * 14 and rec_a == rec_b
        assert orphan_records(merged) == 0


def test_merge_equals_single_run_exactly(shard_stores) -> None:  # type: ignore[no-untyped-def]
    _folder, single_path, _parts, merged_path, _result = shard_stores
    with Store.open(single_path, read_only=True) as single, Store.open(merged_path, read_only=True) as merged:
        (one,), (two,) = single.runs(), merged.runs()
        query = "SELECT layer, neuron, quantile_edges, selectivity FROM neurons WHERE run_id = ? ORDER BY layer, neuron"
        a = single.con.execute(query, [one.run_id]).fetchall()
        b = merged.con.execute(query, [two.run_id]).fetchall()
        assert [r[:3] for r in a] == [r[:3] for r in b]
        np.testing.assert_allclose([r[3] for r in a], [r[3] for r in b], rtol=1e-6)
        assert single.con.execute(RECORDS, [one.run_id]).fetchall() == merged.con.execute(RECORDS, [two.run_id]).fetchall()
        query = "SELECT excerpt_id, token_ids, tokens FROM excerpts WHERE run_id = ? ORDER BY excerpt_id"
        assert single.con.execute(query, [one.run_id]).fetchall() == merged.con.execute(query, [two.run_id]).fetchall()


def _merge_error(out_path: Path, shard_paths: list[Path]) -> str:
    with Store.open(out_path) as out:
        shards = [Store.open(p, read_only=True) for p in shard_paths]
        try:
            with pytest.raises(CollectError) as info:
                merge(out, shards)
        finally:
            for s in shards:
                s.close()
        assert out.runs() == [], "a refused merge leaves no run behind"
    message = str(info.value)
    assert "\n" not in message
    return message


def test_merge_errors(shard_stores, tmp_path, subject, other_corpus) -> None:  # type: ignore[no-untyped-def]
    _folder, single_path, parts, _merged, _result = shard_stores
    copy = tmp_path / "shard0-copy.duckdb"
    shutil.copyfile(parts[0], copy)

    message = _merge_error(tmp_path / "a.duckdb", [parts[0]])
    assert "missing 1/2" in message and "every shard" in message
    message = _merge_error(tmp_path / "b.duckdb", [parts[0], copy, parts[1]])
    assert "twice" in message
    message = _merge_error(tmp_path / "c.duckdb", [parts[0], copy])
    assert "missing 1/2" in message

    foreign = tmp_path / "other-shard1.duckdb"
    collect_into(foreign, subject, other_corpus, settings=fast_settings(max_excerpts=96, seed=3), shard=(1, 2))
    message = _merge_error(tmp_path / "d.duckdb", [parts[0], foreign])
    assert "corpus" in message and "differ" in message

    message = _merge_error(tmp_path / "e.duckdb", [parts[0], single_path])
    assert "no complete shard run" in message and "--shard" in message


def test_merge_shards_of_the_same_text_at_different_paths(shard_stores, tmp_path, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    _folder, _single, parts, _merged, _result = shard_stores
    copy = shutil.copytree(corpus_dir, tmp_path / "elsewhere")
    other_half = tmp_path / "shard1-elsewhere.duckdb"
    collect_into(other_half, subject, copy, settings=fast_settings(max_excerpts=96, seed=3), shard=(1, 2))
    with Store.open(parts[0], read_only=True) as s0, Store.open(other_half, read_only=True) as s1:
        with Store.open(tmp_path / "merged.duckdb") as out:
            result = merge(out, [s0, s1])
            assert out.run(result.run_id).status == "complete"


# -- version checks and foreign files ----------------------------------------------------------------

def _set_version(path: Path, value: str) -> None:
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [value])
    con.close()


@pytest.mark.parametrize("read_only", [False, True])
def test_newer_and_older_schema(tmp_path, read_only) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "store.duckdb"
    Store.open(path).close()
    with Store.open(path, read_only=True) as store:
        assert store.runs() == []
        assert store.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)]

    _set_version(path, str(SCHEMA_VERSION + 1))
    with pytest.raises(StoreError) as info:
        Store.open(path, read_only=read_only)
    message = str(info.value)
    assert "newer" in message and "upgrade" in message.lower() and "\n" not in message
    # The refused store is left as it was: still the newer version, still openable by duckdb.
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION + 1),)]
    con.close()

    _set_version(path, str(SCHEMA_VERSION - 1))
    with pytest.raises(StoreError) as info:
        Store.open(path, read_only=read_only)
    assert "older" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("read_only", [False, True])
def test_duckdb_file_without_meta(tmp_path, read_only) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE things (x INTEGER)")
    con.execute("INSERT INTO things VALUES (1), (2)")
    con.close()
    with pytest.raises(StoreError, match="not a neuronscope store"):
        Store.open(path, read_only=read_only)
    con = duckdb.connect(str(path), read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert tables == {"things"}, "a foreign DuckDB file gets no tables of ours"


FOREIGN = {
    "text": b"just some notes\nnothing to see here\n" * 40,
    "short-text": b"hi\n",
    "random": np.random.default_rng(0).bytes(20_000),
    "parquet-ish": b"PAR1" + bytes(range(256)) * 8,
}


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_non_duckdb_file_is_refused_and_unchanged(tmp_path, kind, read_only) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "notes.duckdb"
    path.write_bytes(FOREIGN[kind])
    with pytest.raises(StoreError) as info:
        Store.open(path, read_only=read_only)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == FOREIGN[kind]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb"], "no WAL or other file left beside it"


def test_folder_and_missing_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreError, match="folder"):
        Store.open(tmp_path)
    with pytest.raises(StoreError, match="folder"):
        Store.open(tmp_path, read_only=True)
    missing = tmp_path / "missing.duckdb"
    with pytest.raises(StoreError, match="neuronscope collect"):
        Store.open(missing, read_only=True)
    with pytest.raises(StoreError, match="neuronscope collect"):
        Store.open(missing, create=False)
    assert not missing.exists()
    with pytest.raises(StoreError):
        Store.open(tmp_path / "no-such-folder" / "s.duckdb")


# -- the one-writer lock -----------------------------------------------------------------------------

@pytest.mark.parametrize("read_only", [False, True])
def test_store_in_use_by_another_process(tmp_path, read_only) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "store.duckdb"
    Store.open(path).close()
    code = f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError) as info:
            Store.open(path, read_only=read_only)
        message = str(info.value)
        assert f"in use by PID {child.pid}" in message and "\n" not in message
    finally:
        child.kill()
        child.wait()
    with Store.open(path) as store:  # free again once the other process is gone
        assert store.runs() == []


# -- interrupted collections -------------------------------------------------------------------------

class Collector:
    """`neuronscope collect` in a subprocess, with its stderr read line by line in a thread."""

    def __init__(self, args: list[object]) -> None:
        self.proc = subprocess.Popen(cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=cli_env(), cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"collect ended early: {''.join(self.seen)}"
                continue
            self.seen.append(line)
            if needle in line:
                return
        raise AssertionError(f"no {needle!r} on stderr after {timeout} s: {''.join(self.seen)}")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        # stderr has exactly one reader (the thread), so its lines keep their order.
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, out, "".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _start_long_collect(path: Path, model: Path, corpus: Path) -> Collector:
    collector = Collector(["collect", "--model", model, "--corpus", corpus, "--store", path, *FAST,
                           "--batch-size", "1"])
    collector.wait_for(", batch 1")  # the last status line before the run is registered
    time.sleep(1.5)  # well inside the loop: the full pass takes ~30 s at batch size 1
    assert collector.proc.poll() is None, "the collection ended before it could be interrupted"
    return collector


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted(tmp_path, subject, tiny_model, corpus_dir, big_corpus) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "store.duckdb"
    done = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48))
    with Store.open(path, read_only=True) as store:
        before = run_rows(store, done.run_id)
    collector = _start_long_collect(path, tiny_model, big_corpus)
    try:
        collector.proc.send_signal(signal.SIGINT)
        code, out, err = collector.finish()
    finally:
        collector.kill()
    assert code == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "run the same command again" in last, err
    assert sum("interrupted" in line for line in err.splitlines()) == 1
    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert [r.status for r in runs] == ["complete", "interrupted"]
        assert runs[1].corpus == describe(CorpusSpec(str(big_corpus)))
        assert runs[1].error == "interrupted by the user"
        assert store.run_counts(runs[1].run_id) == {"neurons": 0, "records": 0, "excerpts": 0}
        assert run_rows(store, done.run_id) == before
        assert store.run().run_id == done.run_id, "the newest complete run is still the old one"


@pytest.mark.slow
def test_kill_9_leaves_an_openable_store(tmp_path, subject, tiny_model, corpus_dir, big_corpus) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "store.duckdb"
    done = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48))
    with Store.open(path, read_only=True) as store:
        before = run_rows(store, done.run_id)
    collector = _start_long_collect(path, tiny_model, big_corpus)
    killed_pid = collector.proc.pid
    collector.proc.send_signal(signal.SIGKILL)
    collector.kill()  # reaps it: a zombie would still look alive
    assert collector.proc.returncode == -signal.SIGKILL

    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert [r.status for r in runs] == ["complete", "interrupted"]
        stale = runs[1].run_id
        raw = store.con.execute("SELECT status, pid FROM runs WHERE run_id = ?", [stale]).fetchall()
        assert raw == [("running", killed_pid)], "nothing has rewritten the row yet; runs() derives the status"
        assert store.run_counts(stale) == {"neurons": 0, "records": 0, "excerpts": 0}
        assert run_rows(store, done.run_id) == before

    info = run_cli(["info", "--store", path])
    assert info.code == 0, info.err
    assert "interrupted" in info.out and "complete" in info.out

    # The same collection again (in-process: same model, corpus, settings and layers as the CLI's).
    again = collect_into(path, subject, big_corpus)
    assert not again.reused
    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert [r.status for r in runs] == ["complete", "interrupted", "complete"]
        raw = store.con.execute("SELECT status, error FROM runs WHERE run_id = ?", [stale]).fetchall()
        assert raw[0][0] == "interrupted" and "stopped" in raw[0][1], "mark_stale_runs rewrote the stale run"
        assert store.run_counts(stale) == {"neurons": 0, "records": 0, "excerpts": 0}
        assert store.run_counts(runs[2].run_id)["neurons"] == 144
        assert (runs[2].model_revision, runs[2].corpus, runs[2].settings, runs[2].layers) == (
            runs[1].model_revision, runs[1].corpus, runs[1].settings, runs[1].layers)
        assert run_rows(store, done.run_id) == before
        assert orphan_records(store) == 0


def test_mark_stale_runs_only_touches_dead_writers(tmp_path, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    from core.records import CollectSettings

    path = tmp_path / "store.duckdb"
    done = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        with Store.open(path) as store:
            live = store.create_run(model="m", revision="r", corpus="c", settings=CollectSettings(), layers=(0,),
                                    neurons_per_layer=4, dtype="float32")
            dead = store.create_run(model="m", revision="r", corpus="c", settings=CollectSettings(), layers=(0,),
                                    neurons_per_layer=4, dtype="float32")
            store.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [sleeper.pid, live])
            store.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [gone.pid, dead])
            store.mark_stale_runs()
            status = dict(store.con.execute("SELECT run_id, status FROM runs").fetchall())
            assert status == {done.run_id: "complete", live: "running", dead: "interrupted"}
            assert {r.run_id: r.status for r in store.runs()}[live] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.path.exists(path)
