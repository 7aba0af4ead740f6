"""A collection's pass leaves its store to other processes (the app, `info`, jobs), and its write waits for
whoever holds the store when the pass ends: the state saved first, so stopping the wait costs no collecting."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from collector import Collector
from conftest import FAST, run_cli

from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


def _collection_in_its_pass(store: Path, tiny_model: Path, big_corpus: Path) -> Collector:
    """A collection into an existing store, once its pass runs (its first checkpoint is written)."""
    assert run_cli(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", store, *FAST,
                    "--max-excerpts", "32"], timeout=300).code == 0
    collector = Collector(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", store, *FAST,
                           "--batch-size", "1", "--max-excerpts", "1500", "--checkpoint-every", "1s"])
    deadline = time.monotonic() + 120
    while not (store.parent / f"{store.name}.checkpoint" / "current").exists() and time.monotonic() < deadline:
        assert collector.proc.poll() is None, collector.finish()[2]
        time.sleep(0.01)
    return collector


@pytest.mark.slow
def test_a_store_is_readable_during_a_collection_whose_write_waits_for_its_reader(
        tmp_path: Path, tiny_model: Path, big_corpus: Path) -> None:
    """During the pass `info` reads the store and names the run collecting; a process that holds the store open
    when the pass ends is named, with the saved state, and the run is written once it closes the store."""
    path = tmp_path / "s.duckdb"
    collector = _collection_in_its_pass(path, tiny_model, big_corpus)
    try:
        reader = Store.open(path, read_only=True)  # the app, say: open until the person closes it
        try:
            info = run_cli(["info", "--store", path])
            assert info.code == 0, info.err
            assert "run 2  running (collecting: its data lands when the pass ends)" in info.out, info.out
            assert f"{path}.checkpoint holds the state of the collection in progress, saved after " in info.out
            assert [r.status for r in reader.runs()] == ["complete", "running"]
            collector.wait_for(f"once PID {os.getpid()} (", timeout=120)
            said = collector.seen[-1]
            assert f"its state is in {path}.checkpoint, so stopping now loses nothing" in said, said
            time.sleep(2)
            assert collector.proc.poll() is None, "the collection did not wait for the store"
        finally:
            reader.close()
        code, _out, err = collector.finish(timeout=120)
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
    """Ctrl-C while the finished pass waits for the store: status 130, the state saved, and the same command
    later only writes it (no excerpt collected again)."""
    path = tmp_path / "s.duckdb"
    collector = _collection_in_its_pass(path, tiny_model, big_corpus)
    try:
        with Store.open(path, read_only=True):
            collector.wait_for("once PID", timeout=120)
            collector.proc.send_signal(signal.SIGINT)
            code, _out, err = collector.finish(timeout=60)
    finally:
        collector.kill()
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the collection's state after 1,500 of 1,500 excerpts is in "
                                            f"{path}.checkpoint: the same command goes on from there"), err
    with Store.open(path, read_only=True) as store:  # a run it could not mark: interrupted, as its process is gone
        assert [r.status for r in store.runs()] == ["complete", "interrupted"]
    again = run_cli(["collect", "--model", tiny_model, "--corpus", big_corpus, "--store", path, *FAST,
                     "--batch-size", "1", "--max-excerpts", "1500"], timeout=300, NEURONSCOPE_PROGRESS_SECONDS="0")
    assert again.code == 0, again.err
    assert "resumed from a checkpoint (excerpts): 1,500/1,500" in again.err, again.err
    with Store.open(path, read_only=True) as store:
        assert [(r.status, r.n_excerpts) for r in store.runs()][-1] == ("complete", 1500)
