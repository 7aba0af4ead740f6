"""Interrupted collections: the real `neuronscope collect` in a subprocess, stopped by Ctrl-C or
kill -9, leaves a store that opens cleanly, shows no half-written run as complete, and resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from collector import Collector
from conftest import (
    FAST,
    cli_env,
    collect_into,
    fast_settings,
    orphan_records,
    run_cli,
    run_rows,
)

from neuronscope.core.collection.corpus import CorpusSpec, describe
from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
PROBES = [(0, 0), (0, 17), (1, 3), (1, 40), (2, 11), (2, 47)]



# -- interrupted collections -------------------------------------------------------------------------

def _start_long_collect(path: Path, model: Path, corpus: Path) -> Collector:
    collector = Collector(["collect", "--model", model, "--corpus", corpus, "--store", path, *FAST,
                           "--batch-size", "1"], NEURONSCOPE_PROGRESS_SECONDS="0")  # a progress line a batch
    collector.wait_for("collecting excerpts: 1/")  # inside the loop (the full pass takes ~15 s at batch size 1),
    # whatever the store's opening and the run's registration take before it
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
    last = err.strip().splitlines()[-1]  # taken at the batch's end, once the state is saved (checkpoints are on)
    assert last.startswith("interrupted: the collection's state after ") and last.endswith(
        f"excerpts is in {path}.checkpoint: the same command goes on from there"), err
    assert sum("interrupted" in line for line in err.splitlines()) == 1
    with Store.open(path, read_only=True) as store:
        runs = store.runs()
        assert [r.status for r in runs] == ["complete", "interrupted"]
        assert runs[1].corpus.startswith(describe(CorpusSpec(str(big_corpus))) + " (all ")
        assert runs[1].error == "interrupted by the user (Ctrl-C)"
        assert store.run_counts(runs[1].run_id) == {"neurons": 0, "records": 0, "excerpts": 0}
        assert run_rows(store, done.run_id) == before
        assert store.run().run_id == done.run_id, "the newest complete run is still the old one"


def test_ctrl_c_inside_the_compiled_cpu_pass_is_an_interrupt() -> None:
    """numba hands a compiled function's returned arrays back through a Python callback, and a Ctrl-C that Python
    notices there surfaced as "SystemError: CPUDispatcher(...) returned a result with an exception set": the
    collection was marked failed and the CLI said "internal error" with exit 1. On batches this small about a
    third of the Ctrl-Cs land in that callback, so twelve of them all coming out as KeyboardInterrupt is the fix
    (before it, 1 time in 100). The accumulator stays usable: a heap a stopped batch left half-built is rebuilt."""
    import torch
    from sampling_data import LAYER

    from neuronscope.core.collection.accumulate import LayerAccumulator
    from neuronscope.core.records import CollectSettings

    settings = CollectSettings(length=6, top_k=3, bottom_k=2, random_k=2, quantile_k=1, seed=0, hist_stride=1,
                               skip_positions=0)
    acc = LayerAccumulator(LAYER, 8, settings, torch.float32, torch.device("cpu"), False)
    acts = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    acc.update(acts, torch.arange(-2, 0))  # compiled (or loaded from numba's cache) before any Ctrl-C
    done = 0
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for _ in range(12):
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            deadline = time.monotonic() + 30
            with pytest.raises(KeyboardInterrupt):
                while time.monotonic() < deadline:
                    acc.update(acts, torch.arange(done, done + 2))
                    done += 2
    finally:
        signal.signal(signal.SIGINT, inherited)
    acc.update(acts, torch.arange(done, done + 2))
    assert acc.result().samples["top"].ids.shape == (8, 3)


def test_a_ctrl_c_in_code_run_from_a_string_exits_130(tmp_path: Path) -> None:
    """CPython notes a KeyboardInterrupt that ends code exec() runs from a string as unhandled, even when the CLI
    handles it, and a process started with `python -m` (torchrun's ranks, these tests) then killed itself with
    SIGINT at exit: -2, not 130, for one Ctrl-C in 15 while a model loaded (the dataclasses of the modules a
    command imports define their methods so). Here the interrupt comes out of such code at the first import the
    command makes, once the console has printed (the modules it imports on its first line define dataclasses too,
    and running one clears the note)."""
    (tmp_path / "landing.py").write_text(
        "import builtins, io, sys\n"
        "from rich.console import Console\n"
        "from neuronscope.tui.cli import main\n"
        "Console(file=io.StringIO()).print('as a collection has printed before a Ctrl-C')\n"
        "real = builtins.__import__\n"
        "def landing(name, *args, **kwargs):\n"
        "    if sys._getframe(1).f_code.co_name == 'cmd_top':\n"
        "        builtins.__import__ = real\n"
        "        exec('raise KeyboardInterrupt')\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = landing\n"
        "sys.exit(main())\n")
    done = subprocess.run([sys.executable, "-m", "landing", "top", "--store", str(tmp_path / "s.duckdb")],
                          env=cli_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == ("interrupted: nothing half-written is marked complete; run the same command again "
                                   "to redo it")


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
    from neuronscope.core.records import CollectSettings
    from neuronscope.core.store.runs import process_start

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
            store.con.execute("UPDATE runs SET pid = ?, owner_start = ? WHERE run_id = ?",
                              [sleeper.pid, process_start(sleeper.pid), live])
            store.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [gone.pid, dead])
            store.mark_stale_runs()
            status = dict(store.con.execute("SELECT run_id, status FROM runs").fetchall())
            assert status == {done.run_id: "complete", live: "running", dead: "interrupted"}
            assert {r.run_id: r.status for r in store.runs()}[live] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.path.exists(path)
