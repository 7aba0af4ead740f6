"""Explain/score jobs started from the app: results landing in the table and on the neuron screen, failures in
a modal, rate-limited progress, cancel and resume, quitting mid-job, a store another process holds, and hostile
explanations shown inertly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from app_helpers import SIZE, on_screen, screen_text, settled, shown, sync, table_lines, until
from conftest import assert_one_line_error, cli_command, cli_env, run_cli
from fake_openai import CHAT, FakeOpenAI, Reply
from rich.cells import cell_len
from spool_watch import SpoolWatch
from test_job_faults import Server
from textual.widgets import Label, ProgressBar

from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.engine import JobSettings
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.tui.app import NeuronscopeApp
from neuronscope.tui.job_actions import CONFIRM_ABOVE
from neuronscope.tui.screens.modals import MessageScreen
from neuronscope.tui.widgets.jobs import PROGRESS_INTERVAL
from neuronscope.tui.widgets.neuron_table import HEADER_LINES, NeuronTable

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")


@sync
async def test_jobs_land_in_the_table_and_failures_open_a_modal(fresh_store: Path) -> None:
    app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        assert app.store.read_only and table.current is not None and table.current.score is None
        await pilot.press("down", "e")  # explain and score L0/N1 with the baseline
        await until(pilot, lambda: not app.jobs.running)
        handle = app.jobs.handles[0]
        assert handle.state == "complete" and (handle.done, handle.total) == (1, 1)
        await until(pilot, lambda: table.row(1).score is not None)  # type: ignore[union-attr]
        row = table.row(1)
        assert row is not None and (row.layer, row.neuron) == (0, 1) and row.explanation.startswith("tokens:")
        assert f"{row.score:+.2f}" in table_lines(table, 2)[3]
        assert "complete 1/1" in str(app.jobs.query_one(".job-state", Label).render())
        assert app.check_action("cancel", ()) is None  # nothing to cancel: greyed out
        # The job's row is drawn above the keys (it once lay under them, both docked to the bottom), and the same
        # job again, found complete, says so with its count.
        lines = on_screen(app.screen)
        assert "explain L0/N1 · baseline" in lines[-2] and "complete 1/1" in lines[-2] and "Help" in lines[-1]
        await pilot.press("e")
        await until(pilot, lambda: len(app.jobs.handles) == 2 and not app.jobs.running)
        await pilot.pause()
        lines = on_screen(app.screen)
        assert "explain L0/N1 · baseline" in lines[-2] and "complete 1/1" in lines[-2], lines[-4:]

        # Score the marked neurons: L0/N1 has an explanation, L0/N3 has none and fails with a modal naming it.
        await pilot.press("m", "down", "m")
        assert table.marked == {(0, 1), (0, 3)}
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, MessageScreen))
        text = screen_text(app.screen)
        assert "1 neuron failed" in text and "L0/N3: " in text and "no pos explanation" in text
        assert "explain them (e) or write your own (w), then score again (x)" in app.screen.lines[-1].plain
        assert "L0/N1:" not in text
        await pilot.press("escape")
        await pilot.pause()
        assert app.jobs.handles[-1].state == "partial"

        # The neuron screen's e acts on the neuron shown, and its result appears on the open screen.
        app.open_neuron(0, 5)
        await shown(pilot)
        assert "Explanations" not in screen_text(app.screen)
        await pilot.press("e")
        await until(pilot, lambda: not app.jobs.running)
        await until(pilot, lambda: "Explanations" in screen_text(app.screen))
        assert "* baseline #0: tokens:" in screen_text(app.screen)
    with Store.open(fresh_store, read_only=True) as store:
        states = [(j["state"], j["done"], j["failed"]) for j in store.jobs()]
        assert states == [("complete", 1, 0), ("partial", 1, 1), ("complete", 1, 0)]


@sync
async def test_progress_is_rate_limited_and_complete(fresh_store: Path) -> None:
    """A fast job (the baseline over two layers) posts about ten progress updates a second, not one per neuron,
    and its last update shows it finished; every neuron lands in the table."""
    app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        await pilot.press("f")
        await pilot.pause()
        await pilot.press(*"1..2", "enter")
        await settled(pilot, table)
        total = table.row_count
        started = time.monotonic()
        await pilot.press("e")
        await pilot.pause()
        await pilot.press("enter")  # confirm: more than CONFIRM_ABOVE neurons
        handle = app.jobs.handles[0]
        await until(pilot, lambda: not handle.running)
        elapsed = time.monotonic() - started
        assert handle.state == "complete" and handle.done == handle.total == total
        assert 2 <= handle.updates <= elapsed / PROGRESS_INTERVAL + 2 and handle.updates < total
        bar = app.jobs.query_one(ProgressBar)
        assert bar.progress == bar.total == total
        await until(pilot, lambda: app.store.neuron_count(app.run_info.run_id, BrowseQuery(explained=False,
                                                                                         layers=(1, 2))) == 0)
        await until(pilot, lambda: all(table.row(i).score is not None for i in range(total)))  # type: ignore[union-attr]


class SlowServer(Server):
    """The fault server's answers, each after a short delay (so a job is still running when cancelled)."""

    def __init__(self, delay: float) -> None:
        super().__init__({})
        self.delay = delay

    def __call__(self, body: Any) -> Reply:
        time.sleep(self.delay)
        return super().__call__(body)


