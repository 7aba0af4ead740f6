"""A process that waits to write a store (a collection at the end of its pass, rank 0's merge) asks the processes
that share it to close it: the app closes it, names the writer, pauses the table and opens it again once the write
is over; a job in another process waits out a write of minutes instead of failing when it opens the store again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from app_helpers import SIZE, screen_text, sync, until
from conftest import cli_command, cli_env
from fake_openai import CHAT, FakeOpenAI
from test_app_jobs import SlowServer

from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.engine import JobSettings
from neuronscope.core.store import Store
from neuronscope.core.store.spool import Spool
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.store_aside import AsideScreen

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")

#: A process that writes the store as a collection's end does: it waits for the store (asking the others to close
#: it), says when it holds it, and keeps it until its stdin closes.
WRITER = """
import os, sys
from neuronscope.core.store import Store, spool
spool.ASK_SECONDS = spool.ASK_AGAIN_SECONDS = float(os.environ.get("ASK_SECONDS", spool.ASK_SECONDS))
store = Store.open_when_free(sys.argv[1], lambda pid: print("waits for", pid, flush=True))
print("writing", flush=True)
sys.stdin.read()
if sys.argv[2:] == ["new-run"]:  # what a collection lands: a run newer than the app's
    store.con.execute("INSERT INTO runs SELECT * REPLACE ((SELECT max(run_id) + 1 FROM runs) AS run_id) FROM runs "
                      "WHERE status = 'complete' ORDER BY run_id DESC LIMIT 1")
store.close()
print("done", flush=True)
"""


class Writer:
    def __init__(self, path: Path, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env(**env))
        self.said: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.said.append(line.strip())

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@sync
async def test_the_app_closes_its_store_while_another_process_writes_it(fresh_store: Path) -> None:
    with Store.open(fresh_store, read_only=True) as store:  # (the session's store may hold more than one run)
        new_run = max(run.run_id for run in store.runs()) + 1
    app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
    async with app.run_test(size=SIZE) as pilot:
        writer = Writer(fresh_store, "new-run")
        try:
            await until(pilot, lambda: f"waits for {os.getpid()}" in writer.said, seconds=60)
            # At its next look at the spool (every 2 s), the app closes the store; the writer takes it at once.
            await until(pilot, lambda: "writing" in writer.said, seconds=30)
            assert isinstance(app.screen, AsideScreen)
            await until(pilot, lambda: f"PID {writer.proc.pid} (-c" in screen_text(app.screen), seconds=10)
            assert "jobs.duckdb is being written by another process" in screen_text(app.screen)
            # Nothing that reads the store runs meanwhile: not a sort, not the command palette.
            sorted_by = app.sort_index
            await pilot.press("s", "ctrl+p")
            assert app.sort_index == sorted_by and isinstance(app.screen, AsideScreen)
            # A job confirmed in the moment the app stepped aside waits for the store, then runs.
            app.start(app.settings, (NeuronId(0, 2),), "cursor")
            await pilot.pause()
            assert not app.jobs.handles
            assert any("the job on 1 neuron starts once the store is back" in str(n.message)
                       for n in app._notifications)
            assert writer.proc.poll() is None
            assert writer.finish() == 0
            await until(pilot, lambda: not app.aside, seconds=10)
            assert not isinstance(app.screen, AsideScreen)
            # The writer made a newer run than the one shown: the app says so (the table stays on its own run).
            told = f"run {new_run} was written into jobs.duckdb meanwhile; this table shows run {app.run_info.run_id}"
            await until(pilot, lambda: any(told in str(n.message) for n in app._notifications), seconds=10)
            await until(pilot, lambda: app.table.row(2).score is not None, seconds=60)  # type: ignore[union-attr]
            await pilot.press("s")  # the table reads again, from the store opened again
            await until(pilot, lambda: app.table.query_spec.order != "neuron" and not app.table.pending, seconds=10)
            assert app.table.row(0) is not None
        finally:
            writer.kill()
    assert Spool(fresh_store).fold_request() is None  # the request is gone with the write


@sync
async def test_a_process_that_keeps_the_store_does_not_keep_the_app_closed(fresh_store: Path) -> None:
    """Another process keeps the store (an app running a job, a script): the app closes it for the writer and names
    the process it waits for; when the request lapses the app opens the store again, and once that process lets go,
    the writer asks again and writes (two apps used to keep a writer waiting for ever, each having stepped aside once)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from neuronscope.core.store import Store; "
                               "s = Store.open(sys.argv[1], read_only=True); print('open', flush=True); "
                               "sys.stdin.read()", str(fresh_store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    assert holder.stdout is not None and holder.stdout.readline() == "open\n"
    app = NeuronscopeApp(fresh_store)
    writer = Writer(fresh_store, ASK_SECONDS="3")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.aside, seconds=60)
            await until(pilot, lambda: f"it waits for PID {holder.pid} (-c" in screen_text(app.screen), seconds=30)
            await until(pilot, lambda: not app.aside, seconds=30)  # the request lapsed: the table is back
            assert "writing" not in writer.said and app.table.row(0) is not None
            assert holder.stdin is not None
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0
            await until(pilot, lambda: "writing" in writer.said, seconds=60)  # asked again, and the app stepped aside
            assert app.aside
            assert writer.finish() == 0
            await until(pilot, lambda: not app.aside, seconds=30)
    finally:
        holder.kill()
        writer.kill()


