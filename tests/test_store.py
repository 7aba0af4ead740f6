"""The store on a tiny random-weight Llama: collection round trip, reuse and separate runs,
schema-version checks and foreign files, and the one-writer lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import (
    build_tiny_model,
    collect_into,
    fast_settings,
    orphan_records,
    run_rows,
)

from neuronscope.core.collection.collect import CollectError, parse_shard
from neuronscope.core.collection.corpus import CorpusSpec, describe
from neuronscope.core.collection.excerpts import cut_excerpts
from neuronscope.core.store import SCHEMA_VERSION, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
PROBES = [(0, 0), (0, 17), (1, 3), (1, 40), (2, 11), (2, 47)]



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
        assert run.corpus.startswith(describe(CorpusSpec(str(corpus_dir))) + " (all ")
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
        for order, attr, largest_first in (("selectivity", "selectivity", True), ("kurtosis", "kurtosis", True),
                                           ("max", "max", True), ("min", "min", False), ("density", "density", False)):
            rows = store.top_neurons(result.run_id, limit=10, order=order)
            values = [getattr(r, attr) for r in rows]
            assert len(rows) == 10 and values == sorted(values, reverse=largest_first), order
        shuffled = store.top_neurons(result.run_id, limit=10, order="random", seed=1)
        assert shuffled == store.top_neurons(result.run_id, limit=10, order="random", seed=1) != \
            store.top_neurons(result.run_id, limit=10, order="random", seed=2)
        with pytest.raises(StoreError, match="cannot order by"):
            store.top_neurons(result.run_id, order="max_act; DROP TABLE runs")


def test_parse_shard() -> None:
    assert parse_shard(None) == (0, 1)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("3/2", "2/2", "1", "a/b", "-1/2"):
        with pytest.raises(CollectError, match="invalid shard"):
            parse_shard(bad)


# -- reuse and separate runs -------------------------------------------------------------------------

def test_reuse_and_runs_never_mix(tmp_path, session_dir, subject, corpus_dir, other_corpus) -> None:  # type: ignore[no-untyped-def]
    from neuronscope.core.models.loading import load_subject

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
    from neuronscope.core.models.loading import load_subject

    path = tmp_path / "store.duckdb"
    first = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=48))
    other = load_subject(str(build_tiny_model(session_dir / "reseeded-llama", seed=1)), device="cpu", dtype="float32")
    second = collect_into(path, other, corpus_dir, settings=fast_settings(max_excerpts=48))
    assert not second.reused and second.run_id != first.run_id


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

    _set_version(path, "0")
    with pytest.raises(StoreError) as info:
        Store.open(path, read_only=read_only)
    assert "older" in str(info.value) and "\n" not in str(info.value)


#: Version 1's placeholder result tables (that version never wrote them).
_V1_TABLES = """
DROP TABLE explanations; DROP TABLE simulations; DROP TABLE scores; DROP TABLE llm_calls; DROP TABLE jobs;
DROP TABLE job_neurons;
CREATE TABLE explanations (explanation_id BIGINT, run_id INTEGER, layer SMALLINT, neuron INTEGER, tail VARCHAR,
    explainer VARCHAR, prompt_hash VARCHAR, text VARCHAR, job_id BIGINT, created_at TIMESTAMP);
CREATE TABLE simulations (explanation_id BIGINT, simulator VARCHAR, excerpt_id BIGINT, kind VARCHAR, predicted REAL[]);
CREATE TABLE scores (explanation_id BIGINT, simulator VARCHAR, method VARCHAR, split VARCHAR, value DOUBLE);
CREATE TABLE llm_calls (call_id BIGINT, cache_key VARCHAR, prompt VARCHAR, response VARCHAR);
CREATE TABLE jobs (job_id BIGINT, kind VARCHAR, params VARCHAR, state VARCHAR);
UPDATE meta SET value = '1' WHERE key = 'schema_version';
"""


def test_version_1_store_is_upgraded_in_place_by_a_writer(tmp_path, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "v1.duckdb"
    info = collect_into(path, subject, corpus_dir, settings=fast_settings(max_excerpts=24))
    with Store.open(path) as store:
        before = run_rows(store, info.run_id)
    con = duckdb.connect(str(path))
    con.execute(_V1_TABLES)
    con.close()
    with pytest.raises(StoreError, match="schema version 1.*writing command"):
        Store.open(path, read_only=True)
    with Store.open(path) as store:  # a writer upgrades it; the collection is untouched
        assert run_rows(store, info.run_id) == before
        assert store.jobs() == [] and store.explanations(info.run_id, 0, 0) == []
    with Store.open(path, read_only=True) as store:
        assert store.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)]


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


def test_records_decoded_together_equal_one_at_a_time() -> None:
    """decode_many (a job's prefetch) gives each record exactly what decode gives it, one length or mixed."""
    from neuronscope.core.store.rows import decode, decode_many

    rng = np.random.default_rng(0)
    for widths in ([16] * 40, [16, 8, 16, 3]):
        blobs = [rng.integers(-127, 128, w, dtype=np.int8).tobytes() for w in widths]
        scales = rng.uniform(0.01, 30, len(widths)).tolist()
        assert decode_many(scales, blobs) == [decode(s, b).tolist() for s, b in zip(scales, blobs)]
    assert decode_many([], []) == []