@sync
async def test_cancel_resume_and_quit_mid_job(fresh_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    with FakeOpenAI() as server:
        server.on(CHAT, SlowServer(0.15))
        spec = f"openai:fake@{server.url}"
        app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer=spec, simulator=spec, simulation="lines"))
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(NeuronTable)
            await pilot.press("f")
            await pilot.pause()
            await pilot.press(*"1..2", "enter")  # the job takes the filtered rows: layers 1 and 2
            await settled(pilot, table)
            neurons = table.row_count
            assert neurons > CONFIRM_ABOVE
            await pilot.press("e")
            await pilot.pause()
            assert isinstance(app.screen, MessageScreen)  # so many neurons: it asks first
            assert f"explain and score {neurons} filtered neurons?" in screen_text(app.screen)
            await pilot.press("enter")
            handle = app.jobs.handles[0]
            await until(pilot, lambda: handle.done >= 2)
            assert app.check_action("cancel", ()) is True
            await pilot.press("c")
            await until(pilot, lambda: not handle.running)
            assert handle.state == "cancelled" and 2 <= handle.done < neurons
            done_before = handle.done
            calls_before = len(server.hits(CHAT))

            # Started again, the same job resumes: finished neurons are not asked again.
            await pilot.press("e")
            await pilot.pause()
            await pilot.press("enter")
            second = app.jobs.handles[1]
            await until(pilot, lambda: second.done >= done_before + 1)
            # Every call of the first session is answered from the store's log, never sent again.
            first_bodies = [json.dumps(r.body, sort_keys=True) for r in server.hits(CHAT)[:calls_before]]
            again = [r for r in server.hits(CHAT)[calls_before:] if json.dumps(r.body, sort_keys=True) in first_bodies]
            assert not again
            await pilot.press("q")  # quitting mid-job stops the job first
            await until(pilot, lambda: not second.running)
        assert app.return_code == 0 and second.state == "cancelled"
    with Store.open(fresh_store, read_only=True) as store:
        jobs = store.jobs()
        assert len(jobs) == 1 and jobs[0]["state"] == "interrupted"  # one job, resumable
        assert jobs[0]["done"] == second.done < neurons
        assert len(store.summaries(app.run_info.run_id)) == second.done


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "hangup"])
@sync
async def test_a_stop_signal_quits_mid_job_as_q_does(fresh_store: Path, monkeypatch: pytest.MonkeyPatch,
                                                     number: int) -> None:
    """SIGTERM (`kill`, a scheduler's cancel or time limit) or SIGHUP (the terminal closed: an SSH connection
    dropped) while a job runs: the job stops after its current LLM call and the app exits, as q does, rather than
    dying on the spot; the job is interrupted and resumable, and the process's handler from before comes back."""
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    heard: list[int] = []  # where the app does not take the signal, this test's own handler does: the worker lives
    before = signal.signal(number, lambda got, _frame: heard.append(got))
    try:
        with FakeOpenAI() as server:
            server.on(CHAT, SlowServer(0.15))
            spec = f"openai:fake@{server.url}"
            app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer=spec, simulator=spec, simulation="lines"))
            async with app.run_test(size=SIZE) as pilot:
                await pilot.press("f")
                await pilot.pause()
                await pilot.press(*"1..2", "enter")
                await settled(pilot, app.query_one(NeuronTable))
                await pilot.press("e")
                await pilot.pause()
                await pilot.press("enter")  # the question: so many neurons
                handle = app.jobs.handles[0]
                await until(pilot, lambda: handle.done >= 2)
                os.kill(os.getpid(), number)
                await until(pilot, lambda: not handle.running)
            assert app.stopped_by == signal.Signals(number).name and handle.state == "cancelled" and not heard
            assert signal.getsignal(number) is not None and not heard
            os.kill(os.getpid(), number)  # the handler from before is back
            time.sleep(0.05)
            assert heard == [number]
    finally:
        signal.signal(number, before)
    with Store.open(fresh_store, read_only=True) as store:
        jobs = store.jobs()
        assert len(jobs) == 1 and jobs[0]["state"] == "interrupted" and 2 <= jobs[0]["done"] == handle.done


def test_browse_a_store_another_process_writes(cli_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A store held for writing by another process: a one-line error naming its PID, before the app starts."""
    path = tmp_path / "held.duckdb"
    shutil.copy(cli_store[0], path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from neuronscope.core.store import Store; "
                               "s = Store.open(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert_one_line_error(run_cli(["browse", str(path)]), "in use by PID", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()


@sync
async def test_a_job_runs_while_another_process_has_the_store_open(fresh_store: Path) -> None:
    """Another process reading the store does not stop the app's job: it writes beside the store, and a new reader
    sees its results while the first one still has the store open."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from neuronscope.core.store import Store; "
                               "s = Store.open(sys.argv[1], read_only=True); print('held', flush=True); "
                               "time.sleep(60)", str(fresh_store)],
                              stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("down", "e")
            await until(pilot, lambda: bool(app.jobs.handles) and not app.jobs.running)
            assert app.jobs.handles[0].state == "complete" and app.store.read_only
        info = run_cli(["info", "--store", fresh_store])
        assert info.code == 0 and "job 1  complete  run on run 1  1/1 neurons done" in info.out, info.out + info.err
        shown = run_cli(["show", "0/1", "--store", fresh_store])
        assert shown.code == 0 and "tokens:" in shown.out, shown.err
    finally:
        holder.kill()
        holder.wait()


