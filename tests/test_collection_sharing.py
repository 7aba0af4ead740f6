"""A collection's pass leaves its store to other processes (the app, `info`, jobs), and its write waits for
whoever holds the store when the pass ends: the state saved first, so stopping the wait costs no collecting."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from collector import Collector
from conftest import FAST, assert_one_line_error, run_cli

from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


ARGS = [*FAST, "--batch-size", "1", "--max-excerpts", "1500", "--checkpoint-every", "1s"]


def _a_store(path: Path, tiny_model: Path, big_corpus: Path) -> None:
    assert run_cli(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", path, *FAST,
                    "--max-excerpts", "32"], timeout=300).code == 0


def _in_its_pass(collector: Collector, store: Path) -> Collector:
    """The collection once its pass runs (its first checkpoint is written)."""
    deadline = time.monotonic() + 300
    while not (store.parent / f"{store.name}.checkpoint" / "current").exists() and time.monotonic() < deadline:
        assert collector.proc.poll() is None, collector.finish()[2]
        time.sleep(0.01)
    return collector


@pytest.mark.slow
def test_a_collection_starts_while_the_app_has_its_store_open_and_writes_once_it_closes(
        tmp_path: Path, tiny_model: Path, big_corpus: Path) -> None:
    """A store open in another process (the app, say, open until the person closes it) takes a collection: it says
    so, `info` reads the store during the pass and names the collection in progress, and when the pass ends the
    collection names the process it waits for, with its saved state, and writes its run once the store is closed."""
    path = tmp_path / "s.duckdb"
    _a_store(path, tiny_model, big_corpus)
    reader = Store.open(path, read_only=True)
    try:
        collector = Collector(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", path, *ARGS])
        try:
            collector.wait_for(f"is open in PID {os.getpid()} (", timeout=300)
            assert collector.seen[-1].rstrip().endswith("the collection registers its run when it writes the store")
            _in_its_pass(collector, path)
            info = run_cli(["info", "--store", path])
            assert info.code == 0, info.err
            assert f"{path}.checkpoint holds the state of a collection in progress, saved after " in info.out, info.out
            assert f" by PID {collector.proc.pid} (" in info.out, info.out
            assert [r.status for r in reader.runs()] == ["complete"]
            collector.wait_for(f"once PID {os.getpid()} (", timeout=300)
            said = collector.seen[-1]
            assert f"its state is in {path}.checkpoint, so stopping now loses nothing" in said, said
            time.sleep(2)
            assert collector.proc.poll() is None, "the collection did not wait for the store"
        except BaseException:
            collector.kill()
            raise
    finally:
        reader.close()
    try:
        code, _out, err = collector.finish(timeout=300)
    finally:
        collector.kill()
    assert code == 0, err
    assert "Traceback" not in err
    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert [(r.status, r.n_excerpts) for r in runs] == [("complete", 32), ("complete", 1500)]
    assert not (tmp_path / "s.duckdb.checkpoint").exists()


@pytest.mark.slow
def test_ctrl_c_while_the_write_waits_keeps_the_pass_for_the_same_command(
        tmp_path: Path, tiny_model: Path, big_corpus: Path) -> None:
    """A collection started on a free store shows in `info` as running, and a second collection into the store is
    refused meanwhile; a process that opens the store during the pass holds up the write, and Ctrl-C then exits 130 with the state saved: the same command later only writes
    it (no excerpt collected again)."""
    path = tmp_path / "s.duckdb"
    _a_store(path, tiny_model, big_corpus)
    args = ["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", path, *ARGS]
    collector = _in_its_pass(Collector(args), path)
    try:
        # A second collection into the store would share its checkpoints: refused while this one runs.
        second = run_cli([*args[:-2], "--layers", "1"], timeout=300)
        assert_one_line_error(second, f"another collection into {path} is in progress (PID {collector.proc.pid} (")
        assert (tmp_path / "s.duckdb.checkpoint" / "current").exists()
        with Store.open(path, read_only=True) as reader:
            info = run_cli(["info", "--store", path])
            assert info.code == 0, info.err
            assert "run 2  running (collecting: its data lands when the pass ends)" in info.out, info.out
            assert_one_line_error(run_cli(["top", "--run", "2", "--store", path]),
                                  "run 2 is running, and holds no neuron yet: it is being collected")
            assert [r.status for r in reader.runs()] == ["complete", "running"]
            collector.wait_for("once PID", timeout=300)
            collector.proc.send_signal(signal.SIGINT)
            code, _out, err = collector.finish(timeout=60)
    finally:
        collector.kill()
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the collection's state after 1,500 of 1,500 excerpts is in "
                                            f"{path}.checkpoint: the same command goes on from there"), err
    with Store.open(path, read_only=True) as store:  # a run it could not mark: interrupted, as its process is gone
        assert [r.status for r in store.runs()] == ["complete", "interrupted"]
    again = run_cli(args[:-2], timeout=300, NEURONSCOPE_PROGRESS_SECONDS="0")
    assert again.code == 0, again.err
    assert "resumed from a checkpoint (excerpts): 1,500/1,500" in again.err, again.err
    with Store.open(path, read_only=True) as store:
        assert [(r.status, r.n_excerpts) for r in store.runs()][-1] == ("complete", 1500)


@pytest.mark.slow
def test_a_store_its_first_collection_is_making_is_named_as_such(tmp_path: Path, tiny_model: Path,
                                                                 big_corpus: Path) -> None:
    """Before a new store's first collection writes it, a command on it says that collection is in progress (not
    "run `neuronscope collect` first", which the lock would refuse)."""
    path = tmp_path / "new.duckdb"
    collector = Collector(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", path, *ARGS])
    try:
        collector.wait_for(", batch 1", timeout=300)
        assert_one_line_error(run_cli(["top", "--store", path]), f"no store at {path} yet: a collection into it is "
                              f"in progress (PID {collector.proc.pid} (", "the store appears when its pass ends")
        collector.proc.send_signal(signal.SIGINT)
        code, _out, err = collector.finish(timeout=300)
        assert code == 130, err
    finally:
        collector.kill()
    assert_one_line_error(run_cli(["top", "--store", path]), f"no store at {path}: run `neuronscope collect")
