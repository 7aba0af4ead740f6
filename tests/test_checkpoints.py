"""Checkpoints of a collection in progress: resumed after `kill -9` or a stop request (Ctrl-C, SIGTERM, a closed
terminal's SIGHUP) into the store an uninterrupted run writes; refused by the disk; written once more when a long
pass ends."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, assert_same_collection, cli_command, cli_env, fast_settings, run_cli
from terminal import Terminal

from neuronscope.core.collection.corpus import CorpusSpec
from neuronscope.core.collection.excerpts import cut_excerpts
from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")


@pytest.mark.slow
def test_a_collection_killed_goes_on_from_its_checkpoint_and_equals_an_uninterrupted_one(
        tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """`kill -9` mid-collection, then the same command: it goes on from the last checkpoint (here one every 0.2 s)
    and writes the store an uninterrupted run writes; the checkpoints go once the run is in the store."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--batch-size", "1", "--max-excerpts", "96",
            *FAST]
    whole = tmp_path / "whole.duckdb"
    assert run_cli([*args, "--store", whole, "--checkpoint-every", "off"], timeout=300).code == 0
    store = tmp_path / "killed.duckdb"
    folder = tmp_path / "killed.duckdb.checkpoint"
    proc = subprocess.Popen(cli_command([*args, "--store", store, "--checkpoint-every", "0.2s"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (folder / "current").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert (folder / "current").exists() and not store.exists()  # killed mid-run: a checkpoint, no store yet
    rerun = run_cli([*args, "--store", store], timeout=300, NEURONSCOPE_PROGRESS_SECONDS="0")
    assert rerun.code == 0, rerun.err
    resumed = re.search(r"resumed from a checkpoint \(excerpts\): (\d+)/(\d+)", rerun.err)
    assert resumed and 0 < int(resumed.group(1)) < int(resumed.group(2)), rerun.err
    assert not folder.exists()
    assert_same_collection(whole, store)


def test_a_checkpoint_the_disk_refuses_is_a_warning_and_the_collection_goes_on(
        tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """A checkpoint that cannot be written (here a file where its folder goes; a full disk alike) loses nothing: the
    run warns in one line, goes on from the state in memory, tries again later and writes its store."""
    store = tmp_path / "refused.duckdb"
    (tmp_path / "refused.duckdb.checkpoint").write_text("in the way")
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--batch-size", "1", "--max-excerpts",
                      "48", *FAST, "--store", store, "--checkpoint-every", "0.05s"], timeout=300,
                     NEURONSCOPE_PROGRESS_SECONDS="0")
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("could not write a checkpoint")]
    assert len(warnings) >= 2 and "refused.duckdb.checkpoint" in warnings[0], result.err  # tried again
    assert "goes on" in warnings[0] and "Traceback" not in result.err
    assert "last checkpoint" not in result.err  # none was written, and none is reported
    with Store.open(store, read_only=True) as done:
        (run,) = done.runs()
        assert run.status == "complete" and run.n_excerpts == 48


def test_a_long_pass_ends_with_a_checkpoint_so_a_failed_write_costs_no_collecting(
        subject, corpus_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A pass that ran at least the checkpoint interval writes one more checkpoint when it ends: if the store write
    then fails (a full disk), the same collection resumes at its end and only writes. A short pass writes none."""
    from neuronscope.core.collection.checkpoint import Checkpoints
    from neuronscope.core.collection.collect import accumulate

    excerpts = cut_excerpts(CorpusSpec(str(corpus_dir)), subject.tokenizer, length=16, max_excerpts=24, seed=0)
    settings, n = fast_settings(), len(excerpts.excerpt_ids)

    def run(every: float) -> tuple[list[tuple[str, int, int]], list]:  # type: ignore[type-arg]
        said: list[tuple[str, int, int]] = []
        states = list(accumulate(subject, excerpts, (0, 1), settings, 8, "key",
                                 Checkpoints(tmp_path / "s.duckdb", every), lambda *a: said.append(a)))
        return said, states

    said, _ = run(3600.0)
    assert Checkpoints(tmp_path / "s.duckdb", 1.0).load("key") is None and not any(s == "checkpoint" for s, *_ in said)
    said, first = run(0.0)
    assert ("checkpoint", n, n) in said and Checkpoints(tmp_path / "s.duckdb", 1.0).load("key").done == n
    said, again = run(3600.0)  # the rerun after a failed write: no batch goes through the model again
    assert ("resume", n, n) in said and [s for s in said if s[0] == "collect"] == [("collect", n, n)]
    for a, b in zip(first, again, strict=True):
        for kind in a.samples:
            assert np.array_equal(a.samples[kind].ids, b.samples[kind].ids)
            assert np.array_equal(a.samples[kind].codes, b.samples[kind].codes)
        assert np.array_equal(a.sums, b.sums) and np.array_equal(a.histogram, b.histogram)


@pytest.mark.slow
def test_a_collection_stopped_by_sigterm_saves_its_state_and_goes_on_from_it(
        tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-collection (a scheduler preempting the job, `scancel`): the batch in progress ends, the state is
    saved as a checkpoint, and the process exits 130 saying where. The same command goes on from exactly there and
    writes the store an uninterrupted run writes. The checkpoints' interval (1 h) never comes: only the stop saves."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--batch-size", "1", "--max-excerpts", "96",
            *FAST]
    whole = tmp_path / "whole.duckdb"
    assert run_cli([*args, "--store", whole, "--checkpoint-every", "off"], timeout=300).code == 0
    store = tmp_path / "stopped.duckdb"
    proc = subprocess.Popen(cli_command([*args, "--store", store, "--checkpoint-every", "1h"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=cli_env(NEURONSCOPE_PROGRESS_SECONDS="0"), cwd=ROOT)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:  # a plain progress line a batch
        found = re.fullmatch(r"collecting excerpts: (\d+)/96", line.strip())
        if found and int(found.group(1)) > 0:
            seen = int(found.group(1))
            proc.send_signal(signal.SIGTERM)
            break
    said = proc.stderr.read()
    assert proc.wait(timeout=300) == 130 and seen, said
    saved = re.search(r"^interrupted: the collection's state after (\d+) of 96 excerpts is in (.+): the same command "
                      r"goes on from there$", said, re.MULTILINE)
    assert saved and seen <= int(saved.group(1)) <= 96 and Path(saved.group(2)) == tmp_path / "stopped.duckdb.checkpoint"
    assert "Traceback" not in said
    info = run_cli(["info", "--store", store])  # no store yet, and info says where the collection's state is
    assert info.code == 2 and f"holds a collection's state after {saved.group(1)} excerpt" in info.out, info
    assert "no store at" in info.err and "stopped before it wrote one" in info.err
    rerun = run_cli([*args, "--store", store], timeout=300, NEURONSCOPE_PROGRESS_SECONDS="0")
    assert rerun.code == 0, rerun.err
    assert f"resumed from a checkpoint (excerpts): {saved.group(1)}/96" in rerun.err, rerun.err
    assert_same_collection(whole, store)


#: `neuronscope ARGS` whose store write (or shard state's) gets a SIGTERM as it starts.
STOPPED_AT_WRITE = """import os, signal, sys
import neuronscope.core.collection.state as state, neuronscope.core.collection.store_write as store_write
def stopped(real):
    def write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return write
store_write.write_run, state.write_shard = stopped(store_write.write_run), stopped(state.write_shard)
from neuronscope.tui.cli import main
sys.exit(main(sys.argv[1:]))"""


def test_a_stop_request_during_the_write_lets_it_finish(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """Once the pass is over, SIGTERM (or Ctrl-C) lets the store write finish: what a stop would save is what it
    writes (it used to throw the whole pass away, with no checkpoint where the pass was shorter than the interval).
    The same for a shard's state."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "32", "--top", "0", *FAST]
    whole = tmp_path / "whole.duckdb"
    assert run_cli([*args, "--store", whole], timeout=300).code == 0
    for parts in ([[]], [["--shard", "0/2"], ["--shard", "1/2"]]):
        store = tmp_path / f"stopped{len(parts)}.duckdb"
        for part in parts:
            done = subprocess.run([sys.executable, "-c", STOPPED_AT_WRITE, *map(str, [*args, *part, "--store", store])],
                                  capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
            assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        if len(parts) > 1:
            assert run_cli(["merge", "--output", store], timeout=300).code == 0
        assert_same_collection(whole, store)


@pytest.mark.slow
def test_a_collection_whose_terminal_closes_saves_its_state(tiny_model: Path, corpus_dir: Path,
                                                            tmp_path: Path) -> None:
    """The terminal closes mid-collection (an SSH connection drops with the command running in it, and the kernel
    sends it SIGHUP): as for SIGTERM, the batch in progress ends, the state is saved and the command exits 130, where
    it used to die on the spot and lose what it had collected since its last checkpoint. Every write to the closed
    terminal fails, the progress bar's and the last line's too: none stops the save. The same command goes on from
    there."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--batch-size", "1", "--max-excerpts", "96",
            "--store", tmp_path / "s.duckdb", *FAST]
    with Terminal([*args, "--checkpoint-every", "1h"]) as terminal:
        terminal.wait_for(r"(\d+)/96", lambda found: int(found.group(1)) > 0)  # the progress bar, past batch 0
        terminal.hang_up()
        assert terminal.proc.wait(timeout=300) == 130
    rerun = run_cli(args, timeout=300, NEURONSCOPE_PROGRESS_SECONDS="0")
    assert rerun.code == 0, rerun.err
    resumed = re.search(r"resumed from a checkpoint \(excerpts\): (\d+)/96", rerun.err)
    assert resumed and int(resumed.group(1)) > 0, rerun.err


def test_a_collection_that_outlives_its_terminal_finishes(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """A collection that ignores SIGHUP (`disown`, or started so) goes on when its terminal closes, and every write
    there then fails (EIO): the progress bar's, the status lines', the summary's. None of them stops it: it ends with
    status 0 and its store complete, where the first status line after the hangup used to stop it (exit 1, no
    store)."""
    store = tmp_path / "s.duckdb"
    with Terminal(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--batch-size", "1", "--max-excerpts",
                   "96", "--store", store, *FAST], ignore_hangup=True) as terminal:
        terminal.wait_for(r"(\d+)/96", lambda found: int(found.group(1)) > 0)
        terminal.hang_up()
        assert terminal.proc.wait(timeout=300) == 0
    with Store.open(store, read_only=True) as opened:
        assert [run.status for run in opened.runs()] == ["complete"] and opened.run().n_excerpts == 96


def test_a_stop_request_waits_for_the_batch_and_a_second_stops_at_once() -> None:
    """StopRequests, in a process of its own (signals are a process's main thread's): a first Ctrl-C or SIGTERM is
    noted, not raised, and so is the same request passed on at once (torchrun's); a Ctrl-C later raises
    KeyboardInterrupt where it lands; the handlers before come back after; a signal the process ignores stays
    ignored. A later SIGTERM or SIGHUP is never raised: no person asks again when a launcher stops the other ranks
    (torchrun, srun --kill-on-bad-exit) or a terminal closes, and the save in progress goes on."""
    code = """
import os, signal, time
from neuronscope.core.collection.stopping import REPEATED, StopRequests
from neuronscope.core.errors import Terminated
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever this test inherited
before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
with StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    print("noted", stop.signal == signal.SIGTERM)
    time.sleep(REPEATED)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        print("not raised")
    except KeyboardInterrupt:
        print("raised")
print("restored", (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before)
for first in (signal.SIGINT, signal.SIGTERM):
    with StopRequests() as stop:
        os.kill(os.getpid(), first)
        time.sleep(REPEATED + 0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # srun --kill-on-bad-exit's, once another task stopped: only noted
        time.sleep(0.05)
    print("kept", stop.signal == first, Terminated.received)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a signal the process ignores stays ignored
with StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
print("ignored", stop.signal is None)
Terminated.received = None
with StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(REPEATED + 0.05)
    os.kill(os.getpid(), signal.SIGHUP)  # a shell passing its own hangup on: noted, never raised
    time.sleep(0.05)
print("hangup", stop.signal == signal.SIGHUP, Terminated.received)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env())
    assert done.stdout.split() == ["noted", "True", "raised", "restored", "True", "kept", "True", "SIGTERM", "kept",
                                   "True", "SIGTERM", "ignored", "True", "hangup", "True", "SIGHUP"], done.stderr


def test_a_checkpoint_of_another_collection_is_named_before_it_is_replaced(tmp_path: Path) -> None:
    """Rerun with a changed command (other layers, another --max-excerpts), a collection cannot use the checkpoint
    beside its store, and its first checkpoint will replace it: it says so first, with how far that one got. Until
    then the other's state stays, also when this collection ends without a checkpoint of its own."""
    from neuronscope.core.collection.checkpoint import Checkpoints

    heard: list[str] = []
    points = Checkpoints(tmp_path / "s.duckdb", 60.0, warn=heard.append)
    assert points.save("the first command", 1_234, []) and heard == []
    assert points.load("a changed command") is None
    assert heard == [f"{tmp_path}/s.duckdb.checkpoint holds the saved state of another collection (after 1,234 "
                     "excerpts: another model, corpus, layers or settings; with the same command, a corpus file "
                     "changed since): this collection starts from the beginning, and its first checkpoint replaces "
                     "that one; to go on with that one instead, stop this and run the command that started it"]
    points.clear()  # the changed command's run is in its store without a checkpoint of its own: the other stays
    resumed = points.load("the first command")
    assert resumed is not None and resumed.done == 1_234 and len(heard) == 1
    again = Checkpoints(tmp_path / "s.duckdb", 60.0, warn=heard.append)
    assert again.load("a changed command") is None and again.save("a changed command", 10, [])
    again.clear()  # once replaced, the folder is this collection's and goes with it
    assert not (tmp_path / "s.duckdb.checkpoint").exists()


def test_an_interrupt_while_the_store_is_written_says_the_pass_is_saved(  # type: ignore[no-untyped-def]
        tmp_path: Path, subject, corpus_dir: Path) -> None:
    """Ctrl-C or SIGTERM after a pass longer than the interval, while the store is written: the pass's end is in a
    checkpoint, and the interrupt says where, as one during the pass does (DuckDB's "Query interrupted" is such an
    interrupt too). The same command goes on from there and only writes."""
    from neuronscope.core.collection.checkpoint import Checkpoints
    from neuronscope.core.collection.collect import collect
    from neuronscope.core.collection.stopping import Stopped

    settings = fast_settings(max_excerpts=48)
    excerpts = cut_excerpts(CorpusSpec(str(corpus_dir)), subject.tokenizer, length=settings.length, max_excerpts=48,
                            seed=settings.seed)
    options = {"layers": tuple(range(subject.n_layers)), "settings": settings, "batch_size": 16}
    path = tmp_path / "s.duckdb"

    def interrupt_the_write(stage: str, done: int, _total: int) -> None:
        if stage == "write" and done >= 1:
            raise RuntimeError("Query interrupted")  # what DuckDB raises for a Ctrl-C it noticed during a query

    stages: list[tuple[str, int]] = []
    with Store.open(path) as store:
        saved = rf"^the collection's state after 48 of 48 excerpts is in {path}.checkpoint: "
        with pytest.raises(Stopped, match=saved):
            collect(store, subject, excerpts, progress=interrupt_the_write, checkpoints=Checkpoints(path, 0.0),
                    **options)  # type: ignore[arg-type]
        assert [(r.status, r.error) for r in store.runs()] == [("interrupted", "interrupted by the user (Ctrl-C)")]
        collect(store, subject, excerpts, progress=lambda stage, done, _total: stages.append((stage, done)),
                checkpoints=Checkpoints(path, 0.0), **options)  # type: ignore[arg-type]
        assert [r.status for r in store.runs()] == ["interrupted", "complete"]
    assert ("resume", 48) in stages and ("collect", 48) in stages
    assert not [done for stage, done in stages if stage == "collect" and done < 48], "the pass was not redone"
