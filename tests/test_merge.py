"""Shards and merge: shard states merged into one store equal a single-run store; merge refusals; --device-map."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FAST,
    NEURON_CLOSE,
    NEURON_EXACT,
    RECORDS,
    assert_one_line_error,
    assert_same_collection,
    cli_env,
    collect_into,
    fast_settings,
    orphan_records,
    run_cli,
    run_rows,
)

from neuronscope.core.collection.collect import CollectError
from neuronscope.core.collection.corpus import CorpusSpec
from neuronscope.core.collection.excerpts import cut_excerpts
from neuronscope.core.collection.merge import merge
from neuronscope.core.collection.state import ShardState, StateError
from neuronscope.core.collection.store_write import write_run
from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
PROBES = [(0, 0), (0, 17), (1, 3), (1, 40), (2, 11), (2, 47)]



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
    """A single-run store and the two halves' shard states of the same collection (96 sampled excerpts). Exact
    comparisons need each excerpt's forward pass to be the same whichever batch it lands in: true
    for fp32 on the CPUs we know; elsewhere fall back to batches of one."""
    folder = tmp_path_factory.mktemp("shards")
    batch = 32 if _batch_invariant(subject, corpus_dir) else 1
    settings = fast_settings(max_excerpts=96, seed=3)
    single = folder / "single.duckdb"
    collect_into(single, subject, corpus_dir, settings=settings, batch_size=batch)
    parts = []
    for i in range(2):
        parts.append(folder / f"merged.shard-{i}-of-2")
        result = collect_into(parts[-1], subject, corpus_dir, settings=settings, shard=(i, 2), batch_size=batch)
        assert not result.reused and result.n_excerpts == 48 and result.run_id is None
    assert [ShardState(p).meta.index for p in parts] == [0, 1]
    merged = folder / "merged.duckdb"
    with Store.open(merged) as out:
        stages: list[str] = []
        result = merge(out, [ShardState(parts[1]), ShardState(parts[0])],
                       progress=lambda stage, _d, _t: stages.append(stage))
    assert "merge" in stages and "write" in stages
    return folder, single, parts, merged, result


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


def test_characters_split_between_tokens_read_whole_after_a_merge(tmp_path, subject) -> None:  # type: ignore[no-untyped-def]
    """Text in other scripts, whose characters the tiny model's tokens split into bytes: every excerpt's tokens read
    as the text (the tokens before a character's last byte ''), in one run and after a merge alike."""
    corpus = tmp_path / "scripts.txt"
    corpus.write_text("\n\n".join(f"{i}: שלום עולם, 中文的文本 😀 naïve café. " * 3 for i in range(40)), encoding="utf-8")
    settings = fast_settings(max_excerpts=24, seed=1)
    collect_into(tmp_path / "one.duckdb", subject, corpus, settings=settings, batch_size=8)
    parts = [tmp_path / f"two.shard-{i}-of-2" for i in range(2)]
    for i, part in enumerate(parts):
        collect_into(part, subject, corpus, settings=settings, shard=(i, 2), batch_size=8)
    with Store.open(tmp_path / "two.duckdb") as out:
        merge(out, [ShardState(p) for p in parts])
    query = "SELECT excerpt_id, token_ids, tokens FROM excerpts ORDER BY excerpt_id"
    with Store.open(tmp_path / "one.duckdb", read_only=True) as one, Store.open(tmp_path / "two.duckdb") as two:
        rows = one.con.execute(query).fetchall()
        assert rows == two.con.execute(query).fetchall()
    tokens = [t for row in rows for t in row[2]]
    assert "" in tokens and "中" in tokens and "😀" in tokens
    for _, ids, texts in rows:  # U+FFFD only where an excerpt starts or ends inside a character
        assert "".join(texts) == subject.tokenizer.decode(ids) and "\ufffd" not in "".join(texts).strip("\ufffd")


def test_a_failed_write_leaves_nothing(shard_stores, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A layer is prepared in a second thread while the one before it is inserted: an error there reaches the
    caller, and the layers already inserted are taken back with the rest of the run's rows."""
    _folder, _single, parts, _merged, _result = shard_stores
    shard = ShardState(parts[0])
    meta = shard.meta
    layers = [shard.layer(layer) for layer in meta.layers]
    samples = {kind: value for kind, value in layers[-1].samples.items() if kind != "cell"}
    damaged = dataclasses.replace(layers[-1], samples=samples)  # summarising it fails
    with Store.open(tmp_path / "out.duckdb") as out:
        run_id = out.create_run(
            model=meta.model, revision=meta.revision, corpus=meta.corpus, settings=meta.settings, layers=meta.layers,
            neurons_per_layer=meta.neurons_per_layer, dtype=meta.dtype, shard="", units=meta.units)
        written: list[int] = []
        with pytest.raises(KeyError, match="cell"):
            write_run(out, run_id, [*layers[:-1], damaged], len(layers), meta.settings, n_excerpts=meta.n_excerpts,
                      excerpts=shard.excerpts, progress=lambda _stage, done, _total: written.append(done))
        assert written == list(range(1, len(layers)))  # every layer before the damaged one was inserted
        assert run_rows(out, run_id) == {"neurons": [], "records": [], "excerpts": []}
        write_run(out, run_id, layers, len(layers), meta.settings, n_excerpts=meta.n_excerpts,
                  excerpts=shard.excerpts, progress=lambda _stage, _done, _total: None)
        rows = run_rows(out, run_id)
        assert len(rows["neurons"]) == len(layers) * meta.neurons_per_layer and orphan_records(out) == 0


def _merge_error(out_path: Path, shard_paths: list[Path]) -> str:
    with Store.open(out_path) as out:
        with pytest.raises(CollectError) as info:
            merge(out, [ShardState(p) for p in shard_paths])
        assert out.runs() == [], "a refused merge leaves no run behind"
    message = str(info.value)
    assert "\n" not in message
    return message


def test_merge_errors(shard_stores, tmp_path, subject, other_corpus) -> None:  # type: ignore[no-untyped-def]
    _folder, single_path, parts, _merged, _result = shard_stores
    copy = shutil.copytree(parts[0], tmp_path / "shard0-copy")

    message = _merge_error(tmp_path / "a.duckdb", [parts[0]])
    assert "missing 1/2" in message and "every shard" in message
    message = _merge_error(tmp_path / "b.duckdb", [parts[0], copy, parts[1]])
    assert "twice" in message
    message = _merge_error(tmp_path / "c.duckdb", [parts[0], copy])
    assert "missing 1/2" in message
    other_split = shutil.copytree(parts[1], tmp_path / "of-3")  # what `--shard 1/3` of the same collection writes
    meta = json.loads((other_split / "meta.json").read_text())
    (other_split / "meta.json").write_text(json.dumps({**meta, "count": 3}))
    message = _merge_error(tmp_path / "g.duckdb", [parts[0], other_split])
    assert message == "shards of different splits (of 2, of 3): pass the shard states of one split, every i/n for one n"

    foreign = tmp_path / "other-shard1"
    collect_into(foreign, subject, other_corpus, settings=fast_settings(max_excerpts=96, seed=3), shard=(1, 2))
    message = _merge_error(tmp_path / "d.duckdb", [parts[0], foreign])
    assert message.startswith("shard 1/2 differs from shard 0/2 in its corpus: merge shards of one"), message

    with pytest.raises(StateError, match="is a file, not a shard state: `collect --shard i/n --store S` writes"):
        ShardState(single_path)
    with pytest.raises(StateError, match="no shard state at"):
        ShardState(tmp_path / "nowhere")
    with pytest.raises(StateError, match="not a shard state this neuronscope reads"):
        ShardState(tmp_path)
    damaged = shutil.copytree(parts[1], tmp_path / "damaged")
    (damaged / "layer-1.npz").write_bytes(b"not a layer")
    with Store.open(tmp_path / "f.duckdb") as out:
        with pytest.raises(StateError, match="layer 1 cannot be read .* damaged; collect that shard again"):
            merge(out, [ShardState(parts[0]), ShardState(damaged)])
        assert [r.status for r in out.runs()] == ["failed"]  # marked, never complete


def test_merge_shards_of_the_same_text_at_different_paths(shard_stores, tmp_path, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    _folder, _single, parts, _merged, _result = shard_stores
    copy = shutil.copytree(corpus_dir, tmp_path / "elsewhere")
    other_half = tmp_path / "shard1-elsewhere"
    collect_into(other_half, subject, copy, settings=fast_settings(max_excerpts=96, seed=3), shard=(1, 2))
    with Store.open(tmp_path / "merged.duckdb") as out:
        result = merge(out, [ShardState(parts[0]), ShardState(other_half)])
        assert result.run_id is not None and out.run(result.run_id).status == "complete"


def test_merging_the_same_shards_again_adds_no_second_run(shard_stores) -> None:  # type: ignore[no-untyped-def]
    _folder, _single, parts, merged_path, first = shard_stores
    with Store.open(merged_path) as out:
        before = (len(out.runs()), out.counts())
        again = merge(out, [ShardState(p) for p in parts])
        assert again.reused and again.run_id == first.run_id
        assert (len(out.runs()), out.counts()) == before


def test_shards_with_no_excerpts_merge_into_the_single_run(tmp_path, subject, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    """More shards than excerpts (more ranks than a small corpus fills): the empty shards write empty states, and
    the merge of all equals one process's collection."""
    settings = fast_settings(max_excerpts=3, seed=1)
    collect_into(tmp_path / "single.duckdb", subject, corpus_dir, settings=settings, batch_size=1)
    parts = [tmp_path / f"all.shard-{i}-of-5" for i in range(5)]
    sizes = [collect_into(part, subject, corpus_dir, settings=settings, shard=(i, 5), batch_size=1).n_excerpts
             for i, part in enumerate(parts)]
    assert sorted(sizes) == [0, 0, 1, 1, 1]
    with Store.open(tmp_path / "all.duckdb") as out:
        assert merge(out, [ShardState(p) for p in parts]).n_excerpts == 3
    assert_same_collection(tmp_path / "single.duckdb", tmp_path / "all.duckdb")


def test_a_merge_waits_for_a_process_that_has_the_store_open(shard_stores, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Rank 0 of a launch merges the shards unattended, and `neuronscope merge` as well: a store open in another
    process (the app) is waited for, naming it, rather than failing after hours of collecting."""
    from neuronscope.tui.cli_store import merge_shards

    _folder, _single, parts, _merged, _result = shard_stores
    out = tmp_path / "held.duckdb"
    Store.open(out).close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from neuronscope.core.store import Store; "
                               "s = Store.open(sys.argv[1], read_only=True); print('open', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        threading.Timer(1.0, holder.kill).start()  # the person closes the app a moment later
        result = merge_shards(parts, out)
    finally:
        holder.kill()
        holder.wait()
    assert not result.reused and result.n_excerpts == 96
    said = " ".join(capsys.readouterr().err.split())
    assert f"the shards are done; they are merged into {out} once PID {holder.pid} (-c import sys" in said, said


def test_a_shard_writes_its_state_beside_the_store_and_says_how_to_merge(tiny_model: Path, corpus_dir: Path,
                                                                         tmp_path: Path) -> None:
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "32", "--shard", "1/2",
            "--store", tmp_path / "all.duckdb", *FAST]
    first = run_cli(args, timeout=300)
    assert first.code == 0, first.err
    state = ShardState(tmp_path / "all.shard-1-of-2")
    assert (state.meta.index, state.meta.count, state.meta.n_excerpts) == (1, 2, 16)
    assert not (tmp_path / "all.duckdb").exists()  # no store until the merge
    assert len(list((tmp_path / "all.tokens").glob("*.npy"))) == 1  # the corpus's token ids, for the other shards
    assert f"neuronscope merge {tmp_path / 'all.shard-*-of-2'} --output {tmp_path / 'all.duckdb'}" in " ".join(
        first.err.split())
    again = run_cli(args, timeout=300)
    assert again.code == 0 and "already holds this collection" in again.err
    # A changed command does not replace a finished shard unasked (--force does).
    changed = run_cli([*args, "--seed", "1"], timeout=300)
    assert changed.code == 2 and changed.err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'all.shard-1-of-2'} holds shard 1/2 of another collection, with other settings "
        "(--seed 0, not 1): merge it or move it away first, or pass --force to replace it"), changed.err
    assert ShardState(tmp_path / "all.shard-1-of-2").meta.settings.seed == 0
    assert run_cli([*args, "--seed", "1", "--force"], timeout=300).code == 0
    assert ShardState(tmp_path / "all.shard-1-of-2").meta.settings.seed == 1
    missing = run_cli(["merge", "--output", tmp_path / "all.duckdb"])
    assert_one_line_error(missing, "missing 0/2", "pass every shard state once")


def test_device_map_collects_what_one_device_collects(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """`--device-map auto` (accelerate) places the model; on a machine without GPUs everything lands on the CPU, and
    the collection equals one without it. `--device` with it is refused."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "48", "--batch-size", "16",
            *[a for a in FAST if a not in ("--device", "cpu")]]
    plain, mapped = tmp_path / "plain.duckdb", tmp_path / "mapped.duckdb"
    assert run_cli([*args, "--store", plain], timeout=300).code == 0
    result = run_cli([*args, "--store", mapped, "--device-map", "auto"], timeout=300)
    assert result.code == 0, result.err
    assert_same_collection(plain, mapped)
    both = run_cli([*args, "--store", tmp_path / "both.duckdb", "--device-map", "auto", "--device", "cpu"])
    assert_one_line_error(both, "--device and --device-map both place the model: pass one of them")