@sync
async def test_the_app_shows_what_a_job_in_another_process_landed(fresh_store: Path) -> None:
    app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NeuronTable)
        assert table.row(2) is not None and table.row(2).score is None  # type: ignore[union-attr]
        result = run_cli(["score", "0/2", "--explanation", "the word blue", "--simulator", "baseline",
                          "--store", str(fresh_store)])  # another terminal, while the app has the store open
        assert result.code == 0, result.err
        await until(pilot, lambda: table.row(2).explanation == "the word blue", seconds=10)  # type: ignore[union-attr]
        assert table.row(2).score is not None  # type: ignore[union-attr]
        app._dirty.add(NeuronId(0, 2))
    # A timer's tick that comes while the app closes (its widgets removed, its store closed) does nothing.
    for tick in (app._reload_spooled, app._reload_landed, app._read_ahead):
        tick()


@pytest.mark.slow
@sync
async def test_the_app_steps_aside_while_a_job_in_another_process_folds_the_spool(fresh_store: Path,
                                                                                   tiny_model: Path) -> None:
    """A CLI job folds its spool into the store every second here (SETTLE_SECONDS): the open app closes the store
    for each fold and opens it again, so the spool empties while the job runs, and the app shows every neuron."""
    app = NeuronscopeApp(fresh_store, settings=JobSettings(explainer="baseline", simulator="baseline"))
    async with app.run_test(size=SIZE) as pilot:
        job = subprocess.Popen(cli_command(["run", "--explainer", f"local:{tiny_model}", "--simulation", "lines",
                                            "--limit", "10", "--concurrency", "1", "--store", fresh_store],
                                           SETTLE_SECONDS=1.0),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=cli_env(NEURONSCOPE_BATCH_TOKENS="1"))
        try:
            watch, deadline = SpoolWatch(fresh_store), time.monotonic() + 600
            while job.poll() is None and time.monotonic() < deadline:
                watch.look()
                await pilot.pause(0.02)
            _, err = job.communicate(timeout=60)
        finally:
            job.kill()
        assert job.returncode == 0, err
        assert watch.folded_midway
        table = app.query_one(NeuronTable)
        await until(pilot, lambda: sum(table.row(i).score is not None  # type: ignore[union-attr]
                                       for i in range(table.row_count)) == 10, seconds=10)


@sync
async def test_hostile_explanations_show_literally_in_the_table(fresh_store: Path) -> None:
    """A user's sentence with markup, escapes, a newline and a tab is one inert line in the table and on the
    neuron screen (search finds it by its literal text)."""
    hostile = "[bold red]x[/] [/INST] \x1b[31mRED\x1b[0m \x1b]0;title\x07 two\nlines\ttab"
    result = run_cli(["score", "0/2", "--explanation", hostile, "--simulator", "baseline", "--store",
                      str(fresh_store)])
    assert result.code == 0, result.err
    app = NeuronscopeApp(fresh_store)
    async with app.run_test(size=(160, 30)) as pilot:
        table = app.query_one(NeuronTable)
        await pilot.press("slash", *"[/INST]", "enter")
        await settled(pilot, table)
        assert table.row_count == 1 and table.current is not None and table.current.explanation == hostile
        line = table_lines(table, 1)[HEADER_LINES]
        assert "[bold red]x[/] [/INST] \\x1b[31mRED\\x1b[0m \\x1b]0;title\\x07 two↵lines⇥tab" in line
        assert "\x1b" not in line and "\x07" not in line and "\n" not in line
        await pilot.press("enter")
        await shown(pilot)
        text = screen_text(app.screen)
        assert "[/INST]" in text and "\\x1b[31mRED" in text and "\x1b" not in text
        # Wide characters (two cells each) and a combining accent (none) keep the columns where the header has them.
        wide = "中文中文中文 😀 e\u0301 wide"
        assert run_cli(["score", "0/3", "--explanation", wide, "--simulator", "baseline", "--store", str(fresh_store)]
                       ).code == 0
        await pilot.press("escape", "escape", "slash", *"wide", "enter")
        await until(pilot, lambda: table.row_count == 1 and table.current is not None
                    and table.current.explanation == wide, seconds=10)
        header, line = table_lines(table, 1)[HEADER_LINES - 1 : HEADER_LINES + 1]
        assert wide in line and cell_len(line) == cell_len(header) == table.size.width
        assert cell_len(line[: line.index("%") + 1]) == cell_len(header.rstrip())  # the density column's end