@sync
async def test_quitting_while_the_store_is_being_written_leaves_the_writer_alone(fresh_store: Path) -> None:
    app = NeuronscopeApp(fresh_store)
    writer = Writer(fresh_store)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "writing" in writer.said, seconds=60)
            assert isinstance(app.screen, AsideScreen)
            await pilot.press("q")
        assert writer.proc.poll() is None
        assert writer.finish() == 0
    finally:
        writer.kill()


@pytest.mark.parametrize("then", ["write", "quit"])
@sync
async def test_the_apps_own_job_pauses_for_a_writer_and_goes_on_after(fresh_store: Path, then: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A job of the app's own used to keep the app from stepping aside, so a collection's write waited for the end
    of the job (hours, for a large one): the job now pauses once the neurons it is on have landed, the app steps
    aside, the writer writes, and the job goes on to complete, each neuron once. Quitting meanwhile does not wait
    for the write."""
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    with FakeOpenAI() as server:
        server.on(CHAT, SlowServer(0.3))
        spec = f"openai:fake@{server.url}"
        app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer=spec, simulator=spec, simulation="lines"),
                             concurrency=1)
        neurons = tuple(NeuronId(1, n) for n in range(5))  # about 3 s each, one request at a time
        writer: Writer | None = None
        try:
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: app.table.row(0) is not None, seconds=30)
                app.start(app.settings, neurons, "cursor")
                handle = app.jobs.handles[0]
                await until(pilot, lambda: handle.done >= 1, seconds=60)
                writer = Writer(fresh_store)
                await until(pilot, lambda: "writing" in writer.said, seconds=60)
                assert app.aside and handle.running and handle.paused
                calls = len(server.hits(CHAT))
                await pilot.pause(1.0)
                assert len(server.hits(CHAT)) == calls  # nothing is asked while the store is being written
                if then == "quit":
                    await pilot.press("q")
                    await until(pilot, lambda: not handle.running, seconds=10)
                else:
                    assert writer.finish() == 0
                    await until(pilot, lambda: not app.aside, seconds=30)
                    await until(pilot, lambda: not handle.running, seconds=120)
            if then == "quit":
                assert app.return_code == 0 and writer.proc.poll() is None  # out, while the write goes on
                assert writer.finish() == 0
                return
        finally:
            if writer is not None:
                writer.kill()
    assert handle.state == "complete" and handle.done == handle.total == len(neurons), handle.state
    with Store.open(fresh_store, read_only=True) as store:
        assert len(store.jobs()) == 1


@sync
async def test_a_writing_command_waits_for_the_app_which_steps_aside(fresh_store: Path) -> None:
    """`clean` (as `related`, `effects`, `import-openai` and `merge`) run while the app has the store open waits
    for it, naming the app, and asks it to close it, rather than saying the store is in use: the app steps aside,
    the command writes, and the table comes back."""
    app = NeuronscopeApp(fresh_store)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.table.row(0) is not None, seconds=30)
        clean = subprocess.Popen(cli_command(["clean", "--store", fresh_store]), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
        try:
            await until(pilot, lambda: app.aside, seconds=60)
            await until(pilot, lambda: clean.poll() is not None, seconds=60)
            await until(pilot, lambda: not app.aside, seconds=30)
            assert app.table.row(0) is not None
            # clean compacted the store into a new file: the app has that one open, not the old one it deleted (an
            # app that opened the store between clean's close and its rename kept the old file)
            assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}") and
                        os.readlink(f"/proc/self/fd/{fd}") == f"{fresh_store} (deleted)"]
        finally:
            if clean.poll() is None:
                clean.kill()
            _out, err = clean.communicate(timeout=30)
    said = " ".join(err.split())
    assert clean.returncode == 0, err
    assert f"`neuronscope clean` waits for {fresh_store}: PID {os.getpid()} (" in said, said
    assert "has it open and is asked to close it (Ctrl-C stops waiting, with nothing written)" in said, said
    assert "removed no unfinished run" in said, said


def test_related_waits_for_a_process_that_writes_the_store(fresh_store: Path) -> None:
    """`related` (as `effects`) reads the store before it loads its model: while another process writes it, it
    waits and says for whom, rather than refusing with "in use"."""
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(8)", str(fresh_store)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        done = subprocess.run(cli_command(["related", "--store", fresh_store]), capture_output=True, text=True,
                              cwd=ROOT, env=cli_env(), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    said = " ".join(done.stderr.split())
    assert done.returncode == 0, done.stderr
    assert f"`neuronscope related` waits for {fresh_store}: PID {holder.pid} (-c import duckdb" in said, said
    assert "is writing it (Ctrl-C stops waiting, with nothing written)" in said and "related tokens and neurons" in said


def test_a_shared_store_waits_out_a_long_write_when_it_steps_aside(fresh_store: Path) -> None:
    """A job's store (read-only, shared) steps aside when a writer asks, and opens again only once the write is
    over, told who writes meanwhile: it used to give up after 5 s and fail the job. The writer's request names the
    process it waits for (here this one, until it steps aside)."""
    store = Store.open(fresh_store, read_only=True)
    writer = Writer(fresh_store)
    told: list[int] = []
    try:
        aside = threading.Thread(target=lambda: store.step_aside(told.append))
        _until(lambda: f"waits for {os.getpid()}" in writer.said)
        assert store.fold_asked() == writer.proc.pid and store.fold_waits_for() == os.getpid()
        aside.start()
        _until(lambda: "writing" in writer.said)
        aside.join(timeout=6)  # more than the 5 s it used to wait
        assert aside.is_alive() and told == [writer.proc.pid]
        assert writer.finish() == 0
        aside.join(timeout=30)
        assert not aside.is_alive()
        assert store.runs()  # open again
    finally:
        writer.kill()
        store.close()


def test_a_writer_asks_for_a_while_then_pauses_longer_each_time(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that keeps the store (an app running a job) must not keep the others closed for as long as it does:
    a writer's request stands ASK_SECONDS, then the others open the store again until the writer asks again, after a
    pause that doubles; each request names the process it waits for."""
    from neuronscope.core.store import spool as spool_module
    from neuronscope.core.store.spool import Asking

    monkeypatch.setattr(spool_module, "ASK_SECONDS", 0.3)
    monkeypatch.setattr(spool_module, "ASK_AGAIN_SECONDS", 0.3)
    monkeypatch.setattr(spool_module, "ASK_AGAIN_MAX_SECONDS", 0.6)
    spool = Spool(tmp_path / "s.duckdb")
    asking = Asking(spool)
    asking.held_by(111)
    assert spool.fold_request() == (os.getpid(), 111)
    asking.held_by(222)  # the first holder closed it; another still has it
    assert spool.fold_request() == (os.getpid(), 222)
    time.sleep(0.35)
    asking.held_by(222)  # asked long enough: the others open the store again meanwhile
    assert spool.fold_request() is None
    pauses = []
    for _ in range(2):
        start = time.monotonic()
        while spool.fold_request() is None:
            asking.held_by(222)
            time.sleep(0.01)
        pauses.append(time.monotonic() - start)
        time.sleep(0.35)
        asking.held_by(222)
        assert spool.fold_request() is None
    # 0.3 s, then 0.6 s, and no longer after that (the longest)
    assert pauses[0] > 0.28 and pauses[1] > 0.58 and asking.pause == 0.6, pauses
    asking.held_by(222)
    asking.end()
    assert spool.fold_request() is None and not spool.root.exists()
